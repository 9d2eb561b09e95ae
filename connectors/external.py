"""Files that belong to the user, outside the zone: rows to score with a released model.

Kept in ``connectors`` so that every row read in the project goes through this package (the
"only connectors reads rows" chokepoint has no exceptions to remember).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from foundation.errors import SchemaError, SpecError


def read_user_table(path: Path, columns: Sequence[str] | None) -> pa.Table:
    """Read ``columns`` (None: every column) of a user's CSV or Parquet file (types as the
    file has them)."""
    if not path.exists():
        raise SpecError("--from", f"{path} does not exist", "give a CSV or Parquet file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            have = pq.read_schema(path).names
            columns = list(have) if columns is None else columns
            missing = [c for c in columns if c not in set(have)]
            if missing:
                raise SchemaError(
                    f"column {missing[0]!r} is missing from {path.name}", column=missing[0]
                )
            return pq.read_table(path, columns=list(columns))
        if suffix == ".csv":
            convert = (
                pacsv.ConvertOptions()
                if columns is None
                else pacsv.ConvertOptions(
                    include_columns=list(columns), include_missing_columns=False
                )
            )
            table = pacsv.read_csv(path, convert_options=convert)
            columns = table.column_names if columns is None else columns
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise SchemaError(
                    f"column {missing[0]!r} is missing from {path.name}", column=missing[0]
                )
            return table
    except pa.ArrowInvalid:
        # Arrow's message may quote a cell: name the file only
        raise SchemaError(f"{path.name} could not be parsed as {suffix[1:]}") from None
    raise SpecError(
        "--from", f"{path.name} is neither .csv nor .parquet", "convert it to CSV or Parquet"
    )


def write_table(path: Path, table: pa.Table) -> None:
    """Write a table that may leave the zone (scores, DP synthetic rows) as Parquet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
