"""Ingest's source files: a steward's CSV or Parquet read into an Arrow table, unconverted.

The source's columns must be exactly the contract's (``_check_column_names``): declared
columns that are missing and undeclared extra columns are refused together, by name. CSV is read
as raw bytes, every column, so that every conversion error is ours (column + row, from
``connectors.ingest_checks``) and never pyarrow's, which quotes the offending value; a CSV
that does not even parse is located by our own record count, for the same reason.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from connectors.ingest_checks import _CAST_ERRORS
from connectors.schema import SchemaContract
from foundation.errors import SchemaError


def _check_column_names(names: list[str], contract: SchemaContract) -> None:
    """Every naming problem at once: repeated, undeclared and missing columns."""
    seen: set[str] = set()
    repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
    declared = set(contract.names)
    extra = [n for n in dict.fromkeys(names) if n not in declared]
    missing = [n for n in contract.names if n not in seen]
    problems = []
    if repeated:
        problems.append(
            f"column {_names(repeated)} appears twice in the source; rename or remove one"
        )
    if extra:
        problems.append(
            f"column {_names(extra)} is in the source but not declared in the contract; "
            "declare it with a role, or remove it from the source"
        )
    if missing:
        problems.append(
            f"column {_names(missing)} is declared in the contract but missing from the source"
        )
    if problems:
        first = (repeated or extra or missing)[0]
        raise SchemaError("; ".join(problems), column=first)


def _names(names: list[str]) -> str:
    # column names are the contract's and the header's, not row values
    return ", ".join(repr(n) for n in names)


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
