"""Ingest's conversion and contract checks, one source column at a time.

``_conform`` converts a column to its declared Arrow type; ``_check_values`` then refuses a
null identifier, site or label (or any column declared ``nullable = false``), a blank
identifier or site, NaN in a float column and numbers outside the declared ``[min, max]``;
``_check_unique`` refuses a repeated identifier when the contract says
``rows_per_person = "one"``. Every refusal is a ``SchemaError`` naming the column and the
1-based data row; none quotes the value, and pyarrow's own messages (which do) are never
chained onto it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import SchemaError

_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


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
