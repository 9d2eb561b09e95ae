"""MST's post-processing (``privacy.synth.marginals``): how the noisy anchors are denoised and
how large the pair tables are, and that neither changes the releases the service plans.

Denoising and the pair-table size read the noisy releases only (never rows), so they cost
nothing; what is pinned here is what they are for: a noise-only tail of a wide declared domain
gets no rows (without denoising, noise spreads synthetic rows over the empty ends of the
domain, which the report's pair trends punish), the margins the rest of the model is raked to
are kept, and the releases (their number and noise) are still exactly the plan's on a table
with log-scale, nullable and small-integer columns."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from privacy.accountant import epsilon_for
from privacy.job_plan import plan_synth
from privacy.noisy_counts import project_to_simplex
from privacy.synth import marginals
from privacy.synth.base import fit_and_sample
from privacy.synth.codec import ColumnCodec

DELTA = 1e-6


def _binned(lo: float = 0.0, hi: float = 320.0) -> ColumnCodec:
    spec = ColumnSpec("x", "float64", Role.FEATURE, min=lo, max=hi, nullable=False)
    return ColumnCodec.from_spec(spec)


def test_segments_recover_a_step_function() -> None:
    counts = np.asarray([0.0] * 5 + [10.0] * 6 + [3.0] * 5)
    assert marginals._segments(counts, penalty=1.0) == [(0, 5), (5, 11), (11, 16)]
    # a penalty above what any cut saves gives one piece
    assert marginals._segments(counts, penalty=1e6) == [(0, 16)]


def _tail_table(rng: np.random.Generator, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """A (label, bin) table with all its persons in bins 10..19 of 32, and its noisy copy."""
    true = np.zeros((2, 32))
    true[0, 10:20] = 30.0
    true[1, 12:20] = 20.0
    return true, true + rng.normal(0.0, sigma, true.shape)


def _ks(true: np.ndarray, est: np.ndarray) -> float:
    a, b = np.cumsum(true.sum(axis=0)), np.cumsum(est.sum(axis=0))
    return float(np.abs(a / a[-1] - b / b[-1]).max())


def test_denoising_leaves_the_empty_tails_less_noise_than_a_projection() -> None:
    # what the model did before: project each label's noisy row onto the non-negative rows
    # with the label's total; the noise left in the 18 empty bins became synthetic rows there
    sigma, tails = 8.0, np.r_[0:8, 22:32]
    ours, projected, ks_ours, ks_projected = [], [], [], []
    for seed in range(20):
        true, noisy = _tail_table(np.random.default_rng(seed), sigma)
        label_marginal = true.sum(axis=1)
        est = marginals._denoise(_binned(), noisy, label_marginal, sigma)
        plain = project_to_simplex(noisy, label_marginal)
        ours.append(est[:, tails].sum() / est.sum())
        projected.append(plain[:, tails].sum() / plain.sum())
        ks_ours.append(_ks(true, est))
        ks_projected.append(_ks(true, plain))
    assert np.mean(ours) < 0.75 * np.mean(projected)
    assert np.mean(ks_ours) < np.mean(ks_projected)


def test_denoising_keeps_the_margins() -> None:
    sigma = 8.0
    true, noisy = _tail_table(np.random.default_rng(0), sigma)
    label_marginal = np.asarray([290.0, 170.0])  # a noisy estimate, not the true one
    est = marginals._denoise(_binned(), noisy, label_marginal, sigma)
    assert (est >= 0).all()
    np.testing.assert_allclose(est.sum(axis=1), label_marginal, rtol=1e-6)
    # the label's split follows the data where the data is (more label 0 in bins 10..11)
    assert est[0, 10:12].sum() > est[1, 10:12].sum()


def test_denoising_when_nothing_rises_above_the_noise() -> None:
    # all noise: the declared domain, evenly; never NaN, never negative
    noisy = np.random.default_rng(3).normal(0.0, 50.0, (2, 32))
    est = marginals._denoise(_binned(), noisy, np.asarray([5.0, 5.0]), 50.0)
    assert np.isfinite(est).all() and (est >= 0).all()
    np.testing.assert_allclose(est.sum(axis=1), [5.0, 5.0], rtol=1e-6)


def test_denoising_a_category_keeps_each_value_apart() -> None:
    spec = ColumnSpec("c", "string", Role.FEATURE, categories=("a", "b", "c"), nullable=True)
    column = ColumnCodec.from_spec(spec)  # a, b, c, other, missing
    true = np.asarray([[100.0, 0.0, 50.0, 0.0, 20.0], [60.0, 0.0, 10.0, 0.0, 10.0]])
    est = marginals._denoise(column, true, true.sum(axis=1), 1e-3)
    np.testing.assert_allclose(est, true, atol=0.2)  # up to the 0.1% floor of the split


def test_pair_tables_grow_with_persons_and_shrink_with_noise() -> None:
    small = marginals._pair_values(400.0, 2, 30.0)
    assert small == 2
    assert marginals._pair_values(40_000.0, 2, 5.0) == marginals.MAX_PAIR_VALUES
    sizes = [marginals._pair_values(n, 2, 10.0) for n in (500.0, 2_000.0, 8_000.0)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert marginals._pair_values(2_000.0, 2, 20.0) <= marginals._pair_values(2_000.0, 2, 5.0)
    assert marginals._pair_values(1_000.0, 2, math.inf) == marginals.MAX_PAIR_VALUES


SMALL_TABLE = """
[dataset]
rows_per_person = "one"

[columns.pid]
type = "string"
role = "identifier"

[columns.age]
type = "int16"
role = "feature"
min = 18
max = 110
nullable = false

[columns.crp]
type = "float64"
role = "feature"
min = 0
max = 500
scale = "log"

[columns.nodes]
type = "int16"
role = "feature"
min = 0
max = 20
scale = "log"
nullable = false

[columns.grade]
type = "string"
role = "feature"
categories = ["I", "II", "III"]

[columns.event]
type = "int8"
role = "label"
"""


def _small_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    age = np.clip(np.round(rng.normal(60, 10, n)), 18, 110)
    crp = np.exp(rng.normal(1.5, 1.2, n))
    crp = np.where(rng.random(n) < 0.1, np.nan, np.clip(crp, 0, 500))
    nodes = np.clip(rng.poisson(2.0, n), 0, 20)
    grade = rng.choice(["I", "II", "III"], n)
    logit = -1.0 + 0.04 * (age - 60) + 0.3 * nodes
    event = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return pa.table(
        {
            "pid": pa.array([f"p{i}" for i in range(n)]),
            "age": pa.array(age.astype(np.int16)),
            "crp": pa.array(crp, from_pandas=True),
            "nodes": pa.array(nodes.astype(np.int16)),
            "grade": pa.array(grade),
            "event": pa.array(event),
        }
    )


@pytest.mark.parametrize("epsilon", [0.5, 3.0])
def test_the_plan_is_still_the_engines_releases_on_a_small_log_scale_table(
    epsilon: float,
) -> None:
    contract = SchemaContract.from_toml_text(SMALL_TABLE)
    table = _small_table(300, seed=1)
    fit = fit_and_sample(
        "mst", table, contract, epsilon=epsilon, delta=DELTA, rows=400, seed=0, noise_seed=1
    )
    plan = plan_synth("mst", contract, epsilon, DELTA)
    assert list(plan.steps) == list(fit.steps)
    assert plan.epsilon == epsilon_for(list(fit.steps), DELTA) == fit.epsilon <= epsilon
    assert fit.table.num_rows == 400
    ages = np.asarray(fit.table["age"])
    assert ((ages >= 18) & (ages <= 110)).all()


def test_a_small_table_gets_no_rows_far_outside_its_data() -> None:
    # 2,000 persons aged about 45 to 75, declared 18..110: at epsilon 3 the noise-only ends of
    # the declared domain get (almost) no synthetic rows
    contract = SchemaContract.from_toml_text(SMALL_TABLE)
    table = _small_table(2_000, seed=2)
    fit = fit_and_sample(
        "mst", table, contract, epsilon=3.0, delta=DELTA, rows=2_000, seed=0, noise_seed=3
    )
    ages = np.asarray(fit.table["age"])
    real = np.asarray(table["age"])
    outside = (ages < real.min() - 10) | (ages > real.max() + 10)
    assert outside.mean() < 0.01
