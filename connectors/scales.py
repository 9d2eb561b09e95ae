"""A numeric column's declared scale (``scale = "linear" | "log"`` in the schema contract).

The steward declares ``scale = "log"`` for a heavy-tailed column (a lab value, a count, a
length of stay): on a linear scale over a wide declared domain the bulk of its values sits in
the first few percent of the range. Everything that scales or bins a numeric column follows
its scale, from the contract alone: preprocessing (``connectors.preprocess_steps``), dummy
data (``connectors.dummy``), the synthesizers' bins (``privacy.synth.codec``) and DP query
histograms (``privacy.dpquery.cells``).

``log`` means ``log(1 + x)`` (``np.log1p``): 0, common in counts and in values below a
detection limit, is allowed, and the declared ``min`` must be 0 or more
(``connectors.schema_columns`` checks it).

This module is the contract's word (``Scale``, ``parse_typical``) and imports no numpy: every
command reads contracts. Values onto and off a scale, bin edges and codes are
``connectors.scale_arrays``.
"""

from __future__ import annotations

import math
from enum import StrEnum


class Scale(StrEnum):
    """How a numeric column's declared domain [min, max] is spread."""

    #: by value: ``(x - min) / (max - min)``, equal-width bins (the default)
    LINEAR = "linear"
    #: by ``log(1 + x)``: ``(log1p(x) - log1p(min)) / (log1p(max) - log1p(min))``, bins of
    #: equal width in ``log1p`` (log-spaced); needs ``min >= 0``
    LOG = "log"


def parse_typical(
    value: object, *, numeric: bool, scalable: bool, lo: float | None, hi: float | None
) -> tuple[float, float] | str:
    """A column's ``typical = [low, high]`` as two floats, or the problem with it (a string).

    ``typical`` is where most of a column's values fall, as the steward knows it from a
    published reference range, not from the rows: preprocessing scales the column by it
    instead of by the whole domain, so a column whose domain is wide for safety (an age of
    0-120, a tumour of 0-200 mm) still spreads its values over the model's inputs. It lies
    within the declared domain; values outside it keep their distance (up to the domain's
    ends), they are not cut at it."""
    if not numeric or not scalable:
        return "is only allowed on a numeric feature or sensitive column"
    if lo is None or hi is None:
        return "needs a declared domain (min and max) around it"
    if isinstance(value, str) or not isinstance(value, list | tuple) or len(value) != 2:
        return "must be two numbers, [low, high]"
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return "must be two numbers, [low, high]"
    a, b = float(value[0]), float(value[1])
    if not (math.isfinite(a) and math.isfinite(b)) or not a < b:
        return "must be two finite numbers with low below high"
    if not lo <= a < b <= hi:
        return f"must lie within the declared domain [{lo:g}, {hi:g}]"
    return a, b
