"""The steps of a feature plan: how one contract column becomes model inputs.

``_step_for`` builds a ``FeatureStep`` from a ``ColumnSpec`` alone, never from rows:

* numeric feature (int or float type, declared ``min``/``max``) -> ``(x - min) / (max - min)``
  clipped to [0, 1]; a missing value (null or NaN) -> the declared ``fill`` (else the domain
  midpoint), scaled the same way, plus a ``NAME__missing`` indicator. An int 0/1 flag is a
  numeric feature with ``min = 0, max = 1``, so it comes out as 0/1 unchanged.
* numeric feature declared ``scale = "log"`` -> the same, on ``log(1 + x)``: the value is
  clamped into [min, max], then ``(log1p(x) - log1p(min)) / (log1p(max) - log1p(min))``, so
  min -> 0 and max -> 1 as on the linear path; a missing value -> the declared ``fill`` put
  through the same transform (else 0.5, the midpoint on the log scale), plus the indicator.
  Its step kind is ``log`` (a plan written before it never holds one).
* a numeric or log feature that declares ``typical = [low, high]`` (where most values fall,
  a published reference range) is scaled by that range instead of the whole domain: the
  value is clamped into [min, max], then ``low`` maps to -2 and ``high`` to 2 (on the
  column's scale; :data:`TYPICAL_SPAN`), so values outside the typical range keep their
  distance, up to the domain's image; the default fill is the typical range's midpoint (0).
  A reference range holds about 95% of values, mean +- 2 sd, so the feature reads like a
  z-score, the scale a competent analyst standardises to, without a statistic of the rows.
  (Plans released before this kept [0, 1]: a step without ``span`` reads back so.)
* bool feature -> 0/1; missing -> ``fill`` (else 0.5) plus ``NAME__missing``.
* string feature (declared ``categories``) -> one-hot ``NAME=CATEGORY`` per category, then
  ``NAME__other`` for anything outside the vocabulary and ``NAME__missing`` for nulls.

Columns with role feature, and site or sensitive columns that declare a domain or a
vocabulary, can be features (whether a researcher may use a sensitive one is the policy
layer's decision). Labels, identifiers, direct identifiers and dates cannot. A step validates
itself on construction, so one rebuilt from a released plan's JSON is checked as strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from connectors.cleaning_rules import cleaning_to_dict
from connectors.scales import Scale, parse_typical
from connectors.schema_columns import TYPE_NAMES, ColumnSpec, Role
from foundation.errors import SchemaError, SpecError

#: the unit interval: where a domain-anchored step's values go (and where every step's went
#: before typical ranges got their own span)
UNIT_SPAN = (0.0, 1.0)
#: where a declared typical range's ends go. Measured (``benchmarks/bench_utility.py``'s
#: tables, DP-SGD at epsilon 1 and 3, the same plan and seeds for each scaling): the typical
#: range on [0, 1] lost 0.01-0.04 AUROC to the peer's standardised features; on [-2, 2] it
#: matched them (``docs/tuning.md``)
TYPICAL_SPAN = (-2.0, 2.0)


class StepKind(StrEnum):
    #: scaled to [0, 1] by the declared domain, plus a missing indicator
    NUMERIC = "numeric"
    #: scaled to [0, 1] by log(1 + x) over the declared domain (``scale = "log"``), plus a
    #: missing indicator
    LOG = "log"
    #: a bool column as 0/1, plus a missing indicator
    FLAG = "flag"
    #: one-hot over the declared categories, plus "other" and "missing"
    CATEGORY = "category"


@dataclass(frozen=True)
class FeatureStep:
    """How one input column becomes one or more output columns."""

    name: str
    kind: StepKind
    #: the declared Arrow type name (informational outside the zone)
    type: str
    min: float | None = None
    max: float | None = None
    #: declared fill in the column's own units; None means the default (midpoint / 0.5)
    fill: float | None = None
    categories: tuple[str, ...] = ()
    #: the column's declared cleaning (``na_values`` with the dataset's, ``normalize``,
    #: ``aliases``, ``outside``): a released model checks new rows as ingest did
    #: (``training.predict``); it does not change the transform
    cleaning: dict[str, Any] | None = field(default=None, hash=False)
    #: the declared typical range (numeric and log steps): the scaling's anchors
    typical: tuple[float, float] | None = None
    #: the interval the anchors map to: ``UNIT_SPAN``, or ``TYPICAL_SPAN`` for a step that
    #: a contract with a typical range builds now
    span: tuple[float, float] = UNIT_SPAN

    def __post_init__(self) -> None:
        field = f"steps.{self.name}"
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(
                "steps", "a step has no column name", "rebuild the plan from a contract"
            )
        try:
            object.__setattr__(self, "kind", StepKind(self.kind))
        except ValueError:
            raise SpecError(
                f"{field}.kind",
                "is not a known step kind",
                "use numeric, log, flag or category",
            ) from None
        if self.scaled:
            lo, hi = _finite(self.min, f"{field}.min"), _finite(self.max, f"{field}.max")
            if lo >= hi:
                raise SpecError(f"{field}.min", "must be below max", "rebuild from the contract")
            if self.kind is StepKind.LOG and lo < 0:
                raise SpecError(
                    f"{field}.min", "must be 0 or more for a log step", "rebuild from the contract"
                )
            object.__setattr__(self, "min", lo)
            object.__setattr__(self, "max", hi)
        if self.typical is not None:
            # the contract's own rule (a plan edited outside the zone meets it again)
            typical = parse_typical(
                self.typical, numeric=True, scalable=self.scaled, lo=self.min, hi=self.max
            )
            if isinstance(typical, str):
                raise SpecError(f"{field}.typical", typical, "rebuild it from the contract")
            object.__setattr__(self, "typical", typical)
        self._check_span(field)
        if self.fill is not None:
            fill = _finite(self.fill, f"{field}.fill")
            bounds = (self.min, self.max) if self.scaled else (0.0, 1.0)
            lo_b, hi_b = bounds
            if self.kind is StepKind.CATEGORY or not (lo_b <= fill <= hi_b):  # type: ignore[operator]
                raise SpecError(
                    f"{field}.fill", "is outside the domain", "rebuild from the contract"
                )
            object.__setattr__(self, "fill", fill)
        cats = tuple(self.categories)
        if self.kind is StepKind.CATEGORY:
            if not cats or not all(isinstance(c, str) for c in cats) or len(set(cats)) != len(cats):
                raise SpecError(
                    f"{field}.categories",
                    "must be distinct strings, at least one",
                    "rebuild from the contract",
                )
        elif cats:
            raise SpecError(f"{field}.categories", "only a category step has categories", "remove")
        object.__setattr__(self, "categories", cats)
        if self.cleaning is not None:
            if not isinstance(self.cleaning, dict) or set(self.cleaning) - set(CLEANING_KEYS):
                raise SpecError(
                    f"{field}.cleaning", "has unknown keys", "rebuild from the contract"
                )
            self.input_spec()  # the keys' own rules, as the contract checked them

    def _check_span(self, field: str) -> None:
        span = self.span
        if not isinstance(span, list | tuple) or len(span) != 2:
            raise SpecError(f"{field}.span", "must be two numbers", "rebuild from the contract")
        lo, hi = (_finite(v, f"{field}.span") for v in span)
        if lo >= hi:
            raise SpecError(f"{field}.span", "must go from low to high", "rebuild it")
        if (lo, hi) != UNIT_SPAN and self.typical is None:
            # only a typical range says where most values fall; a domain does not
            raise SpecError(
                f"{field}.span", "needs a typical range", "rebuild the plan from the contract"
            )
        object.__setattr__(self, "span", (lo, hi))

    def to_span(self, unit: float) -> float:
        """A value on the anchors' unit scale (low anchor 0, high 1) -> the output scale."""
        lo, hi = self.span
        return lo + unit * (hi - lo)

    def input_spec(self) -> ColumnSpec:
        """The column as the contract declared it, enough to check new input as ingest did."""
        cleaning = dict(self.cleaning or {})
        try:
            return ColumnSpec(
                name=self.name,
                type=self.type if self.type in TYPE_NAMES else "float64",
                role=Role.FEATURE,
                min=self.min if self.scaled else None,
                max=self.max if self.scaled else None,
                categories=self.categories or None,
                scale=Scale.LOG if self.kind is StepKind.LOG else Scale.LINEAR,
                typical=self.typical,
                na_values=cleaning.get("na_values"),
                normalize=cleaning.get("normalize"),
                aliases=cleaning.get("aliases"),
                outside=cleaning.get("outside"),
            )
        except SchemaError:
            raise SpecError(
                f"steps.{self.name}.cleaning", "breaks the contract's rules", "rebuild it"
            ) from None

    @property
    def output_names(self) -> tuple[str, ...]:
        if self.kind is StepKind.CATEGORY:
            return (
                *(f"{self.name}={c}" for c in self.categories),
                f"{self.name}__other",
                f"{self.name}__missing",
            )
        return (self.name, f"{self.name}__missing")

    @property
    def width(self) -> int:
        return len(self.categories) + 2 if self.kind is StepKind.CATEGORY else 2

    @property
    def scaled(self) -> bool:
        """Whether the step scales a number by its declared domain (numeric or log)."""
        return self.kind in (StepKind.NUMERIC, StepKind.LOG)

    @property
    def anchors(self) -> tuple[float, float]:
        """The values that map to 0 and 1: the typical range if declared, else the domain."""
        if self.typical is not None:
            return self.typical
        return float(self.min), float(self.max)  # type: ignore[arg-type]

    @property
    def log_bounds(self) -> tuple[np.float32, np.float32]:
        """``log1p(low)`` and ``log1p(high) - log1p(low)`` of the anchors as the log kernel
        computes them (float32 ``log1p`` of the float32 bounds), so that the low anchor maps
        to exactly 0 and the high one to exactly 1."""
        a, b = self.anchors
        lo = np.log1p(np.float32(a))
        return lo, np.log1p(np.float32(b)) - lo

    @property
    def scaled_fill(self) -> float:
        """What a missing value becomes (on the output scale)."""
        if self.kind is StepKind.NUMERIC:
            lo, hi = self.anchors
            fill = (lo + hi) / 2.0 if self.fill is None else self.fill
            return self.to_span((fill - lo) / (hi - lo))
        if self.kind is StepKind.LOG:
            if self.fill is None:
                return self.to_span(0.5)
            log_lo, width = self.log_bounds
            return self.to_span(float((np.log1p(np.float32(self.fill)) - log_lo) / width))
        return 0.5 if self.fill is None else self.fill

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind.value, "type": self.type}
        if self.scaled:
            out["min"], out["max"] = self.min, self.max
        if self.fill is not None:
            out["fill"] = self.fill
        if self.categories:
            out["categories"] = list(self.categories)
        if self.cleaning:
            out["cleaning"] = dict(self.cleaning)
        if self.typical is not None:
            out["typical"] = list(self.typical)
        if self.span != UNIT_SPAN:
            out["span"] = list(self.span)
        return out


def _finite(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field, "must be a number", "rebuild the plan from the contract")
    out = float(value)
    if not math.isfinite(out):
        raise SpecError(field, "must be finite", "rebuild the plan from the contract")
    return out


#: the cleaning keys a released plan carries (a feature is never a date: no date_format)
CLEANING_KEYS = ("na_values", "normalize", "aliases", "outside")


def _cleaning_of(spec: ColumnSpec, na_values: tuple[str, ...]) -> dict[str, Any] | None:
    declared = {k: v for k, v in cleaning_to_dict(spec).items() if k in CLEANING_KEYS}
    merged = list(dict.fromkeys((*na_values, *(spec.na_values or ()))))
    if merged:
        declared["na_values"] = merged
    return declared or None


def _step_for(spec: ColumnSpec, na_values: tuple[str, ...] = ()) -> FeatureStep:
    step = _bare_step_for(spec)
    cleaning = _cleaning_of(spec, na_values)
    if cleaning is None:
        return step
    # every other field as the bare step has it (a field added later needs no line here)
    return replace(step, cleaning=cleaning)


def _bare_step_for(spec: ColumnSpec) -> FeatureStep:
    name = spec.name
    if spec.role in (Role.LABEL, Role.IDENTIFIER, Role.DIRECT_IDENTIFIER):
        fix = {
            Role.LABEL: "a label is the target, never an input: remove it from features",
            Role.IDENTIFIER: "the person identifier is never a feature: remove it",
            Role.DIRECT_IDENTIFIER: "direct identifiers never leave ingest: remove it",
        }[spec.role]
        raise SpecError("features", f"{name!r} has role {spec.role.value}", fix)
    if spec.is_temporal:
        raise SpecError(
            "features",
            f"{name!r} is a date/time column, which is not a feature",
            "use a derived numeric column with a declared domain (e.g. length_of_stay)",
        )
    if spec.is_numeric:
        if spec.min is None or spec.max is None:
            raise SpecError(
                "features",
                f"{name!r} has no declared min/max to scale by",
                "declare its domain in the schema contract",
            )
        kind = StepKind.LOG if spec.scale is Scale.LOG else StepKind.NUMERIC
        span = UNIT_SPAN if spec.typical is None else TYPICAL_SPAN
        return FeatureStep(
            name, kind, spec.type, spec.min, spec.max, spec.fill, typical=spec.typical, span=span
        )
    if spec.type == "bool":
        return FeatureStep(name, StepKind.FLAG, spec.type, fill=spec.fill)
    if spec.categories is None:
        raise SpecError(
            "features",
            f"{name!r} has no declared categories",
            "declare categories in the schema contract (a vocabulary read from data is a release)",
        )
    return FeatureStep(name, StepKind.CATEGORY, spec.type, categories=spec.categories)
