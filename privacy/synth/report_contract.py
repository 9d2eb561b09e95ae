"""The schema contract as the synthetic-data report reads tables: SDV / sdmetrics metadata,
and real and synthetic rows in the contract's representation.

Every preprocessing parameter comes from the contract, never from rows: ``contract_metadata``
maps column types to sdtypes, ``contract_frame`` turns a table into pandas with strings outside
a column's declared vocabulary as the one value ``OTHER``, ``binary_labels`` reads a 0/1 label
(refusing anything else by row number), and ``require_columns`` names the first missing column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import SchemaError, SpecError

#: the table name in the metadata dictionary given to sdmetrics
TABLE_NAME = "data"
#: what a string outside a column's declared vocabulary becomes (schema.py: "anything else
#: maps to 'other'"); the synthesizers decode their "other" code to the same string
OTHER = "other"


def _sdtype(spec: ColumnSpec) -> str:
    if spec.role is Role.IDENTIFIER:
        return "id"
    if spec.role is Role.LABEL:
        # a class, not a quantity: compared by TVComplement / contingency tables
        return "categorical"
    if spec.type == "bool":
        return "boolean"
    if spec.is_temporal:
        return "datetime"
    if spec.is_integer and spec.min is not None and spec.max is not None:
        if math.floor(spec.max) - math.ceil(spec.min) <= 1:
            return "categorical"  # a 0/1 flag is a category (as privacy.synth.baselines says)
    if spec.is_numeric:
        return "numerical"
    return "categorical"


def contract_metadata(
    contract: SchemaContract, columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """SDV's single-table metadata dictionary for ``columns`` (default: all but direct ids).

    Types map to sdtypes: integer and float -> numerical, except integers whose declared
    domain holds at most two values (0/1 flags) -> categorical; string -> categorical; bool ->
    boolean; date/timestamp -> datetime; the identifier -> id (the primary key when each
    person has one row); the label -> categorical. Direct identifiers are never included.
    ``sdv.metadata.Metadata.load_from_dict`` accepts the result; sdmetrics reads it as is.
    """
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    if columns is None:
        columns = [c.name for c in contract.columns if c.role is not Role.DIRECT_IDENTIFIER]
    out: dict[str, Any] = {}
    for name in columns:
        spec = contract_column(contract, name, "columns")
        if spec.role is Role.DIRECT_IDENTIFIER:
            raise SpecError(
                "columns",
                f"{name!r} is a direct identifier",
                "direct identifiers never leave ingest: remove it",
            )
        meta: dict[str, Any] = {"sdtype": _sdtype(spec)}
        if spec.type == "date32":
            meta["datetime_format"] = "%Y-%m-%d"
        out[name] = meta
    table: dict[str, Any] = {"columns": out}
    ident = contract.identifier
    if ident is not None and ident in out and contract.rows_per_person.value == "one":
        table["primary_key"] = ident
    return {"METADATA_SPEC_VERSION": "V1", "tables": {TABLE_NAME: table}}


def contract_column(contract: SchemaContract, name: object, field_name: str) -> ColumnSpec:
    if not isinstance(name, str) or name not in contract.names:
        shown = repr(name) if isinstance(name, str) else "a non-string entry"
        raise SpecError(
            field_name,
            f"{shown} is not a column of the schema contract",
            "use one of: " + ", ".join(contract.names),
        )
    return contract.column(name)


# --- tables in the contract's representation -------------------------------------------------


def contract_frame(
    table: pa.Table, columns: Sequence[str], contract: SchemaContract
) -> pd.DataFrame:
    """``columns`` of ``table`` as pandas, in the contract's terms.

    Numbers become float64 (float32 columns rounded through float32, so a float64 synthetic
    value and the stored float32 real value compare equal), nulls NaN/None, strings outside the
    declared vocabulary ``"other"`` (the contract's rule; it merges with a declared "other"),
    bools True/False/None, dates datetime64.
    """
    data: dict[str, Any] = {}
    for name in columns:
        spec = contract.column(name)
        column = table.column(name)
        if spec.is_numeric:
            values = _as_float(column, name)
            if spec.type == "float32":
                with np.errstate(over="ignore", invalid="ignore"):
                    values = values.astype(np.float32).astype(np.float64)
            data[name] = values
        elif spec.type == "bool":
            data[name] = pd.array(_as_bool(column, name), dtype="object")
        elif spec.is_temporal:
            data[name] = pd.to_datetime(column.to_pandas())
        else:
            cats = spec.categories
            strings = pc.cast(column, pa.string()) if column.type != pa.string() else column
            if cats is not None:
                known = pc.is_in(strings, value_set=pa.array(list(cats), pa.string()))
                strings = pc.if_else(
                    pc.or_kleene(known, pc.is_null(strings)),
                    strings,
                    pa.scalar(OTHER, pa.string()),
                )
            data[name] = strings.to_numpy(zero_copy_only=False).astype(object)
    return pd.DataFrame(data)


def _as_float(column: pa.ChunkedArray, name: str) -> np.ndarray:
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = pc.cast(column, t.value_type), t.value_type
    if pa.types.is_boolean(t):
        column = pc.cast(column, pa.int8())
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        raise SchemaError(
            f"column {name!r}: its type is not numeric (fix: give it the contract's type)",
            column=name,
        )
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _as_bool(column: pa.ChunkedArray, name: str) -> np.ndarray:
    t = column.type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        column = pc.not_equal(column, 0)
    elif not pa.types.is_boolean(t):
        raise SchemaError(
            f"column {name!r}: its type is not bool (fix: give it the contract's type)",
            column=name,
        )
    return np.asarray(column.to_pylist(), dtype=object)


def binary_labels(table: pa.Table, label: str, where: str) -> np.ndarray:
    """The label as 0/1 int8; a null or a value other than 0/1 is refused by row number."""
    column = table.column(label)
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    values = _as_float(column, label)
    bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))  # NaN (null) is not in the set
    if bad.size:
        row = int(bad[0]) + 1
        raise SchemaError(
            f"{where}: column {label!r}: row {row} is null or not 0/1 "
            "(fix: a binary label holds only 0 and 1)",
            column=label,
            row=row,
        )
    return values.astype(np.int8)


def require_columns(table: pa.Table, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise SchemaError(
            f"{where}: column {missing[0]!r} is missing "
            "(fix: the real and synthetic tables need every feature and the label)",
            column=missing[0],
        )
