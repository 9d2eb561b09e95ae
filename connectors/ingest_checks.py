"""Ingest's conversion and contract checks, one source column at a time, every row at once.

``prepare_column`` takes a raw source column through the declared cleaning
(``connectors.cleaning``), converts it to its declared Arrow type and checks its values;
``check_unique`` finds repeated identifiers when the contract says ``rows_per_person =
"one"``. Nothing stops at the first problem: each kind of problem in a column is one
``Violation`` (``connectors.ingest_findings``) with its count and first row numbers, and a row
that failed to convert is not reported again as missing. Refused: text that is not UTF-8 or
does not parse as the declared type; a missing identifier, site or label (or value in a column
declared ``nullable = false``); a blank identifier or site; NaN in a float column; a number
outside the declared ``[min, max]`` (unless ``outside`` says clip or null); a site outside its
declared categories (and, with ``outside = "reject"``, any category outside its vocabulary).
No message quotes a value, and pyarrow's own messages (which do) are never chained onto ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.cleaning import parse_dates, to_categories, to_missing
from connectors.cleaning_rules import Outside
from connectors.ingest_findings import Findings
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import SchemaError

_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


def _failing(array: pa.Array, ok: Callable[[pa.Array], bool]) -> np.ndarray:
    """Mask of the elements on which the elementwise check ``ok`` fails.

    Halving search: a slice that passes is done with, a failing one is split; the work is
    about (failures x log n) checks, each on a slice, plus one pass over the array.
    """
    bad = np.zeros(len(array), dtype=bool)
    stack = [(0, len(array))]
    while stack:
        lo, hi = stack.pop()
        if hi <= lo or ok(array.slice(lo, hi - lo)):
            continue
        if hi - lo == 1:
            bad[lo] = True
            continue
        mid = (lo + hi) // 2
        stack += [(mid, hi), (lo, mid)]
    return bad


def _castable(target: pa.DataType) -> Callable[[pa.Array], bool]:
    def ok(array: pa.Array) -> bool:
        try:
            pc.cast(array, target, safe=True)
        except _CAST_ERRORS:
            return False
        return True

    return ok


def _as_null(array: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), pa.scalar(None, array.type), array)


def _cast_all(
    array: pa.Array, target: pa.DataType, spec: ColumnSpec
) -> tuple[pa.Array, np.ndarray]:
    """Cast, making the rows that do not convert missing; returns them as a mask."""
    problem: type[Exception] | None = None
    try:
        return pc.cast(array, target, safe=True), np.zeros(len(array), dtype=bool)
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
    bad = _failing(array, _castable(target))
    return pc.cast(_as_null(array, bad), target, safe=True), bad


def _parse_problem(spec: ColumnSpec) -> tuple[str, str]:
    if spec.is_temporal and spec.date_format is not None:
        return (
            f"do not parse with the declared date_format {spec.date_format}",
            "correct the rows, or declare the text that means missing in na_values",
        )
    if spec.is_temporal:
        return (
            f"do not parse as the declared type {spec.type} (expected ISO 8601, e.g. 2024-03-31)",
            'declare date_format (e.g. date_format = "%d/%m/%Y"), or correct the rows',
        )
    return (
        f"do not parse as the declared type {spec.type}",
        "correct the rows, or declare the text that means missing in na_values",
    )


def prepare_column(
    raw: pa.ChunkedArray | pa.Array, spec: ColumnSpec, na_values: tuple[str, ...], found: Findings
) -> pa.Array:
    """One source column cleaned, converted and checked; problems go to ``found``."""
    column = raw.combine_chunks() if isinstance(raw, pa.ChunkedArray) else raw
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    reported = np.zeros(len(column), dtype=bool)  # rows already in a violation of this column
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        # CSV bytes: first they must be text at all
        column, bad = _cast_all(column, pa.string(), spec)
        found.violate(spec.name, bad, "are not valid UTF-8 text", "save the file as UTF-8")
        reported |= bad
    column = to_missing(column, spec, na_values, found)
    column = to_categories(column, spec, found)
    target = spec.arrow_type
    if column.type != target:
        if spec.date_format is not None and pa.types.is_string(column.type):
            column, bad = parse_dates(column, spec)
        else:
            column, bad = _cast_all(column, target, spec)
        problem, fix = _parse_problem(spec)
        found.violate(spec.name, bad & ~reported, problem, fix)
        reported |= bad
    return _check_values(column, spec, found, reported)


def _mask(array: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(array, False), dtype=bool)


def _check_values(
    column: pa.Array, spec: ColumnSpec, found: Findings, reported: np.ndarray
) -> pa.Array:
    name = spec.name
    if not spec.is_nullable and column.null_count:
        why = (
            f"{spec.role.value} values can never be missing"
            if spec.role in (Role.IDENTIFIER, Role.SITE, Role.LABEL)
            else "the column is declared nullable = false"
        )
        found.violate(
            name,
            _mask(pc.is_null(column)) & ~reported,
            f"are missing, but {why}",
            "fill them in the source, or leave those rows out",
        )
    if spec.role in (Role.IDENTIFIER, Role.SITE) and spec.type == "string":
        blank = _mask(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0))
        found.violate(
            name, blank, f"are blank; a {spec.role.value} must name something", "fill them in"
        )
    nan = _mask(pc.is_nan(column)) if spec.is_float else None
    if nan is not None:
        found.violate(
            name,
            nan,
            "are NaN",
            "write a missing value as an empty field (or list its text in na_values)",
        )
    column = _check_domain(column, spec, found)
    if spec.typical is not None and spec.is_numeric:
        low, high = spec.typical
        # NaN compares false both ways: neither below nor above, and not a value either
        values = len(column) - column.null_count - (int(nan.sum()) if nan is not None else 0)
        below = int(_mask(pc.less(column, low)).sum())
        above = int(_mask(pc.greater(column, high)).sum())
        found.cover(name, below, above, values)
    return _check_vocabulary(column, spec, found)


def _check_domain(column: pa.Array, spec: ColumnSpec, found: Findings) -> pa.Array:
    low, high = spec.min, spec.max
    if spec.role is Role.LABEL and spec.is_integer and low is None and high is None:
        # an integer label without a declared domain is a 0/1 outcome (connectors.schema):
        # a 2 must not slip in here and be clipped to 1 later
        low, high = 0.0, 1.0
    if low is None or high is None:
        return column
    outside = _mask(pc.or_(pc.less(column, low), pc.greater(column, high)))
    if not outside.any():
        return column
    if spec.outside is Outside.CLIP:
        found.clean(spec.name, "clipped", int(outside.sum()))
        if spec.is_integer:
            low, high = math.ceil(low), math.floor(high)
        bounded = pc.min_element_wise(pc.max_element_wise(column, low), high)
        return pc.cast(bounded, column.type, safe=False)
    if spec.outside is Outside.NULL:
        found.clean(spec.name, "nulled", int(outside.sum()))
        return _as_null(column, outside)
    found.violate(
        spec.name,
        outside,
        f"lie outside the declared domain [{low:g}, {high:g}]",
        'correct them, widen the domain, or declare outside = "clip" or "null"',
    )
    return column


def _check_vocabulary(column: pa.Array, spec: ColumnSpec, found: Findings) -> pa.Array:
    if spec.categories is None or not pa.types.is_string(column.type):
        return column
    known = pa.array(spec.categories, pa.string())
    outside = _mask(pc.invert(pc.is_in(column, value_set=known))) & _mask(pc.is_valid(column))
    if not outside.any():
        return column
    if spec.role is Role.SITE or spec.outside is Outside.REJECT:
        found.violate(
            spec.name,
            outside,
            "are not among the declared categories",
            'declare them, map their spellings with aliases (and normalize = "strip-lower"), '
            "or correct the rows",
        )
    elif spec.outside is Outside.NULL:
        found.clean(spec.name, "nulled", int(outside.sum()))
        return _as_null(column, outside)
    else:
        found.clean(spec.name, "other", int(outside.sum()))
    return column


def check_unique(codes: np.ndarray, n_distinct: int, name: str, found: Findings) -> None:
    """With rows_per_person = "one", a repeated identifier is a contract breach."""
    if n_distinct == codes.size:
        return
    # dictionary codes are handed out in order of first appearance, so a row repeats an
    # earlier identifier exactly when its code is not above every code before it
    running = np.maximum.accumulate(codes)
    repeats = np.zeros(codes.size, dtype=bool)
    repeats[1:] = codes[1:] <= running[:-1]
    found.violate(
        name,
        repeats,
        'repeat an earlier identifier, but the contract says rows_per_person = "one"',
        'declare rows_per_person = "many" if people have several rows',
    )
