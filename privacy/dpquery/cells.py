"""The cells a query's noisy vector has: groups and histogram bins, from the contract alone.

A noisy vector may only have cells known before reading a row: a group or bin that appears
because a value appears in the data would itself release that value. So every label here
comes from the contract:

- a column with declared ``categories``: one cell per category, in declared order, then
  ``(other)`` (ingest keeps values outside the vocabulary: they map to "other", as in
  preprocessing), then ``(missing)`` when the column may be null;
- a numeric column with declared ``min``/``max``: ``bins`` equal-width bins over [min, max]
  (log-spaced, equal-width in ``log(1 + x)``, when the contract declares ``scale = "log"``),
  labelled ``[lo, hi)`` (the last ``[lo, hi]``), values clamped into the range first, then
  ``(missing)`` when the column may be null.

``codes`` maps each row to its cell index (-1 for a row in no cell: a null in a column the
contract says is never null; dropping a row only lowers a sensitivity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.scale_arrays import scale_edges
from connectors.scales import Scale
from connectors.schema_columns import ColumnSpec
from foundation.errors import SpecError
from privacy.dpquery.spec import MISSING, OTHER


@dataclass(frozen=True)
class Cells:
    column: str
    labels: tuple[str, ...]
    #: declared categories (a categorical column), else ()
    categories: tuple[str, ...] = ()
    #: bin edges (a numeric column: bins + 1 of them), else ()
    edges: tuple[float, ...] = ()
    has_missing: bool = False

    @property
    def size(self) -> int:
        return len(self.labels)

    def codes(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Each row's cell index (int64), -1 where a row belongs to no cell."""
        if self.categories:
            return self._category_codes(values)
        return self._bin_codes(values)

    def _category_codes(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        k = len(self.categories)
        if pa.types.is_dictionary(values.type):
            values = values.cast(pa.string())
        found = pc.index_in(values, value_set=pa.array(self.categories, pa.string()))
        codes = np.asarray(found.fill_null(k).to_numpy(zero_copy_only=False), dtype=np.int64)
        # index_in gives null both for a null row and for a value outside the vocabulary
        is_null = np.asarray(pc.is_null(values).to_numpy(zero_copy_only=False), dtype=bool)
        codes[is_null] = k + 1 if self.has_missing else -1
        return codes

    def _bin_codes(self, values: pa.ChunkedArray | pa.Array) -> np.ndarray:
        x = numeric_values(values)
        lo, hi = self.edges[0], self.edges[-1]
        missing = np.isnan(x)
        clamped = np.clip(np.where(missing, lo, x), lo, hi)
        # the same float edges the labels show: a value on an inner edge opens the next bin
        codes = np.searchsorted(np.asarray(self.edges[1:-1]), clamped, side="right")
        codes = codes.astype(np.int64)
        codes[missing] = len(self.edges) - 1 if self.has_missing else -1
        return codes


def numeric_values(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64, NaN for null (ingest refuses NaN, so NaN means null)."""
    # safe=False: a safe cast's error would quote the value that did not fit
    as_float = pc.cast(values, pa.float64(), safe=False)
    return np.asarray(as_float.to_numpy(zero_copy_only=False), dtype=np.float64)


def category_cells(col: ColumnSpec) -> Cells:
    cats = tuple(col.categories or ())
    labels = (*cats, OTHER, *((MISSING,) if col.is_nullable else ()))
    return Cells(col.name, labels, categories=cats, has_missing=col.is_nullable)


def bounds(col: ColumnSpec) -> tuple[float, float]:
    """The declared [min, max] (``check_against`` has made sure there is one)."""
    if col.min is None or col.max is None:
        raise SpecError("query.column", f"{col.name!r} has no declared min and max", "")
    return float(col.min), float(col.max)


def _label(x: float, digits: int) -> str:
    return f"{x:.{digits}g}"


def bin_note(col: ColumnSpec, bins: int) -> str:
    """How ``bin_cells`` spreads ``bins`` bins over the column's declared range."""
    lo, hi = bounds(col)
    if col.scale is Scale.LOG:
        how = "log-spaced bins (equal width in log(1 + x), inner edges rounded)"
    else:
        how = "equal-width bins"
    return f"{bins} {how} over the declared [{lo:g}, {hi:g}]"


def _rounded(edges: list[float], lo: float, hi: float) -> tuple[float, ...]:
    """Log-spaced inner edges rounded to the fewest significant digits (3 or more) that keep
    them strictly increasing inside (lo, hi), so the labels stay short; the edges stay a
    function of the contract alone."""
    for digits in range(3, 18):
        inner = [float(f"{e:.{digits}g}") for e in edges[1:-1]]
        out = (lo, *inner, hi)
        if all(a < b for a, b in zip(out, out[1:], strict=False)):
            return out
    return (lo, *edges[1:-1], hi)


def bin_cells(col: ColumnSpec, bins: int) -> Cells:
    lo, hi = bounds(col)
    edges = tuple(float(e) for e in scale_edges(lo, hi, bins, col.scale))
    if col.scale is Scale.LOG:
        edges = _rounded(list(edges), lo, hi)
    # short labels, unless the range is so narrow that they would collide
    digits = 10
    while len({_label(e, digits) for e in edges}) < len(edges) and digits < 17:
        digits += 1
    names = [_label(e, digits) for e in edges]
    labels = [f"[{names[i]}, {names[i + 1]})" for i in range(bins - 1)]
    labels.append(f"[{names[-2]}, {names[-1]}]")
    if col.is_nullable:
        labels.append(MISSING)
    return Cells(col.name, tuple(labels), edges=edges, has_missing=col.is_nullable)
