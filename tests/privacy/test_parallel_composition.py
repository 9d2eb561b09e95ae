"""A DP-SGD job's training and its evaluation compose in parallel, and only when they may.

The evaluation histogram reads the test part of the reader's person split, the training the
train part. When each person's part is a rule of that person alone (a keyed hash of their
pseudonym: the contract has an identifier column), adding or removing one person changes
one part's input only, so the job costs the larger of the two epsilons
(``privacy.accountant.epsilon_parallel``), not their sum. Pinned here:

- the figure: each part checked against Google's ``dp_accounting`` on its own, the whole
  the larger, and each part calibrated to the whole target;
- the premise (``tests/attacks/test_split_seed.py``): with an identifier a person's part does
  not move when other persons come or go, and no seed puts a person in both parts;
- the rule that uses it: a contract without an identifier (the split follows row
  positions, which other persons move) plans sequentially.
"""

from __future__ import annotations

from types import SimpleNamespace

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import RdpAccountant

from connectors.cohort import cohort_contract
from privacy.accountant import (
    RDP_ORDERS,
    Composition,
    GaussianStep,
    dpsgd_epsilon,
    epsilon_for,
    epsilon_parallel,
    plan_dpsgd,
)
from privacy.job_plan import plan_job
from sandbox.mechanisms.dpsgd_plan import disjoint_eval
from sandbox.mechanisms.plans import dpsgd_epsilon as charged_epsilon

SECRET = b"parallel-tests-secret-0123456789"
DELTA = 1e-6


def _google(step: GaussianStep) -> float:
    accountant = RdpAccountant(list(RDP_ORDERS))
    gaussian = dpa.GaussianDpEvent(step.noise_multiplier)
    event = (
        gaussian
        if step.sample_rate == 1.0
        else dpa.PoissonSampledDpEvent(step.sample_rate, gaussian)
    )
    accountant.compose(event, step.steps)
    return float(accountant.get_epsilon(DELTA))


@pytest.mark.parametrize(
    ("target", "n", "batch", "epochs"),
    [(1.0, 320, 64, 100), (3.0, 1600, 200, 20), (8.0, 40_000, 256, 5)],
)
def test_each_part_gets_the_whole_target_and_the_job_costs_the_larger(
    target: float, n: int, batch: int, epochs: int
) -> None:
    par = plan_dpsgd(target, DELTA, n, batch, epochs, composition=Composition.PARALLEL)
    seq = plan_dpsgd(target, DELTA, n, batch, epochs, eval_share=0.2)
    training, evaluation = par.training_step, par.eval_step
    # each part alone, by an independent accountant: at most the target, and calibrated
    for step in (training, evaluation):
        assert 0.99 * target <= _google(step) * (1 + 1e-3)
        assert epsilon_for([step], DELTA) <= target
    assert par.epsilon == pytest.approx(max(_google(training), _google(evaluation)), rel=2e-3)
    assert par.epsilon == epsilon_parallel([[training], [evaluation]], DELTA) <= target
    # the sequential sum of the same two releases would overshoot the target
    assert epsilon_for([training, evaluation], DELTA) > target
    # what parallel buys: the evaluation's noise is several times smaller, training's no larger
    assert par.eval_sigma < seq.eval_sigma / 3
    assert par.noise_multiplier <= seq.noise_multiplier
    # one figure for the plan, the worker's report and the charge
    assert dpsgd_epsilon(training, evaluation, DELTA, "parallel") == par.epsilon
    assert charged_epsilon(par.to_dict()) == pytest.approx(par.epsilon, rel=1e-12)
    assert charged_epsilon(seq.to_dict()) == pytest.approx(seq.epsilon, rel=1e-12)


def test_a_plan_stored_before_plans_named_their_composition_is_charged_sequentially() -> None:
    seq = plan_dpsgd(1.0, DELTA, 2000, 128, 10, eval_share=0.2).to_dict()
    del seq["composition"]
    sequential = epsilon_for(
        [
            GaussianStep(seq["noise_multiplier"], seq["sample_rate"], seq["steps"]),
            GaussianStep(seq["eval_sigma"], 1.0, 1),
        ],
        DELTA,
    )
    assert charged_epsilon(seq) == pytest.approx(sequential, rel=1e-12)


def test_parallel_only_where_the_split_is_a_rule_of_the_person_alone() -> None:
    with_ids = cohort_contract().to_dict()
    assert disjoint_eval(SimpleNamespace(contract=with_ids)) is True
    without = {**with_ids, "columns": dict(with_ids["columns"])}
    for name, column in with_ids["columns"].items():
        if column.get("role") == "identifier":
            del without["columns"][name]
    assert disjoint_eval(SimpleNamespace(contract=without)) is False
    evaluated = {"evaluate": True, "eval_share": 0.2}
    seq = plan_job(1.0, DELTA, 2000, 128, 10, **evaluated, disjoint_eval=False)
    par = plan_job(1.0, DELTA, 2000, 128, 10, **evaluated, disjoint_eval=True)
    assert seq.to_dict()["composition"] == "sequential"
    assert par.to_dict()["composition"] == "parallel"
    assert seq.eval_sigma > par.eval_sigma
