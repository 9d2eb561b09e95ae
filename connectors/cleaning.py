"""Ingest's cleaning: what a contract declares about messy text, applied to one raw column.

The rules and their TOML keys are in ``connectors.cleaning_rules``. Here they run on a source
column before it is converted to its declared type: ``na_values`` become missing; category
text is matched against the declared categories and their ``aliases`` (ignoring case and
spaces with ``normalize = "strip-lower"``) and stored as the declared spelling; a date column
with a ``date_format`` is parsed with it. Each step counts what it changed, per column, into
``Findings.cleaned`` (counts only: a value never reaches a report or a message).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.cleaning_rules import match_key
from connectors.ingest_findings import Findings
from connectors.schema_columns import ColumnSpec


def to_missing(
    column: pa.Array, spec: ColumnSpec, na_values: tuple[str, ...], found: Findings
) -> pa.Array:
    """Text listed in the dataset's or the column's ``na_values`` becomes missing."""
    listed = tuple(dict.fromkeys((*na_values, *(spec.na_values or ()))))
    if not listed or not pa.types.is_string(column.type):
        return column
    hit = pc.fill_null(pc.is_in(column, value_set=pa.array(listed, pa.string())), False)
    n = int(pc.sum(hit).as_py() or 0)
    if not n:
        return column
    found.clean(spec.name, "na_values", n)
    return pc.if_else(hit, pa.scalar(None, column.type), column)


def to_categories(column: pa.Array, spec: ColumnSpec, found: Findings) -> pa.Array:
    """Category text as the declared spelling, by ``normalize`` and ``aliases``.

    Works on the distinct values (a dictionary encoding), so the cost is one pass over the
    rows plus one lookup per distinct spelling.
    """
    if spec.categories is None or (spec.normalize is None and spec.aliases is None):
        return column
    if not pa.types.is_string(column.type):
        return column
    norm = spec.normalize
    category_keys = {match_key(c, norm): c for c in spec.categories}
    lookup = dict(category_keys)
    for category, spellings in spec.aliases or ():
        for spelling in spellings:
            lookup[match_key(spelling, norm)] = category
    encoded = pc.dictionary_encode(column)
    values = encoded.dictionary.to_pylist()
    mapped = [lookup.get(match_key(v, norm), v) for v in values]
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(pc.is_null(encoded.indices), dtype=bool)
    per_value = np.bincount(indices[valid].astype(np.int64), minlength=len(values))
    normalized = aliased = 0
    for i, (before, after) in enumerate(zip(values, mapped, strict=True)):
        if before == after:
            continue
        if match_key(before, norm) in category_keys:
            normalized += int(per_value[i])
        else:
            aliased += int(per_value[i])
    if normalized:
        found.clean(spec.name, "normalized", normalized)
    if aliased:
        found.clean(spec.name, "aliased", aliased)
    return pc.take(pa.array(mapped, pa.string()), encoded.indices)


def parse_dates(column: pa.Array, spec: ColumnSpec) -> tuple[pa.Array, np.ndarray]:
    """A date or timestamp column's text parsed with its ``date_format``.

    Returns the converted column (failures missing) and the mask of rows that held text the
    format does not read.
    """
    assert spec.date_format is not None
    parsed = pc.strptime(column, format=spec.date_format, unit="s", error_is_null=True)
    failed = np.asarray(pc.and_(pc.is_null(parsed), pc.is_valid(column)), dtype=bool)
    # a date32 keeps the day; safe=False lets a parsed time of day go, as the format said
    return pc.cast(parsed, spec.arrow_type, safe=False), failed
