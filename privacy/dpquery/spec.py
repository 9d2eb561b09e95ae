"""A DP query as an analyst asks it (``QuerySpec``), and the checks against the contract.

A spec says what to compute (``kind``, ``column``, ``by``, ``quantiles``, ``bins``) and the
total epsilon it may spend; the engine (``privacy.dpquery.engine``) decides everything else
(bounds, groups, bins, candidates) from the schema contract alone. The spec validates itself
on construction, so one that exists is well formed; ``check_against`` adds the checks that
need the contract. Errors are ``SpecError`` naming the field (``query.column``) and the fix,
never a data value (a spec holds no data: only names and parameters).

``key`` is the sha256 of the canonical JSON of ``to_dict``: equal specs have equal keys, so a
repeated query finds the released answer (``sandbox.query_releases``) instead of drawing
fresh noise an analyst could average away. Canonical means: epsilon as a float, quantile
levels sorted, and only the fields a kind uses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import NotFoundError, SpecError

#: the largest epsilon one query may spend: above it the noise protects next to nothing
MAX_EPSILON = 10.0
#: the smallest: below it the noise (scale sensitivity/epsilon) drowns any answer, and the
#: integer noise of a count could run into the int64 range
MIN_EPSILON = 1e-3
MAX_QUANTILES = 9
MIN_BINS, MAX_BINS, DEFAULT_BINS = 2, 100, 10
#: group and bin labels the engine adds beside the declared categories (see ``cells``)
OTHER, MISSING = "(other)", "(missing)"

_KEYS = ("dataset", "kind", "epsilon", "column", "by", "quantiles", "bins")
_REQUIRED = ("dataset", "kind", "epsilon")
_MAX_NAME_CHARS = 200


class QueryKind(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    HISTOGRAM = "histogram"
    QUANTILES = "quantiles"


#: kinds that read a value column; count reads none (it counts rows)
_NEEDS_COLUMN = frozenset({QueryKind.SUM, QueryKind.MEAN, QueryKind.HISTOGRAM, QueryKind.QUANTILES})
#: kinds that may be grouped: a histogram or quantiles per group is not offered (yet)
_GROUPABLE = frozenset({QueryKind.COUNT, QueryKind.SUM, QueryKind.MEAN})
_SHOW = "see `sandbox dataset show`"


def _is_number(value: object) -> bool:
    # bool is an int in Python: `epsilon = true` must not pass as 1
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuerySpec:
    dataset: str
    kind: QueryKind
    #: the whole query's epsilon (pure DP: delta is 0), split over its parts by the engine
    epsilon: float
    #: the value column; required for sum, mean, histogram and quantiles, refused for count
    column: str | None = None
    #: group by this column's declared categories (count, sum and mean only)
    by: str | None = None
    #: kind quantiles only: the levels, each strictly inside (0, 1); kept sorted
    quantiles: tuple[float, ...] = ()
    #: histogram of a numeric column: equal-width bins over the declared [min, max]
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise SpecError("query.dataset", "must be a dataset name", "pass e.g. cohort")
        if len(self.dataset) > _MAX_NAME_CHARS or self.dataset != self.dataset.strip():
            raise SpecError("query.dataset", "is not a valid dataset name", _SHOW)
        try:
            object.__setattr__(self, "kind", QueryKind(self.kind))
        except (ValueError, TypeError):
            raise SpecError(
                "query.kind", "is not a known kind", "use one of " + ", ".join(QueryKind)
            ) from None
        self._check_epsilon()
        for name in ("column", "by"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SpecError(f"query.{name}", "must be a column name", _SHOW)
        kind = self.kind
        if kind is QueryKind.COUNT and self.column is not None:
            raise SpecError(
                "query.column", "count counts rows and takes no column", "leave column out"
            )
        if kind in _NEEDS_COLUMN and self.column is None:
            raise SpecError("query.column", f"{kind} needs a column", "name the column")
        if self.by is not None:
            if kind not in _GROUPABLE:
                raise SpecError(
                    "query.by", f"{kind} cannot be grouped", "leave by out (count, sum, mean)"
                )
            if self.by == self.column:
                raise SpecError("query.by", "is the column itself", "group by another column")
        self._check_quantiles()
        self._check_bins()

    def _check_epsilon(self) -> None:
        eps = self.epsilon
        if not _is_number(eps) or not math.isfinite(float(eps)):
            raise SpecError("query.epsilon", "must be a number", "pass e.g. 0.5")
        eps = float(eps)
        if not MIN_EPSILON <= eps <= MAX_EPSILON:
            raise SpecError(
                "query.epsilon",
                f"must lie in [{MIN_EPSILON:g}, {MAX_EPSILON:g}]",
                "pass e.g. 0.5",
            )
        object.__setattr__(self, "epsilon", eps)

    def _check_quantiles(self) -> None:
        levels = self.quantiles
        if isinstance(levels, str) or not isinstance(levels, tuple | list):
            raise SpecError("query.quantiles", "must be a list of levels", "pass e.g. [0.5]")
        if self.kind is not QueryKind.QUANTILES:
            if levels:
                raise SpecError(
                    "query.quantiles", f"only kind quantiles takes levels, not {self.kind}", ""
                )
            object.__setattr__(self, "quantiles", ())
            return
        if not levels:
            raise SpecError("query.quantiles", "lists no level", "pass e.g. [0.25, 0.5, 0.75]")
        if len(levels) > MAX_QUANTILES:
            raise SpecError(
                "query.quantiles", f"lists more than {MAX_QUANTILES} levels", "ask fewer"
            )
        out = []
        for q in levels:
            if not _is_number(q) or not 0.0 < float(q) < 1.0:
                raise SpecError(
                    "query.quantiles", "each level must lie strictly in (0, 1)", "e.g. 0.5"
                )
            out.append(float(q))
        if len(set(out)) != len(out):
            raise SpecError("query.quantiles", "lists a level twice", "remove the repeat")
        object.__setattr__(self, "quantiles", tuple(sorted(out)))

    def _check_bins(self) -> None:
        bins = self.bins
        if isinstance(bins, bool) or not isinstance(bins, int):
            raise SpecError("query.bins", "must be a whole number", f"pass e.g. {DEFAULT_BINS}")
        if not MIN_BINS <= bins <= MAX_BINS:
            raise SpecError(
                "query.bins", f"must lie in {MIN_BINS}..{MAX_BINS}", f"pass e.g. {DEFAULT_BINS}"
            )
        if self.kind is not QueryKind.HISTOGRAM and bins != DEFAULT_BINS:
            raise SpecError("query.bins", f"only a histogram takes bins, not {self.kind}", "")

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe and canonical: only the fields this kind uses."""
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "kind": self.kind.value,
            "epsilon": self.epsilon,
        }
        if self.column is not None:
            out["column"] = self.column
        if self.by is not None:
            out["by"] = self.by
        if self.kind is QueryKind.QUANTILES:
            out["quantiles"] = list(self.quantiles)
        if self.kind is QueryKind.HISTOGRAM:
            out["bins"] = self.bins
        return out

    @classmethod
    def from_dict(cls, data: object) -> QuerySpec:
        if not isinstance(data, Mapping):
            raise SpecError("query", "must be an object", "pass {dataset, kind, epsilon, ...}")
        for key in data:
            if key not in _KEYS:
                field = f"query.{key}" if isinstance(key, str) and len(key) <= 64 else "query"
                raise SpecError(field, "is not a known field", "use only " + ", ".join(_KEYS))
        for key in _REQUIRED:
            if key not in data:
                raise SpecError(f"query.{key}", "is missing", f"add {key}")
        quantiles = data.get("quantiles", ())
        if isinstance(quantiles, list):
            quantiles = tuple(quantiles)
        bins = data.get("bins", DEFAULT_BINS)
        return cls(
            dataset=data["dataset"],
            kind=data["kind"],
            epsilon=data["epsilon"],
            column=data.get("column"),
            by=data.get("by"),
            quantiles=quantiles,
            bins=bins,
        )

    def key(self) -> str:
        """The cache key of "the same query again": sha256 of the canonical JSON."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the checks that need the contract -------------------------------------------------------
def _declared(contract: SchemaContract, name: str, field: str) -> ColumnSpec:
    try:
        col = contract.column(name)
    except NotFoundError:
        raise SpecError(field, f"{name!r} is not a column of the dataset", _SHOW) from None
    if col.role in (Role.IDENTIFIER, Role.DIRECT_IDENTIFIER):
        raise SpecError(field, f"{name!r} is an {col.role.value} column", "query another column")
    return col


def _has_bounds(col: ColumnSpec) -> bool:
    return col.is_numeric and col.min is not None and col.max is not None


def _check_vocabulary(col: ColumnSpec, field: str) -> None:
    # the engine adds these two cells beside the declared ones; a category of the same name
    # would make two cells share a label
    if col.categories is not None and {OTHER, MISSING} & set(col.categories):
        raise SpecError(
            field,
            f"{col.name!r} declares a category named {OTHER} or {MISSING}",
            "ask the steward to rename it",
        )


def check_against(spec: QuerySpec, contract: SchemaContract) -> None:
    """Refuse what the contract cannot answer without reading data (``SpecError``)."""
    if spec.column is not None:
        col = _declared(contract, spec.column, "query.column")
        if col.is_temporal:
            raise SpecError(
                "query.column",
                f"{col.name!r} is a date column; DP queries do not support dates yet",
                "query a numeric or categorical column",
            )
        if spec.kind in (QueryKind.SUM, QueryKind.MEAN, QueryKind.QUANTILES):
            if not _has_bounds(col):
                raise SpecError(
                    "query.column",
                    f"{spec.kind} needs a numeric column with a declared min and max; "
                    f"{col.name!r} has none",
                    "query a numeric column with declared bounds (" + _SHOW + ")",
                )
        if spec.kind is QueryKind.HISTOGRAM:
            if col.categories is not None:
                _check_vocabulary(col, "query.column")
                if spec.bins != DEFAULT_BINS:
                    raise SpecError(
                        "query.bins",
                        f"{col.name!r} is categorical: its cells are its declared categories",
                        "leave bins out",
                    )
            elif not _has_bounds(col):
                raise SpecError(
                    "query.column",
                    f"a histogram needs declared categories or a declared min and max; "
                    f"{col.name!r} has neither",
                    _SHOW,
                )
    if spec.by is not None:
        by = _declared(contract, spec.by, "query.by")
        if by.categories is None:
            raise SpecError(
                "query.by",
                f"{by.name!r} has no declared categories (groups come only from the contract)",
                "group by a categorical column or the site column (" + _SHOW + ")",
            )
        _check_vocabulary(by, "query.by")


def columns_needed(spec: QuerySpec) -> list[str]:
    """The columns the service reads for ``spec`` (value column, then group column)."""
    return [name for name in (spec.column, spec.by) if name is not None]
