"""Do the stated 95% intervals hold? 200 runs of each query on one demo cohort, at epsilon 1.

The truth is computed here, independently of the engine (pandas and plain comparisons), and
each figure's interval must hold it in at least 90% of the runs, pooled over the query's
figures (each figure alone in at least 85%, so one unlucky cell of many cannot hide). For
quantiles there is no interval: the check is the rank error's own statement. With OpenDP's
score u(c) = |(1 - q) #{x < c} - q #{x > c}| (in rows) computed here over the same candidate
grid, u(released) - min_c u(c) <= rank_error must hold; min_c u(c) is the grid's own error.
The noise is unseedable (OpenSSL), so these are statistical tests: at true coverage 95% a
figure falls under 85% of 200 runs with probability ~1e-9, the pooled rate under 90% with
probability ~1e-3 for a single-figure query and far less for the rest.

Run with ``-s`` to see the coverage figures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from connectors.cohort import cohort_contract, generate_cohort
from privacy.dpquery.engine import QueryAnswer, run
from privacy.dpquery.spec import QuerySpec, columns_needed

RUNS = 200
N = 3000
CONTRACT = cohort_contract()
LO, HI = 18.0, 105.0  # the contract's declared age range, written out


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return generate_cohort(N, seed=21).to_pandas()


@pytest.fixture(scope="module")
def table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _cells(values: pd.Series, declared: list[str]) -> dict[str, float]:
    """Counts per declared category, then (other), then (missing) for nulls."""
    out = {c: float((values == c).sum()) for c in declared}
    out["(other)"] = float((values.notna() & ~values.isin(declared)).sum())
    out["(missing)"] = float(values.isna().sum())
    return out


def _age_bins(age: pd.Series, bins: int) -> dict[str, float]:
    edges = [LO + (HI - LO) * i / bins for i in range(bins)] + [HI]
    x = age.dropna().clip(LO, HI)
    out = {}
    for i in range(bins):
        last = i == bins - 1
        inside = (x >= edges[i]) & ((x <= edges[i + 1]) if last else (x < edges[i + 1]))
        out[f"[{edges[i]:g}, {edges[i + 1]:g}{']' if last else ')'}"] = float(inside.sum())
    out["(missing)"] = float(age.isna().sum())
    return out


def _truths(df: pd.DataFrame) -> dict[str, Callable[[str | None, str], float]]:
    age = df["age"]
    hospitals = list(CONTRACT.column("hospital").categories or ())
    by_hospital = _cells(df["hospital"], hospitals)
    sex = _cells(df["sex"], list(CONTRACT.column("sex").categories or ()))
    bins = _age_bins(age, 8)
    return {
        "count": lambda g, s: float(len(df)),
        "count-by-hospital": lambda g, s: by_hospital[g or ""],
        "sum-age": lambda g, s: float(age.clip(LO, HI).sum()),
        "mean-age": lambda g, s: float(age.clip(LO, HI).mean()),
        "histogram-sex": lambda g, s: sex[s],
        "histogram-age-8": lambda g, s: bins[s],
    }


QUERIES = {
    "count": {"kind": "count"},
    "count-by-hospital": {"kind": "count", "by": "hospital"},
    "sum-age": {"kind": "sum", "column": "age"},
    "mean-age": {"kind": "mean", "column": "age"},
    "histogram-sex": {"kind": "histogram", "column": "sex"},
    "histogram-age-8": {"kind": "histogram", "column": "age", "bins": 8},
}


def _answers(name: str, fields: dict, table: pa.Table) -> list[QueryAnswer]:
    spec = QuerySpec.from_dict({"dataset": "cohort", "epsilon": 1.0, **fields})
    rows = table.select(columns_needed(spec))
    return [run(spec, CONTRACT, rows) for _ in range(RUNS)]


@pytest.mark.parametrize("name", list(QUERIES))
def test_the_95_intervals_cover_the_truth(name: str, frame: pd.DataFrame, table: pa.Table) -> None:
    truth = _truths(frame)[name]
    hits: dict[tuple[str | None, str], list[bool]] = {}
    for answer in _answers(name, QUERIES[name], table):
        for f in answer.figures:
            assert f.ci_low is not None and f.ci_high is not None
            t = truth(f.group, f.statistic)
            hits.setdefault((f.group, f.statistic), []).append(f.ci_low <= t <= f.ci_high)
    pooled = float(np.mean([h for v in hits.values() for h in v]))
    worst = min(float(np.mean(v)) for v in hits.values())
    print(
        f"\n{name}: {len(hits)} figure(s), coverage pooled {pooled:.3f}, worst figure {worst:.3f}"
    )
    assert all(len(v) == RUNS for v in hits.values())
    assert pooled >= 0.90 and worst >= 0.85


def _scores(x: np.ndarray, candidates: np.ndarray, q: float) -> np.ndarray:
    """OpenDP's quantile score in rows, written out: |(1 - q) #{x < c} - q #{x > c}|."""
    xs = np.sort(x)
    below = np.searchsorted(xs, candidates, side="left")
    above = len(xs) - np.searchsorted(xs, candidates, side="right")
    return np.abs((1 - q) * below - q * above)


@pytest.mark.parametrize(
    ("column", "lo", "hi", "levels"),
    [("age", LO, HI, (0.25, 0.5, 0.75)), ("hemoglobin", 3.0, 20.0, (0.1, 0.5, 0.9))],
)
def test_quantiles_land_within_the_rank_error(
    column: str,
    lo: float,
    hi: float,
    levels: tuple[float, ...],
    frame: pd.DataFrame,
    table: pa.Table,
) -> None:
    spec = QuerySpec("cohort", "quantiles", 1.0, column=column, quantiles=levels)
    rows = table.select(columns_needed(spec))
    x = np.sort(frame[column].dropna().clip(lo, hi).to_numpy())  # nulls dropped, clamped
    grid = np.linspace(lo, hi, 201)  # the documented grid: 201 points over [min, max]
    scores = {q: _scores(x, grid, q) for q in levels}
    excess: dict[float, list[float]] = {q: [] for q in levels}
    ranks: dict[float, list[bool]] = {q: [] for q in levels}
    rank_error: dict[float, float] = {}
    for _ in range(RUNS):
        for q, f in zip(levels, run(spec, CONTRACT, rows).figures, strict=True):
            assert f.rank_error is not None and f.ci_low is None
            (at,) = np.flatnonzero(np.isclose(grid, f.value, rtol=0, atol=1e-9))
            excess[q].append(float(scores[q][at] - scores[q].min()))
            rank_error[q] = f.rank_error
            # the plain-words claim: the target rank q n is within rank_error (plus the grid's
            # own error) of the ranks [#{x < v}, #{x <= v}] the released value v spans
            first, last = np.searchsorted(x, f.value, "left"), np.searchsorted(x, f.value, "right")
            gap = max(first - q * len(x), q * len(x) - last, 0.0)
            ranks[q].append(gap <= f.rank_error + scores[q].min())
    for q in levels:
        inside = float(np.mean(np.array(excess[q]) <= rank_error[q]))
        print(
            f"\n{column} p{q * 100:g}: rank_error {rank_error[q]:.1f} rows, grid's own error "
            f"{scores[q].min():.1f}, within in {inside:.3f} of runs (rank claim "
            f"{np.mean(ranks[q]):.3f}), 95th percentile of the excess "
            f"{np.quantile(excess[q], 0.95):.1f}, largest {max(excess[q]):.1f}"
        )
        assert inside >= 0.90 and np.mean(ranks[q]) >= 0.90
