"""The DP query engine: ``quote`` a query from the contract, ``run`` it on bounded rows.

Pure: no database, no service, no files. The service (``sandbox.service_query``) checks the
grant, reserves the quote's epsilon, reads the rows with ``connectors.tables.load_table``
(``max_rows_per_person=contract.query_rows_per_person``) and calls ``run``; the plan
(``privacy.dpquery.plan``) says what each part costs and why, and ``privacy.dpquery.noise``
adds OpenDP's noise. What ``run`` returns is post-processing of that noise alone:

- count: the noisy count (or one per ``by`` group); 95% interval noisy +- h, h the exact
  discrete Laplace half-width, raised to 0 where below (a true count is never negative).
- sum: the noisy sum of clamped values (per group); +- b ln 20, kept on the side of 0 the
  declared range is on.
- mean: min + S/N from the noisy sum S of (x - min) and noisy count N, clamped to
  [min, max]. Its 95% interval: S and N each within their 97.5% intervals (union bound), the
  extreme ratios of that box, clamped to [min, max]; the whole range when N's lower end is
  not positive. ``noise_scales`` holds both noises' scales (the sum's, the count's).
- histogram: one noisy count per contract cell (``privacy.dpquery.cells``), as count.
- quantiles: one candidate per level, and its rank error (``noise.quantile_rank_error``).

Noisy values are never clamped silently: counts and histogram cells stay whole numbers and
may be negative; only a mean is kept inside its declared range (said in its notes). Notes
computed after the noise (a swamped figure, an unknown mean) read only noisy figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.schema import SchemaContract
from foundation.errors import SpecError
from privacy.dpquery import noise
from privacy.dpquery.cells import numeric_values
from privacy.dpquery.plan import MAX_SUM_ROWS, Part, Plan, make_plan
from privacy.dpquery.results import Figure, QueryAnswer, QueryQuote
from privacy.dpquery.spec import QueryKind, QuerySpec, columns_needed

__all__ = ["Figure", "QueryAnswer", "QueryQuote", "quote", "run"]


def quote(spec: QuerySpec, contract: SchemaContract) -> QueryQuote:
    """What ``spec`` costs and how noisy it is; reads nothing (the contract and spec only)."""
    plan = make_plan(spec, contract)
    return QueryQuote(
        spec=spec,
        epsilon=spec.epsilon,
        delta=0.0,
        rows_per_person=plan.k,
        parts=tuple(p.to_dict() for p in plan.parts),
        notes=plan.notes,
    )


def run(spec: QuerySpec, contract: SchemaContract, table: pa.Table) -> QueryAnswer:
    """Answer ``spec`` on ``table``: the rows ``load_table`` read (``columns_needed(spec)``,
    at most ``contract.query_rows_per_person`` rows per person). Spends ``spec.epsilon``."""
    plan = make_plan(spec, contract)
    _check_table(spec, contract, table, plan.k)
    figures, late_notes = _RUNNERS[spec.kind](plan, table)
    return QueryAnswer(
        spec=spec,
        epsilon=spec.epsilon,
        delta=0.0,
        rows_per_person=plan.k,
        figures=tuple(figures),
        notes=(*plan.notes, *late_notes),
    )


# -- the table ----------------------------------------------------------------------------------
def _check_table(spec: QuerySpec, contract: SchemaContract, table: pa.Table, k: int) -> None:
    if not isinstance(table, pa.Table):
        raise SpecError("table", "must be a pyarrow Table", "read it with load_table")
    for name in columns_needed(spec):
        if name not in table.column_names:
            raise SpecError("table", f"lacks the column {name!r}", "read columns_needed(spec)")
        # a mistyped column would fail in a cast whose error quotes the value: refuse first
        kind = table.schema.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        col = contract.column(name)
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        expected = numeric if col.is_numeric else (text or col.categories is None)
        if not expected:
            raise SpecError(
                "table",
                f"column {name!r} does not have its declared type",
                "read it with load_table",
            )
    if table.num_rows > MAX_SUM_ROWS:
        raise SpecError("table", "holds more rows than a DP query supports (2^31)", "")
    ident = contract.identifier
    if ident is not None and ident in table.column_names and table.num_rows:
        # the bound is the reader's job; when the identifier came along, hold it to it
        most = pc.max(pc.value_counts(table.column(ident)).field("counts")).as_py()
        if most > k:
            raise SpecError(
                "table",
                f"holds more than {k} row(s) for some person",
                f"read it with load_table(..., max_rows_per_person={k})",
            )


def _cell_codes(plan: Plan, table: pa.Table, column: str | None) -> tuple[np.ndarray, int]:
    """Each row's cell (the plan's cells, read from ``column``), or 0 for all: one cell."""
    if plan.cells is None or column is None:
        return np.zeros(table.num_rows, dtype=np.int64), 1
    return plan.cells.codes(table.column(column)), plan.cells.size


def _labels(plan: Plan) -> list[str | None]:
    return list(plan.cells.labels) if plan.cells is not None else [None]


# -- counts -------------------------------------------------------------------------------------
def _count_figures(
    part: Part, counts: list[int], labels: list[str | None], grouped: bool
) -> tuple[list[Figure], int]:
    noisy, scale = noise.discrete_laplace(counts, int(part.sensitivity), part.epsilon)
    h = noise.discrete_laplace_half_width(scale)
    figures, swamped = [], 0
    for label, v in zip(labels, noisy, strict=True):
        swamped += h >= abs(v)
        group, statistic = (label, "count") if grouped else (None, label or "count")
        # a true count is never negative: raising the ends to 0 keeps every true value in
        figures.append(
            Figure(group, statistic, float(v), scale, float(max(v - h, 0)), float(max(v + h, 0)))
        )
    return figures, swamped


def _bincount(codes: np.ndarray, size: int) -> list[int]:
    return [int(c) for c in np.bincount(codes[codes >= 0], minlength=size)[:size]]


def _swamp_note(swamped: int) -> list[str]:
    if not swamped:
        return []
    return [
        f"the noise is as large as the value for {swamped} figure(s): their 95% interval "
        "reaches past zero, so read them as 'about zero'"
    ]


def _run_count(plan: Plan, table: pa.Table) -> tuple[list[Figure], list[str]]:
    codes, size = _cell_codes(plan, table, plan.spec.by)
    counts = _bincount(codes, size)
    figures, swamped = _count_figures(plan.parts[0], counts, _labels(plan), plan.cells is not None)
    return figures, _swamp_note(swamped)


def _run_histogram(plan: Plan, table: pa.Table) -> tuple[list[Figure], list[str]]:
    assert plan.cells is not None and plan.spec.column is not None
    counts = _bincount(plan.cells.codes(table.column(plan.spec.column)), plan.cells.size)
    figures, swamped = _count_figures(plan.parts[0], counts, _labels(plan), grouped=False)
    return figures, _swamp_note(swamped)


# -- sums and means -----------------------------------------------------------------------------
def _sums_by_cell(values: np.ndarray, codes: np.ndarray, size: int) -> list[float]:
    """Correctly rounded sums (``math.fsum``) per cell; NaN (null) and cell -1 skipped."""
    keep = ~np.isnan(values) & (codes >= 0)
    values, codes = values[keep], codes[keep]
    order = np.argsort(codes, kind="stable")
    values, codes = values[order], codes[order]
    ends = np.searchsorted(codes, np.arange(size + 1), side="left")
    return [math.fsum(values[ends[i] : ends[i + 1]].tolist()) for i in range(size)]


def _counts_by_cell(values: np.ndarray, codes: np.ndarray, size: int) -> list[int]:
    return _bincount(codes[~np.isnan(values)], size)


def _side_of_zero(low: float, high: float, lo: float, hi: float) -> tuple[float, float]:
    # a sum of values in [lo, hi] with lo >= 0 is never negative (and mirrored): keep that
    if lo >= 0:
        return max(low, 0.0), max(high, 0.0)
    if hi <= 0:
        return min(low, 0.0), min(high, 0.0)
    return low, high


def _run_sum(plan: Plan, table: pa.Table) -> tuple[list[Figure], list[str]]:
    part = plan.parts[0]
    assert plan.spec.column is not None
    values = np.clip(numeric_values(table.column(plan.spec.column)), plan.lo, plan.hi)
    codes, size = _cell_codes(plan, table, plan.spec.by)
    noisy, scale = noise.laplace(_sums_by_cell(values, codes, size), part.sensitivity, part.epsilon)
    h = noise.laplace_half_width(scale)
    figures, swamped = [], 0
    for label, v in zip(_labels(plan), noisy, strict=True):
        swamped += h >= abs(v)
        low, high = _side_of_zero(v - h, v + h, plan.lo, plan.hi)
        figures.append(Figure(label, "sum", v, scale, low, high))
    return figures, _swamp_note(swamped)


def _ratio_box(s_lo: float, s_hi: float, n_lo: float, n_hi: float) -> tuple[float, float]:
    """The smallest and largest s / n over s in [s_lo, s_hi], n in [n_lo, n_hi], n_lo > 0."""
    low = s_lo / n_hi if s_lo >= 0 else s_lo / n_lo
    high = s_hi / n_lo if s_hi >= 0 else s_hi / n_hi
    return low, high


def _run_mean(plan: Plan, table: pa.Table) -> tuple[list[Figure], list[str]]:
    sum_part, count_part = plan.parts
    assert plan.spec.column is not None
    lo, width = plan.lo, plan.hi - plan.lo
    # each shifted value lies in [0, width] exactly (clipped after the float subtraction)
    shifted = np.clip(numeric_values(table.column(plan.spec.column)) - lo, 0.0, width)
    codes, size = _cell_codes(plan, table, plan.spec.by)
    sums, s_scale = noise.laplace(
        _sums_by_cell(shifted, codes, size), sum_part.sensitivity, sum_part.epsilon
    )
    counts, n_scale = noise.discrete_laplace(
        _counts_by_cell(shifted, codes, size), int(count_part.sensitivity), count_part.epsilon
    )
    hs = noise.laplace_half_width(s_scale, noise.ALPHA / 2)
    hn = noise.discrete_laplace_half_width(n_scale, noise.ALPHA / 2)

    def mean(shifted_mean: float) -> float:  # back to the column's units, inside [min, max]
        return min(max(lo + shifted_mean, lo), plan.hi)

    figures, unknown = [], []
    for label, s, n in zip(_labels(plan), sums, counts, strict=True):
        if n > 0:
            value = mean(s / n)
        else:
            value = mean(width / 2.0)
            unknown.append(label or "the column")
        if n - hn > 0:
            low, high = _ratio_box(s - hs, s + hs, n - hn, n + hn)
            ci = (mean(low), mean(high))
        else:
            ci = (lo, plan.hi)
        figures.append(
            Figure(label, "mean", value, s_scale / max(n, 1), *ci, noise_scales=(s_scale, n_scale))
        )
    notes = []
    if unknown:
        notes.append(
            "the noisy count of values is not positive for "
            + ", ".join(str(u) for u in unknown)
            + ": the mean there is unknown (shown as the middle of the range, with the "
            "whole declared range as its interval)"
        )
    return figures, notes


# -- quantiles ----------------------------------------------------------------------------------
def _run_quantiles(plan: Plan, table: pa.Table) -> tuple[list[Figure], list[str]]:
    assert plan.spec.column is not None
    values = numeric_values(table.column(plan.spec.column))
    data = np.clip(values[~np.isnan(values)], plan.lo, plan.hi).tolist()
    figures = []
    for level, part in zip(plan.spec.quantiles, plan.parts, strict=True):
        value, scale = noise.private_quantile(data, plan.candidates, level, part.epsilon, plan.k)
        rank_error = noise.quantile_rank_error(scale, len(plan.candidates))
        figures.append(Figure(None, part.measures, value, scale, None, None, rank_error))
    return figures, []


_RUNNERS: dict[QueryKind, Callable[[Plan, pa.Table], tuple[list[Figure], list[str]]]] = {
    QueryKind.COUNT: _run_count,
    QueryKind.SUM: _run_sum,
    QueryKind.MEAN: _run_mean,
    QueryKind.HISTOGRAM: _run_histogram,
    QueryKind.QUANTILES: _run_quantiles,
}
