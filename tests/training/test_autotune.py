"""The rule that picks hyperparameters nobody wrote (``training.autotune``): a pure,
deterministic function of public numbers, whose grid keeps the written fields and whose
choice keeps the prior unless the free data shows a clear winner."""

from __future__ import annotations

import math

import pytest

from training import autotune as at
from training.dpsgd_config import Optimizer

ALL = at.FIELDS


@pytest.mark.parametrize("n", [10, 64, 400, 1000, 1600, 6400, 40_000, 1_000_000])
@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_the_prior_is_large_batch_enough_steps_and_a_bounded_lr(n: int, optimizer) -> None:
    h = at.prior(n, optimizer)
    assert 1 <= h.batch_size <= n
    assert h.batch_size == min(n, max(at.MIN_BATCH, min(round(8 * math.sqrt(n)), n // 8)))
    lo, hi = at.EPOCH_RANGE
    assert lo <= h.epochs <= hi
    steps = at.steps_of(n, h.batch_size, h.epochs)
    if n >= 400:
        # the epochs follow from the batch: TARGET_STEPS steps, to the nearest epoch
        assert abs(steps - at.TARGET_STEPS) <= math.ceil(n / h.batch_size) / 2
    assert h.max_grad_norm == at.CLIP_PRIOR
    if optimizer is Optimizer.SGD:
        assert h.lr == at.SGD_LR_TIMES_CLIP / h.max_grad_norm
    else:
        assert at.ADAM_LR_RANGE[0] <= h.lr <= at.ADAM_LR_RANGE[1]
    # large tables: large batches and few epochs
    if n >= 40_000:
        assert h.batch_size >= 1000 and h.epochs <= 25


def test_the_rule_is_pure_and_deterministic() -> None:
    a = at.candidates(6400, Optimizer.ADAM, ALL)
    b = at.candidates(6400, Optimizer.ADAM, list(reversed(ALL)))
    assert a == b  # the order the fields are named in does not matter
    assert a == at.candidates(6400, Optimizer.ADAM, ALL)
    assert a[0].moves == "" and a[0].hyper == at.prior(6400, Optimizer.ADAM)
    assert len(a) == len({c.hyper for c in a}) <= 6
    # every field free: the batch stays large and the epochs move (the schedule's lever)
    assert {c.hyper.batch_size for c in a} == {a[0].hyper.batch_size}
    assert {c.moves for c in a} == {"", "training.epochs", "privacy.max_grad_norm", "training.lr"}


def test_written_fields_never_move() -> None:
    written = {"training.epochs": 7, "privacy.max_grad_norm": 2.0}
    grid = at.candidates(5000, Optimizer.ADAM, ["training.lr", "training.batch_size"], written)
    assert {c.hyper.epochs for c in grid} == {7}
    assert {c.hyper.max_grad_norm for c in grid} == {2.0}
    # with the epochs written, the batch is the schedule's lever
    assert {c.moves for c in grid} == {"", "training.batch_size", "training.lr"}
    assert all(c.hyper.batch_size <= 5000 for c in grid)
    only_lr = at.candidates(
        5000, Optimizer.SGD, ["training.lr"], {**written, "training.batch_size": 100}
    )
    assert [c.hyper.lr for c in only_lr] == [0.5, 0.17, 1.5]  # lr * C = 1, then /3 and x3
    with pytest.raises(ValueError):
        at.candidates(5000, Optimizer.ADAM, ["training.seed"])


def test_a_learning_rate_the_rule_picks_follows_the_steps() -> None:
    grid = at.candidates(6400, Optimizer.ADAM, ALL)
    by_steps = sorted(
        (at.steps_of(6400, c.hyper.batch_size, c.hyper.epochs), c.hyper.lr)
        for c in grid
        if c.moves == "training.epochs"
    )
    assert by_steps[0][1] > by_steps[1][1]  # fewer steps, a larger step size


def test_choose_keeps_the_prior_without_signal_or_a_clear_winner() -> None:
    se = [0.02] * 4
    # dummy data: nothing above chance by two SEs
    assert at.choose([0.51, 0.53, 0.49, 0.52], se).index == 0
    # a winner within one SE of the prior: the prior
    assert at.choose([0.70, 0.71, 0.60, 0.65], se).index == 0
    # a clear winner
    c = at.choose([0.70, 0.75, 0.60, 0.65], se)
    assert c.index == 1 and "best" in c.reason
    # a refused candidate (None) is never chosen; a refused prior loses to a winner
    assert at.choose([None, 0.75, None, 0.65], se).index == 1
    assert at.choose([None, None], [math.inf, math.inf]).index == 0


def test_combined_takes_each_fields_best_move() -> None:
    grid = at.candidates(6400, Optimizer.ADAM, ALL)
    scores: list[float | None] = [0.70] * len(grid)
    for i, c in enumerate(grid):
        if c.moves == "training.epochs" and c.hyper.epochs > grid[0].hyper.epochs:
            scores[i] = 0.74
        if c.moves == "training.lr" and c.hyper.lr > grid[0].hyper.lr:
            scores[i] = 0.73
    h = at.combined(grid, scores, 6400, Optimizer.ADAM, ALL)
    base = grid[0].hyper
    longer = next(
        c.hyper for c in grid if c.moves == "training.epochs" and c.hyper.epochs > base.epochs
    )
    # the longer candidate's epochs (twice the prior's, within the rule's range)
    assert h.epochs == longer.epochs == min(2 * base.epochs, at.EPOCH_RANGE[1])
    assert h.batch_size == base.batch_size
    assert h.max_grad_norm == base.max_grad_norm  # its move did not beat the prior
    # the lr follows the longer run, times the winning lr move's factor (3)
    assert h.lr == pytest.approx(3 * longer.lr, rel=0.05)
    # nothing beat the prior: the prior
    assert at.combined(grid, [0.7] * len(grid), 6400, Optimizer.ADAM, ALL) == base


def test_auroc_se() -> None:
    assert at.auroc_se(0.5, 0, 10) == math.inf
    small, large = at.auroc_se(0.7, 50, 150), at.auroc_se(0.7, 500, 1500)
    assert 0 < large < small < 0.1
    assert large == pytest.approx(small / math.sqrt(10), rel=0.1)


def test_every_value_is_one_a_spec_may_hold() -> None:
    """The resolved spec is stored and parsed again: nothing outside the spec's bounds."""
    for optimizer in Optimizer:
        for clip in (0.001, 0.3, 1.0, 1e4):
            written = {"privacy.max_grad_norm": clip}
            for c in at.candidates(50_000, optimizer, ["training.lr"], written):
                assert 0 < c.hyper.lr <= at.LR_MAX


def test_a_linear_model_takes_the_larger_adam_prior_and_follows_the_steps_alike() -> None:
    mlp, linear = at.prior(6400, Optimizer.ADAM), at.prior(6400, Optimizer.ADAM, linear=True)
    assert (mlp.batch_size, mlp.epochs) == (linear.batch_size, linear.epochs)
    steps = at.steps_of(6400, mlp.batch_size, mlp.epochs)
    ratio = math.sqrt(at.TARGET_STEPS / steps)
    assert mlp.lr == pytest.approx(at.ADAM_LR * ratio, rel=0.05)
    assert linear.lr == pytest.approx(at.ADAM_LR_LINEAR * ratio, rel=0.05)
    # every candidate of the linear grid whose lr the rule picks follows the linear prior
    grid = at.candidates(6400, Optimizer.ADAM, ALL, linear=True)
    for c in grid:
        if c.moves in ("", "training.epochs", "privacy.max_grad_norm"):
            s = at.steps_of(6400, c.hyper.batch_size, c.hyper.epochs)
            assert c.hyper.lr == at.prior_lr(Optimizer.ADAM, s, c.hyper.max_grad_norm, linear=True)
    # SGD's prior does not depend on the model
    assert at.prior(6400, Optimizer.SGD).lr == at.prior(6400, Optimizer.SGD, linear=True).lr
