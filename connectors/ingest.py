"""Ingest: turn a steward's source file into governed Parquet, checked against its contract.

What happens, in order (nothing is written until every check has passed):

1. The source's columns must be exactly the contract's: a declared column that is missing
   and an undeclared extra column are both refused, by name.
2. Every column is converted to its declared Arrow type. CSV is read as raw bytes and
   converted by us (pyarrow's own CSV errors quote the offending value, so they are never
   shown); a value that does not parse is reported as column + 1-based data row.
3. Contract checks, each naming column and data row: null identifier, site or label (and
   any column declared ``nullable = false``); NaN in a float column (missing values are
   empty fields, not NaN); numbers outside the declared ``[min, max]``; a repeated
   identifier when the contract says ``rows_per_person = "one"``. Strings outside a declared
   vocabulary are kept: they map to "other" at preprocessing.
4. The identifier is replaced by ``pseudonym()``: a keyed HMAC-SHA256 (hex) under the zone's
   secret. Direct identifiers are dropped. The table is cast to the contract's
   ``governed_arrow_schema()`` exactly.

Layout of a governed dataset (``dest_dir``)::

    dest_dir/data.parquet     one file, rows sorted by (site, pseudonym)

Why one sorted file: every row group holds rows of a single site (groups are cut at site
boundaries), so each group's site statistics have min == max and a site filter skips whole
groups from the footer alone, without the file-per-site directory names that would put site
values into paths. Sorting by pseudonym inside a site puts a person's rows side by side and
drops the source's row order (which can carry admission order). The footer's key-value
metadata (key ``safe_zone``) holds the contract and the counts (rows, persons, rows per site)
so that summaries never read rows.

Writing is atomic: the file is written into a temporary directory beside ``dest_dir`` and
renamed into place; a failed ingest removes it and leaves nothing at ``dest_dir``.
"""

from __future__ import annotations

import csv
import hmac
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connectors.schema import ColumnSpec, Role, RowsPerPerson, SchemaContract
from foundation.errors import BackendError, NotFoundError, SchemaError, SpecError

#: file name of the governed Parquet inside a dataset directory
DATA_FILE = "data.parquet"
#: footer key-value metadata key holding the contract and counts (JSON)
METADATA_KEY = b"safe_zone"
#: version of the governed layout, so a future reader can refuse what it does not know
LAYOUT_VERSION = 1
# 128 Ki rows per row group: a float32 column chunk is ~0.5 MiB, so a site filter prunes at
# a fine grain and decoding spreads over threads, while per-group costs (footer entries,
# page headers, per-group read calls) stay well under 1% of a read.
ROW_GROUP_ROWS = 131_072
#: the zone's secret must be long enough that pseudonyms cannot be brute-forced
MIN_SECRET_BYTES = 16
# HMAC input is prefixed so a pseudonym can never equal a MAC the zone computes elsewhere
# with the same secret (tokens, audit chain) over the same bytes.
_PSEUDONYM_DOMAIN = b"safe-zone/pseudonym/v1\x00"

_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


@dataclass(frozen=True)
class IngestReport:
    """What an ingest wrote. Counts are inside-the-zone facts, not releases."""

    rows: int
    persons: int
    #: rows per site, keyed by site name (empty when the contract has no site column)
    sites: dict[str, int] = field(hash=False)
    #: the governed Parquet file
    path: Path
    #: the governed columns, in order
    columns: tuple[str, ...]
    #: persons with rows at more than one site (a count, never who): federated training's
    #: per-site budgets assume each person is at one site, so such a dataset is refused
    cross_site_persons: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "persons": self.persons,
            "sites": dict(self.sites),
            "cross_site_persons": self.cross_site_persons,
            "path": str(self.path),
            "columns": list(self.columns),
        }


def pseudonym(identifier: str, secret: bytes) -> str:
    """The governed pseudonym of one identifier value: hex HMAC-SHA256 under ``secret``.

    Integer identifiers are pseudonymised as their decimal text.
    """
    _check_secret(secret)
    if not isinstance(identifier, str):
        raise SpecError("identifier", "must be text", "pass str(value) for integer identifiers")
    return hmac.digest(secret, _PSEUDONYM_DOMAIN + identifier.encode("utf-8"), "sha256").hex()


def ingest_file(
    source: str | Path, contract: SchemaContract, dest_dir: str | Path, secret: bytes
) -> IngestReport:
    """Ingest a CSV (``.csv``) or Parquet (``.parquet``/``.pq``) source file."""
    source = Path(source)
    _check_args(contract, secret)
    dest = _check_dest(Path(dest_dir))
    if not source.is_file():
        raise NotFoundError(f"source file not found: {source}")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        table = _read_csv(source, contract)
    elif suffix in (".parquet", ".pq"):
        table = _read_parquet(source, contract)
    else:
        raise SpecError("source", "has an unknown file type", "use a .csv or .parquet file")
    return _ingest(table, contract, dest, secret)


def ingest_table(
    table: pa.Table, contract: SchemaContract, dest_dir: str | Path, secret: bytes
) -> IngestReport:
    """Ingest an in-memory Arrow table (columns in any order, types convertible)."""
    if not isinstance(table, pa.Table):
        raise SpecError("table", "must be a pyarrow.Table", "pass pa.Table")
    _check_args(contract, secret)
    dest = _check_dest(Path(dest_dir))
    _check_column_names(list(table.column_names), contract)
    return _ingest(table, contract, dest, secret)


# --- argument checks --------------------------------------------------------------------------


def _check_secret(secret: object) -> None:
    if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_BYTES:
        raise SpecError(
            "secret",
            f"must be bytes, at least {MIN_SECRET_BYTES} long",
            "pass the zone's secret (32 random bytes)",
        )


def _check_args(contract: object, secret: object) -> None:
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load it with SchemaContract")
    _check_secret(secret)


def _check_dest(dest: Path) -> Path:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SpecError(
            "dest_dir",
            f"{dest} already exists and is not an empty directory",
            "ingest into a new directory (governed datasets are never overwritten)",
        )
    return dest


def _check_column_names(names: list[str], contract: SchemaContract) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise SchemaError(
                f"column {name!r} appears twice in the source; rename or remove one",
                column=name,
            )
        seen.add(name)
    declared = set(contract.names)
    for name in names:
        if name not in declared:
            raise SchemaError(
                f"column {name!r} is in the source but not declared in the contract; "
                "declare it with a role, or remove it from the source",
                column=name,
            )
    for name in contract.names:
        if name not in seen:
            raise SchemaError(
                f"column {name!r} is declared in the contract but missing from the source",
                column=name,
            )


# --- reading sources --------------------------------------------------------------------------


def _read_csv(source: Path, contract: SchemaContract) -> pa.Table:
    header = _csv_header(source)
    if not set(header) & set(contract.names):
        # without a header the first data row would be echoed below as "column names"
        raise SchemaError(
            "the CSV's first row names none of the contract's columns; CSV sources need a "
            "header row with the declared column names"
        )
    _check_column_names(header, contract)
    # Every column is read as raw bytes and converted by _conform, so every conversion error
    # is ours (column + row) and never pyarrow's (which quotes the value). Only an unquoted
    # empty field is missing; a quoted "" is an empty string.
    options = pacsv.ConvertOptions(
        column_types={name: pa.binary() for name in header},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )
    read = pacsv.ReadOptions(column_names=header, skip_rows=1)
    parse = pacsv.ParseOptions(newlines_in_values=True)
    failed = False
    try:
        table = pacsv.read_csv(
            source, read_options=read, parse_options=parse, convert_options=options
        )
    except _CAST_ERRORS:
        failed = True
    if failed:  # raised outside the except block so pyarrow's message is not even __context__
        raise _csv_structure_error(source, len(header))
    return table


def _csv_header(source: Path) -> list[str]:
    """The header row, decoded on its own (a bad byte further down is reported by row later)."""
    with source.open("rb") as handle:
        first = handle.readline()
    header: list[str] | None = None
    try:
        header = next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")]), None)
    except (UnicodeDecodeError, csv.Error):
        header = None
    if not header:
        raise SchemaError("the CSV source has no readable header row (UTF-8, comma-separated)")
    return header


def _csv_structure_error(source: Path, n_columns: int) -> SchemaError:
    """Find the first malformed CSV record ourselves; pyarrow's parse errors quote the row."""
    row = 0
    problem = ""
    try:
        with source.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
            reader = csv.reader(handle, strict=True)
            next(reader, None)
            for record in reader:
                row += 1
                if len(record) != n_columns:
                    problem = f"has {len(record)} fields where the header has {n_columns}"
                    break
    except csv.Error:
        row += 1
        problem = "has broken quoting"
    if problem:
        return SchemaError(f"CSV data row {row} {problem}", row=row)
    return SchemaError("the CSV source could not be parsed (check quoting and field counts)")


def _read_parquet(source: Path, contract: SchemaContract) -> pa.Table:
    failed = False
    try:
        names = list(pq.read_schema(source).names)
    except (*_CAST_ERRORS, OSError):
        failed = True
    if failed:
        raise SchemaError("the Parquet source is not a readable Parquet file")
    _check_column_names(names, contract)
    try:
        table = pq.read_table(source, columns=list(contract.names))
    except (*_CAST_ERRORS, OSError):
        failed = True
    if failed:
        raise SchemaError("the Parquet source could not be decoded (damaged file?)")
    return table


# --- converting and checking ------------------------------------------------------------------


def _first_failing(array: pa.Array, ok: Callable[[pa.Array], bool]) -> int:
    """Index of the first element on which the elementwise check ``ok`` fails.

    Halving search: the failing element is in the left half or else in the right, so the
    total work is about twice one pass over the array.
    """
    lo, hi = 0, len(array)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(array.slice(lo, mid - lo)):
            lo = mid
        else:
            hi = mid
    return lo


def _castable(target: pa.DataType) -> Callable[[pa.Array], bool]:
    def ok(array: pa.Array) -> bool:
        try:
            pc.cast(array, target, safe=True)
        except _CAST_ERRORS:
            return False
        return True

    return ok


def _cast_or_locate(
    column: pa.ChunkedArray, target: pa.DataType, spec: ColumnSpec, what: str
) -> pa.ChunkedArray:
    problem: type[Exception] | None = None
    try:
        return pc.cast(column, target, safe=True)
    except _CAST_ERRORS as exc:
        problem = type(exc)
    # raised outside the except block: pyarrow's message (which quotes the value) must not
    # travel even as the new error's __context__
    if problem is pa.ArrowNotImplementedError:
        raise SchemaError(
            f"column {spec.name!r}: its source type cannot be converted to the declared type "
            f"{spec.type} (fix the contract's type or the source)",
            column=spec.name,
        )
    index = _first_failing(column.combine_chunks(), _castable(target))
    raise SchemaError(
        f"column {spec.name!r}: data row {index + 1} {what}",
        column=spec.name,
        row=index + 1,
    )


def _conform(column: pa.ChunkedArray, spec: ColumnSpec) -> pa.ChunkedArray:
    """Convert one source column to its declared type, naming column and row on failure."""
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        # CSV bytes: first they must be text at all
        column = _cast_or_locate(column, pa.string(), spec, "is not valid UTF-8 text")
    target = spec.arrow_type
    if column.type == target:
        return column
    return _cast_or_locate(column, target, spec, f"does not parse as the declared type {spec.type}")


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true element of a boolean mask (nulls count as false), or -1."""
    found = pc.index(pc.fill_null(mask, False), True).as_py()
    return -1 if found is None else int(found)


def _check_values(column: pa.ChunkedArray, spec: ColumnSpec) -> None:
    name = spec.name
    if not spec.is_nullable and column.null_count:
        row = _first_true(pc.is_null(column)) + 1
        why = (
            f"{spec.role.value} values can never be missing"
            if spec.role in (Role.IDENTIFIER, Role.SITE, Role.LABEL)
            else "the column is declared nullable = false"
        )
        raise SchemaError(
            f"column {name!r}: data row {row} is missing, but {why}", column=name, row=row
        )
    if spec.role in (Role.IDENTIFIER, Role.SITE) and spec.type == "string":
        row = _first_true(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)) + 1
        if row:
            raise SchemaError(
                f"column {name!r}: data row {row} is blank; a {spec.role.value} must name something",
                column=name,
                row=row,
            )
    if spec.is_float:
        row = _first_true(pc.is_nan(column)) + 1
        if row:
            raise SchemaError(
                f"column {name!r}: data row {row} is NaN; write a missing value as an empty field",
                column=name,
                row=row,
            )
    low, high = spec.min, spec.max
    if spec.role is Role.LABEL and spec.is_integer and low is None and high is None:
        # an integer label without a declared domain is a 0/1 outcome (connectors.schema):
        # a 2 must not slip in here and be clipped to 1 later
        low, high = 0.0, 1.0
    if low is not None and high is not None:
        outside = pc.or_(pc.less(column, low), pc.greater(column, high))
        row = _first_true(outside) + 1
        if row:
            raise SchemaError(
                f"column {name!r}: data row {row} lies outside the declared domain "
                f"[{low:g}, {high:g}] (correct the row or widen the contract's domain)",
                column=name,
                row=row,
            )


def _check_unique(codes: np.ndarray, n_distinct: int, name: str) -> None:
    """With rows_per_person = "one", a repeated identifier is a contract breach."""
    if n_distinct == codes.size:
        return
    # dictionary codes are handed out in order of first appearance, so a row repeats an
    # earlier identifier exactly when its code is not above every code before it
    running = np.maximum.accumulate(codes)
    row = int(np.flatnonzero(codes[1:] <= running[:-1])[0]) + 2
    raise SchemaError(
        f"column {name!r}: data row {row} repeats an earlier identifier, but the contract "
        'says rows_per_person = "one" (declare "many" if people have several rows)',
        column=name,
        row=row,
    )


def _pseudonyms(distinct: pa.Array, secret: bytes) -> pa.Array:
    """Pseudonym of each distinct identifier (hashed once each, however many rows it has)."""
    key = bytes(secret)
    return pa.array(
        [
            hmac.digest(key, _PSEUDONYM_DOMAIN + value.encode("utf-8"), "sha256").hex()
            for value in distinct.to_pylist()
        ],
        pa.string(),
    )


def _ingest(table: pa.Table, contract: SchemaContract, dest: Path, secret: bytes) -> IngestReport:
    columns: dict[str, pa.ChunkedArray] = {}
    for spec in contract.columns:
        if spec.role is Role.DIRECT_IDENTIFIER:
            continue  # dropped unread: no conversion, no checks, no copy
        column = _conform(table.column(spec.name), spec)
        _check_values(column, spec)
        columns[spec.name] = column
    n = table.num_rows

    id_name, site_name = contract.identifier, contract.site
    persons = n
    if id_name is not None:
        ids = columns[id_name].combine_chunks()
        if contract.column(id_name).is_integer:
            ids = pc.cast(ids, pa.string())
        encoded = pc.dictionary_encode(ids)
        persons = len(encoded.dictionary)
        if contract.rows_per_person is RowsPerPerson.ONE:
            _check_unique(np.asarray(encoded.indices), persons, id_name)
        pseudonyms = pc.take(_pseudonyms(encoded.dictionary, secret), encoded.indices)
        columns[id_name] = pa.chunked_array([pseudonyms])

    governed_schema = contract.governed_arrow_schema()
    governed = pa.Table.from_arrays(
        [columns[f.name] for f in governed_schema], schema=governed_schema
    )
    sort_keys = [(k, "ascending") for k in (site_name, id_name) if k is not None]
    if sort_keys:
        governed = governed.take(pc.sort_indices(governed, sort_keys=sort_keys))

    if site_name is not None:
        counts = pc.value_counts(governed.column(site_name))
        sites = dict(
            sorted(
                zip(
                    counts.field("values").to_pylist(),
                    counts.field("counts").to_pylist(),
                    strict=True,
                )
            )
        )
    else:
        sites = {}
    cross_site = _cross_site_persons(governed, id_name, site_name)
    metadata = {
        "layout": LAYOUT_VERSION,
        "contract": contract.to_dict(),
        "rows": n,
        "persons": persons,
        "sites": sites,
        "cross_site_persons": cross_site,
    }
    # one slice per site, in storage order (the whole table when there is no site column)
    slices = list(sites.values()) if sites else [n]
    path = _write_atomically(governed, dest, slices, metadata, id_name)
    return IngestReport(
        rows=n,
        persons=persons,
        sites=sites,
        path=path,
        columns=tuple(governed_schema.names),
        cross_site_persons=cross_site,
    )


def _cross_site_persons(table: pa.Table, id_name: str | None, site_name: str | None) -> int:
    """How many persons have rows at more than one site (0 without both columns)."""
    if id_name is None or site_name is None or table.num_rows == 0:
        return 0
    per_person = table.group_by(id_name).aggregate([(site_name, "count_distinct")])
    sites_each = per_person.column(f"{site_name}_count_distinct")
    return int(pc.sum(pc.greater(sites_each, 1)).as_py() or 0)


def _write_atomically(
    governed: pa.Table,
    dest: Path,
    slices: list[int],
    metadata: dict[str, object],
    id_name: str | None,
) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.ingest-", dir=dest.parent))
    try:
        target = tmp / DATA_FILE
        schema = governed.schema.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
        # pseudonyms are all distinct: a dictionary page for them would only be discarded
        dictionary_columns = [n for n in governed.column_names if n != id_name]
        with pq.ParquetWriter(
            target,
            schema,
            compression="snappy",
            use_dictionary=dictionary_columns,
            write_statistics=True,
        ) as writer:
            start = 0
            # one write per site: a row group never spans two sites (see the module docstring)
            for count in slices:
                writer.write_table(governed.slice(start, count), row_group_size=ROW_GROUP_ROWS)
                start += count
        with target.open("rb") as handle:
            os.fsync(handle.fileno())
        if dest.exists():
            dest.rmdir()  # empty (checked before any work); rename replaces no directory
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BackendError(
            f"could not write the governed dataset at {dest}: {exc.strerror}", retryable=True
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)
    return dest / DATA_FILE


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open directories; the rename already happened
    try:
        os.fsync(fd)
    except OSError:
        pass  # best effort: durability of the directory entry, not correctness
    finally:
        os.close(fd)
