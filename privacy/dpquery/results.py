"""What a DP query returns: ``Figure``s in a ``QueryAnswer``, and the ``QueryQuote`` before it.

Every number here is either a parameter (epsilon, scales, half-widths: from the contract and
the spec alone) or post-processing of OpenDP's noisy output, so all of it may be shown. The
dicts are JSON-safe and ``from_dict(to_dict())`` gives an equal object; the service stores
``QueryAnswer.to_dict()`` as the released answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from foundation.errors import SpecError
from privacy.dpquery.spec import QuerySpec

if TYPE_CHECKING:
    import pandas as pd

_FIGURE_KEYS = (
    "group",
    "statistic",
    "value",
    "noise_scale",
    "ci_low",
    "ci_high",
    "rank_error",
    "noise_scales",
)


def _optional(value: object, field: str) -> float | None:
    return None if value is None else _number(value, field)


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field, "must be a number", "re-export the answer")
    out = float(value)
    if not math.isfinite(out):
        raise SpecError(field, "must be finite", "re-export the answer")
    return out


@dataclass(frozen=True)
class Figure:
    """One released number.

    - ``group``: the ``by`` category (a declared one, or ``(other)``/``(missing)``), or None.
    - ``statistic``: ``count``, ``sum``, ``mean``, ``p<percent>`` (``p50``, ``p2.5``), or a
      histogram cell's label (a category, or ``[lo, hi)`` with the last bin ``[lo, hi]``).
    - ``noise_scale``: the Laplace scale b of the noise in this figure (counts, sums, cells);
      for a quantile the mechanism's scale s (in rows); for a mean the scale of the noisy
      sum divided by the noisy count (the mean's noise in the column's units, roughly: the
      interval accounts for both noises exactly).
    - ``ci_low``/``ci_high``: a 95% interval for the true value (None for quantiles).
    - ``rank_error`` (quantiles): with probability >= 95% the released value's score is within
      this many rows of the best candidate's (``privacy.dpquery.noise.quantile_rank_error``):
      the target rank lies within ``rank_error`` rows (plus the grid's own gap) of the rank
      of the released value.
    - ``noise_scales``: a figure made from more than one noisy release (a mean: the noisy
      sum's Laplace scale, then the noisy count's) lists each one's scale; otherwise empty.
    """

    group: str | None
    statistic: str
    value: float
    noise_scale: float
    ci_low: float | None
    ci_high: float | None
    rank_error: float | None = None
    noise_scales: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {key: getattr(self, key) for key in _FIGURE_KEYS}
        out["noise_scales"] = list(self.noise_scales)
        return out

    @classmethod
    def from_dict(cls, data: object) -> Figure:
        if not isinstance(data, Mapping) or set(data) - set(_FIGURE_KEYS):
            raise SpecError("answer.figures", "holds a malformed figure", "re-export the answer")
        group, statistic = data.get("group"), data.get("statistic")
        if group is not None and not isinstance(group, str):
            raise SpecError("answer.figures.group", "must be a string or null", "")
        if not isinstance(statistic, str):
            raise SpecError("answer.figures.statistic", "must be a string", "")
        scales = data.get("noise_scales", [])
        if not isinstance(scales, list):
            raise SpecError("answer.figures.noise_scales", "must be a list", "")
        return cls(
            group=group,
            statistic=statistic,
            value=_number(data.get("value"), "answer.figures.value"),
            noise_scale=_number(data.get("noise_scale"), "answer.figures.noise_scale"),
            ci_low=_optional(data.get("ci_low"), "answer.figures.ci_low"),
            ci_high=_optional(data.get("ci_high"), "answer.figures.ci_high"),
            rank_error=_optional(data.get("rank_error"), "answer.figures.rank_error"),
            noise_scales=tuple(_number(s, "answer.figures.noise_scales") for s in scales),
        )


@dataclass(frozen=True)
class QueryAnswer:
    spec: QuerySpec
    epsilon: float
    delta: float
    #: the contribution bound k the sensitivities used (rows per person)
    rows_per_person: int
    figures: tuple[Figure, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.spec.to_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "rows_per_person": self.rows_per_person,
            "figures": [f.to_dict() for f in self.figures],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: object) -> QueryAnswer:
        if not isinstance(data, Mapping):
            raise SpecError("answer", "must be an object", "re-export the answer")
        figures, notes = data.get("figures"), data.get("notes")
        if not isinstance(figures, list) or not isinstance(notes, list):
            raise SpecError("answer.figures", "figures and notes must be lists", "")
        if not all(isinstance(n, str) for n in notes):
            raise SpecError("answer.notes", "must be strings", "")
        k = data.get("rows_per_person")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SpecError("answer.rows_per_person", "must be a whole number >= 1", "")
        return cls(
            spec=QuerySpec.from_dict(data.get("query")),
            epsilon=_number(data.get("epsilon"), "answer.epsilon"),
            delta=_number(data.get("delta"), "answer.delta"),
            rows_per_person=k,
            figures=tuple(Figure.from_dict(f) for f in figures),
            notes=tuple(notes),
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per figure, columns as in ``Figure`` (a mean's ``noise_scales`` too, as a
        tuple: the frame is for reading, the dict for storing)."""
        import pandas as pd  # here: pandas costs ~0.5 s to import, and the CLI imports us

        rows = [{key: getattr(f, key) for key in _FIGURE_KEYS} for f in self.figures]
        return pd.DataFrame(rows, columns=list(_FIGURE_KEYS))


@dataclass(frozen=True)
class QueryQuote:
    """What a query costs and how noisy it is, from the spec and the contract alone."""

    spec: QuerySpec
    epsilon: float
    delta: float
    rows_per_person: int
    #: one per noisy release: what it measures, its mechanism, epsilon share, sensitivity,
    #: noise scale, cells, and its 95% half-width (or rank error, for a quantile)
    parts: tuple[dict[str, Any], ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.spec.to_dict(),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "rows_per_person": self.rows_per_person,
            "parts": [dict(p) for p in self.parts],
            "notes": list(self.notes),
        }
