"""What every synthesizer shares: the method names, the result, the contract-only encoding,
the shared DP helpers (:func:`plan_sigmas`, :func:`sample_rows`; the projection of noisy
counts lives in ``privacy.noisy_counts``) and the argument checks. It imports no other
module of ``privacy.synth``; the engines (marginals, copula, baselines) import it and
nothing else of ``privacy.synth``;
:mod:`privacy.synth.registry` maps each :class:`SynthMethod` to its engine.

How the DP methods see the data (:class:`Codec`), all of it fixed by the contract before any
row is read, because anything learned from rows (a range, a vocabulary, a bin edge) would be
an uncharged release:

* a float column, a wide integer column and a date/timestamp column -> equal-width bins over
  the declared ``[min, max]`` (dates: :data:`DEFAULT_DATE_RANGE` when the contract cannot
  declare one), log-spaced (equal-width in ``log(1 + x)``) for a column declared
  ``scale = "log"``; values outside are clipped into the edge bins;
* a narrow integer domain (at most :data:`NUMERIC_BINS` integers, e.g. 0/1 flags) -> one value
  per integer; bool -> two values; a label without a declared domain -> 0/1;
* a string column -> its declared vocabulary, plus "other" for every value outside it (so a
  value seen once, such as a canary string, can only ever come out as "other"); a string
  column without a vocabulary is all "other";
* a nullable column -> one more value, "missing".

Decoding: a bin comes out as a uniform draw inside the bin (on its scale), "other" as the
literal string :data:`OTHER` (or the declared category "other" when the vocabulary has one),
"missing" as null, and the identifier as fresh random pseudonyms, never the input's.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.dummy import random_pseudonyms, to_arrow_within_domain
from connectors.scale_arrays import bin_codes, draw_in_bins, scale_edges
from connectors.scales import Scale
from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import IntegrityError, SchemaError, SpecError
from privacy.accountant import (
    NEIGHBOURING,
    UNIT,
    GaussianStep,
    calibrate_noise,
    epsilon_for,
)


class SynthMethod(StrEnum):
    """The synthesizers behind :func:`~privacy.synth.base.fit_and_sample`. Which engine runs
    each, and whether it is DP, is :data:`privacy.synth.registry.REGISTRY`'s to say."""

    #: DP: noisy marginals over a label-rooted, privately selected tree (marginals.py)
    MST = "mst"
    #: DP: Gaussian copula over noisy marginals and a noisy correlation matrix (copula.py)
    DP_COPULA = "dp-copula"
    #: NOT DP: SDV's GaussianCopulaSynthesizer (baselines.py)
    GAUSSIAN_COPULA = "gaussian-copula"
    #: NOT DP: SDV's CTGANSynthesizer (baselines.py)
    CTGAN = "ctgan"
    #: NOT DP: SDV's TVAESynthesizer (baselines.py)
    TVAE = "tvae"


def parse_method(method: object) -> SynthMethod:
    """``method`` as a :class:`SynthMethod`; ``SpecError`` listing the known ones otherwise."""
    try:
        return SynthMethod(method)  # type: ignore[arg-type]
    except ValueError:
        raise SpecError(
            "method",
            "is not a known synthesis method",
            "use one of " + ", ".join(m.value for m in SynthMethod),
        ) from None


#: Equal-width bins per float, wide-integer or temporal column. Fewer bins mean larger counts
#: per bin beside the noise; more bins mean a finer uniform-within-bin decoding. On the cohort
#: 32 beat 64 (mst, epsilon 3: TSTR AUROC 0.684 vs 0.655 at 3k persons, 0.729 vs 0.726 at 50k).
NUMERIC_BINS = 32
#: Temporal columns (the contract cannot declare a domain for them yet): a fixed window ...
DEFAULT_DATE_RANGE = (dt.date(2000, 1, 1), dt.date(2029, 12, 31))
#: ... in roughly quarterly bins (30 years x 4).
TEMPORAL_BINS = 120
#: What a value outside the declared vocabulary comes out as.
OTHER = "other"
#: Largest number of synthetic rows one call may ask for (bounds memory: rows x columns codes).
MAX_ROWS = 5_000_000

_EPOCH = dt.date(1970, 1, 1)
_SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


class ValueKind(StrEnum):
    """How a column's values become a finite domain of integer codes."""

    #: bins over a declared (or dates' default) range, equal-width on the column's scale
    BINNED = "binned"
    #: each integer of a narrow declared domain is its own value
    INTEGER = "integer"
    #: False / True
    BOOL = "bool"
    #: the declared vocabulary (plus "other")
    CATEGORY = "category"


@dataclass(frozen=True)
class ColumnCodec:
    """One column's finite domain. Codes ``0 .. n_values-1`` are the in-domain values (bins,
    integers, False/True, categories), then ``other_code`` (if any), then ``missing_code``
    (if any). Built from the contract alone."""

    spec: ColumnSpec
    kind: ValueKind
    #: domain bounds in encoded units (days since 1970 for dates, seconds for timestamps)
    lo: float = 0.0
    hi: float = 1.0
    n_values: int = 2
    vocabulary: tuple[str, ...] = ()
    #: a separate code for values outside the vocabulary (False when "other" is declared)
    has_other: bool = False
    has_missing: bool = False
    scale: Scale = Scale.LINEAR  # how a BINNED column's bins spread (the contract's scale)

    @classmethod
    def from_spec(cls, spec: ColumnSpec) -> ColumnCodec:
        missing = spec.is_nullable
        if spec.type == "string":
            vocab = tuple(spec.categories or ())
            return cls(
                spec,
                ValueKind.CATEGORY,
                n_values=len(vocab),
                vocabulary=vocab,
                # a site's declared categories are enforced at ingest: a synthetic row's
                # site is one of them, never "other" (which no site could take part as)
                has_other=OTHER not in vocab and not (spec.role is Role.SITE and vocab),
                has_missing=missing,
            )
        if spec.type == "bool":
            return cls(spec, ValueKind.BOOL, n_values=2, has_missing=missing)
        if spec.is_temporal:
            if spec.min is not None and spec.max is not None:
                lo, hi = spec.min, spec.max
            else:
                lo, hi = ((d - _EPOCH).days for d in DEFAULT_DATE_RANGE)
                if spec.type != "date32":
                    lo, hi = lo * 86_400.0, hi * 86_400.0 + 86_399.0
            return cls(
                spec, ValueKind.BINNED, float(lo), float(hi), TEMPORAL_BINS, has_missing=missing
            )
        if spec.min is None or spec.max is None:
            if spec.role is not Role.LABEL:
                raise SchemaError(
                    f"schema contract: columns.{spec.name}.min: synthesis needs a declared "
                    "domain for this numeric column (fix: declare min and max in the contract)",
                    column=spec.name,
                )
            lo, hi = 0.0, 1.0  # a label without a domain is taken as binary 0/1
        else:
            lo, hi = spec.min, spec.max
        if spec.is_integer:
            ilo, ihi = math.ceil(lo), math.floor(hi)
            if ihi - ilo + 1 <= NUMERIC_BINS:
                return cls(
                    spec,
                    ValueKind.INTEGER,
                    float(ilo),
                    float(ihi),
                    ihi - ilo + 1,
                    has_missing=missing,
                )
        return cls(
            spec, ValueKind.BINNED, lo, hi, NUMERIC_BINS, has_missing=missing, scale=spec.scale
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def edges(self) -> np.ndarray:
        """A BINNED column's bin edges: equal-width on its scale (log-spaced for log)."""
        return scale_edges(self.lo, self.hi, self.n_values, self.scale)

    @property
    def size(self) -> int:
        """Number of codes: in-domain values, then other, then missing."""
        return self.n_values + int(self.has_other) + int(self.has_missing)

    @property
    def other_code(self) -> int | None:
        return self.n_values if self.has_other else None

    @property
    def missing_code(self) -> int | None:
        return self.size - 1 if self.has_missing else None

    @property
    def ordered(self) -> bool:
        """Whether the in-domain codes have a meaningful order (all but categories)."""
        return self.kind is not ValueKind.CATEGORY

    # -- rows -> codes ---------------------------------------------------------------------
    def encode(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Codes for one column of real rows. Raises ``SchemaError`` naming the column (and
        the row, never the value) for a null in a column the contract says cannot be null."""
        null = np.asarray(pc.is_null(column, nan_is_null=True))
        if null.any() and not self.has_missing:
            row = int(np.flatnonzero(null)[0]) + 1
            raise SchemaError(
                f"column {self.name!r}: row {row} is missing, but the contract says it "
                "can never be (fix the data or the contract)",
                column=self.name,
                row=row,
            )
        if self.kind is ValueKind.CATEGORY:
            codes = np.full(null.size, self.n_values, dtype=np.int64)  # "other" by default
            if self.vocabulary:
                found = pc.index_in(column, value_set=pa.array(self.vocabulary, pa.string()))
                idx = np.asarray(pc.fill_null(found, -1), dtype=np.int64)
                if not self.has_other and OTHER in self.vocabulary:
                    # "other" is declared: undeclared values join it
                    idx = np.where(idx < 0, self.vocabulary.index(OTHER), idx)
                elif not self.has_other and (idx < 0).any():
                    # a site outside its categories: ingest refuses those since they are
                    # enforced; a dataset ingested before that must be ingested again
                    row = int(np.flatnonzero(idx < 0)[0]) + 1
                    raise SchemaError(
                        f"column {self.name!r}: row {row} is not among the declared "
                        "categories (ingest the dataset again: sites are checked at ingest now)",
                        column=self.name,
                        row=row,
                    )
                codes = np.where(idx >= 0, idx, codes)
        elif self.kind is ValueKind.BOOL:
            values = np.asarray(pc.fill_null(column, False), dtype=bool)
            codes = values.astype(np.int64)
        else:
            x = self._numbers(column)
            if self.kind is ValueKind.INTEGER:
                codes = np.clip(np.round(np.nan_to_num(x)) - self.lo, 0, self.n_values - 1)
            elif self.scale is Scale.LOG:
                codes = bin_codes(np.nan_to_num(x, nan=self.lo), self.edges)
            else:
                scaled = (np.nan_to_num(x, nan=self.lo) - self.lo) / (self.hi - self.lo)
                codes = np.clip(np.floor(scaled * self.n_values), 0, self.n_values - 1)
            codes = codes.astype(np.int64)
        if self.has_missing:
            codes = np.where(null, self.size - 1, codes)
        return codes

    def _numbers(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Float64 values in encoded units, NaN for null."""
        if self.spec.type == "date32":
            column = pc.cast(column, pa.int32())
        elif self.spec.is_temporal:
            per_second = _SECONDS_PER_UNIT[self.spec.arrow_type.unit]
            ticks = np.asarray(pc.fill_null(pc.cast(column, pa.int64()), 0), dtype=np.float64)
            out = ticks / per_second
            out[np.asarray(pc.is_null(column))] = np.nan
            return out
        return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), np.nan), dtype=np.float64)

    # -- codes -> values -------------------------------------------------------------------
    def decode(self, codes: np.ndarray, rng: np.random.Generator) -> pa.Array:
        """An Arrow array of the column's governed type for ``codes`` (bins decode to a
        uniform draw inside the bin)."""
        codes = np.asarray(codes, dtype=np.int64)
        missing = codes == self.missing_code if self.has_missing else np.zeros(codes.size, bool)
        if self.kind is ValueKind.CATEGORY:
            words = np.asarray([*self.vocabulary, OTHER, None], dtype=object)
            pick = np.where(missing, self.n_values + 1, np.minimum(codes, self.n_values))
            return pa.array(words[pick].tolist(), pa.string())
        in_domain = np.where(missing, 0, np.minimum(codes, self.n_values - 1))
        if self.kind is ValueKind.BOOL:
            values = in_domain.astype(np.float64)
        elif self.kind is ValueKind.INTEGER:
            values = self.lo + in_domain.astype(np.float64)
        elif self.scale is Scale.LOG:  # uniform in log(1 + x) within the bin
            values = draw_in_bins(in_domain, self.edges, self.scale, rng.random(codes.size))
        else:
            width = (self.hi - self.lo) / self.n_values
            values = self.lo + (in_domain + rng.random(codes.size)) * width
        values = np.where(missing, np.nan, values)
        return self._to_arrow(values, missing)

    def _to_arrow(self, values: np.ndarray, missing: np.ndarray) -> pa.Array:
        spec = self.spec
        if spec.type == "date32":
            days = np.clip(np.floor(np.nan_to_num(values)), self.lo, self.hi).astype(np.int32)
            return pa.array(days, pa.int32(), mask=missing).cast(pa.date32())
        if spec.is_temporal:
            per_second = _SECONDS_PER_UNIT[spec.arrow_type.unit]
            seconds = np.clip(np.nan_to_num(values), self.lo, self.hi)
            ticks = np.floor(seconds * per_second).astype(np.int64)
            return pa.array(ticks, pa.int64(), mask=missing).cast(spec.arrow_type)
        if spec.role is Role.LABEL and spec.min is None and spec.type != "bool":
            values = np.clip(values, 0.0, 1.0)
        return to_arrow_within_domain(values, spec)


@dataclass(frozen=True)
class Codec:
    """The synthesised columns of a contract (every governed column but the identifier, in
    contract order) and their domains. Built from the contract alone."""

    contract: SchemaContract
    columns: tuple[ColumnCodec, ...]

    @classmethod
    def from_contract(cls, contract: SchemaContract) -> Codec:
        schema = contract.governed_arrow_schema()
        cols = tuple(
            ColumnCodec.from_spec(contract.column(f.name))
            for f in schema
            if f.name != contract.identifier
        )
        if not cols:
            raise SchemaError(
                "schema contract: nothing to synthesise besides the identifier "
                "(fix: declare at least one feature, label, site or sensitive column)"
            )
        return cls(contract, cols)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(c.size for c in self.columns)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def encode(self, table: pa.Table) -> np.ndarray:
        """``(rows, columns)`` int64 codes of a governed table (one row per person)."""
        if table.num_rows == 0:
            return np.zeros((0, len(self.columns)), dtype=np.int64)
        return np.stack([c.encode(table.column(c.name)) for c in self.columns], axis=1)

    def decode(self, codes: np.ndarray, rng: np.random.Generator) -> pa.Table:
        """A table with exactly the governed schema: decoded columns plus fresh pseudonyms."""
        schema = self.contract.governed_arrow_schema()
        decoded = {c.name: c.decode(codes[:, j], rng) for j, c in enumerate(self.columns)}
        ident = self.contract.identifier
        if ident is not None:
            decoded[ident] = random_pseudonyms(codes.shape[0], rng)
        return pa.Table.from_arrays([decoded[f.name] for f in schema], schema=schema)


@dataclass(frozen=True)
class SynthResult:
    """A synthetic table and what producing it cost.

    ``steps`` is exactly the history that was charged (pass it to
    ``privacy.accountant.epsilon_for`` with ``delta`` to recompute ``epsilon``); it is empty,
    and ``epsilon``/``delta`` are ``None``, for the non-DP baselines, whose output must be held
    for a steward. ``neighbouring`` and ``unit`` state the relation the figure is about.

    A result is either DP (epsilon, delta and at least one charged step) or not (none of the
    three); anything in between is refused here. That the method's registry entry agrees
    (a DP method gives a DP result, a baseline a non-DP one) is checked by
    :func:`privacy.synth.base.fit_and_sample`, which reads the registry."""

    table: pa.Table
    method: SynthMethod
    epsilon: float | None
    delta: float | None
    steps: tuple[GaussianStep, ...]
    fit_seconds: float
    sample_seconds: float
    notes: tuple[str, ...] = ()
    # init=False: no caller can label a result with a different relation or unit.
    neighbouring: str = field(default=NEIGHBOURING, init=False)
    unit: str = field(default=UNIT, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", parse_method(self.method))
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "notes", tuple(self.notes))
        given = (self.epsilon is not None, self.delta is not None, bool(self.steps))
        if any(given) and not all(given):
            raise SpecError(
                "epsilon",
                "a result carries epsilon, delta and its charged steps (DP), or none of "
                "them (a non-DP baseline)",
            )

    @property
    def is_dp(self) -> bool:
        """Whether this result carries a charged DP guarantee (epsilon, delta, steps)."""
        return bool(self.steps)


@dataclass(frozen=True)
class DPFit:
    """What a DP engine hands back after fitting: every noisy release it made (``steps``, in
    order), notes for the model card, and a sampler ``(rows, rng) -> codes`` that touches only
    the noisy measurements (so sampling is post-processing and costs nothing more)."""

    steps: tuple[GaussianStep, ...]
    notes: tuple[str, ...]
    sampler: Callable[[int, np.random.Generator], np.ndarray]


# -- shared DP helpers ------------------------------------------------------------------------
def plan_sigmas(
    epsilon: float, delta: float, groups: Sequence[tuple[float, int]]
) -> tuple[float, ...]:
    """Noise multipliers for groups of sensitivity-1 Gaussian releases on all persons.

    ``groups`` holds ``(share, count)`` pairs: ``count`` releases that together get ``share``
    of the budget, measured as zCDP rho (``1 / (2 sigma**2)`` per release, which is how
    Gaussian releases on the same persons compose under RDP: their curves add). The total rho
    is the one of a single Gaussian release calibrated by ``privacy.accountant.calibrate_noise``
    to ``(epsilon, delta)``, so the composed history has the same RDP curve; the returned
    sigmas are then checked with ``epsilon_for`` and nudged up if rounding overshot.
    Returns one sigma per group (the same for every release in it)."""
    check_epsilon(epsilon)
    live = [(s, c) for s, c in groups if c > 0]
    if not live or any(not (math.isfinite(s) and s > 0) for s, _ in live):
        raise SpecError("privacy.shares", "every group needs a share > 0")
    total = sum(s for s, _ in live)
    try:
        sigma_one = calibrate_noise(epsilon, delta, 1.0, 1)
    except SpecError as exc:
        raise SpecError(
            "epsilon", f"cannot be met ({exc.problem})", "raise epsilon (e.g. 0.5 to 10)"
        ) from None
    # rho_group_release = (share / total) * rho_total / count  =>  sigma = sigma_one*sqrt(...)
    sigmas = [sigma_one * math.sqrt(c * total / s) if c > 0 else math.inf for s, c in groups]

    def history(scale: float) -> list[GaussianStep]:
        return [
            GaussianStep(sig * scale, 1.0, 1)
            for sig, (_, c) in zip(sigmas, groups, strict=True)
            for _ in range(c)
        ]

    scale = 1.0
    for _ in range(100):
        if epsilon_for(history(scale), delta) <= epsilon:
            return tuple(sig * scale for sig in sigmas)
        scale *= 1.0 + 1e-6
    raise IntegrityError("noise calibration did not converge; nothing was released")


def sample_rows(probs: np.ndarray, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row: row ``r`` draws from ``probs[index[r]]`` (inverse CDF,
    vectorised). Rows of ``probs`` that sum to 0 draw uniformly."""
    p = np.asarray(probs, dtype=np.float64)
    sums = p.sum(axis=1, keepdims=True)
    p = np.where(sums > 0, p / np.where(sums > 0, sums, 1.0), 1.0 / p.shape[1])
    cum = np.cumsum(p, axis=1)
    cum[:, -1] = 1.0
    u = rng.random(index.size)
    out = np.empty(index.size, dtype=np.int64)
    # group rows by their distribution so each group is one searchsorted over one CDF row
    order = np.argsort(index, kind="stable")
    sorted_index = index[order]
    bounds = np.flatnonzero(np.diff(sorted_index)) + 1
    for rows in np.split(order, bounds):
        if rows.size:
            out[rows] = np.searchsorted(cum[index[rows[0]]], u[rows], side="right")
    return np.minimum(out, p.shape[1] - 1)


# -- validation -----------------------------------------------------------------------------
def check_epsilon(epsilon: object) -> float:
    """``epsilon`` as a float if it is a finite number > 0; ``SpecError`` otherwise."""
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not math.isfinite(epsilon)
        or epsilon <= 0
    ):
        raise SpecError(
            "epsilon",
            "must be a finite number > 0 for a DP method",
            "use e.g. 1.0 to 10.0",
        )
    return float(epsilon)
