"""Values onto and off a column's declared scale (``connectors.scales.Scale``), in numpy:
bin edges equally spaced on the scale, each value's bin, and a value drawn inside a bin.

Preprocessing, dummy data, the synthesizers' bins and DP query histograms all call these,
so a column is binned and scaled the same way everywhere, from the contract alone.
"""

from __future__ import annotations

import math

import numpy as np

from connectors.scales import Scale


def to_scale(x: np.ndarray | float, scale: Scale) -> np.ndarray:
    """Values in the column's units -> the scale it is spread on (``log1p`` for log)."""
    return np.log1p(x) if scale is Scale.LOG else np.asarray(x, dtype=np.float64)


def from_scale(t: np.ndarray | float, scale: Scale) -> np.ndarray:
    """The inverse of :func:`to_scale` (``expm1`` for log)."""
    return np.expm1(t) if scale is Scale.LOG else np.asarray(t, dtype=np.float64)


def scale_edges(lo: float, hi: float, bins: int, scale: Scale) -> np.ndarray:
    """``bins + 1`` float64 edges over ``[lo, hi]``, equally spaced on ``scale``.

    Linear: ``lo + (hi - lo) * i / bins``; log: ``expm1`` of equally spaced points between
    ``log1p(lo)`` and ``log1p(hi)``. The ends are exactly ``lo`` and ``hi``.
    """
    if scale is Scale.LOG:
        a, b = math.log1p(lo), math.log1p(hi)
        edges = np.expm1(np.asarray([a + (b - a) * i / bins for i in range(bins + 1)]))
    else:
        edges = np.asarray([lo + (hi - lo) * i / bins for i in range(bins + 1)])
    edges[0], edges[-1] = lo, hi
    return edges


def bin_codes(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each value's bin (int64): clamped into [edges[0], edges[-1]] first; a value on an
    inner edge opens the next bin, and the last bin is closed."""
    clamped = np.clip(np.asarray(x, dtype=np.float64), edges[0], edges[-1])
    return np.searchsorted(edges[1:-1], clamped, side="right").astype(np.int64)


def draw_in_bins(codes: np.ndarray, edges: np.ndarray, scale: Scale, u: np.ndarray) -> np.ndarray:
    """A value inside each code's bin, at position ``u`` in [0, 1) of the bin on ``scale``
    (uniform ``u`` gives a draw uniform on the scale within the bin)."""
    lo, hi = edges[codes], edges[codes + 1]
    a, b = to_scale(lo, scale), to_scale(hi, scale)
    return np.clip(from_scale(a + u * (b - a), scale), lo, hi)
