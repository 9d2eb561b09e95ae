"""Attack: put a person in both the training and the evaluation of one job.

A DP-SGD job on a dataset with an identifier is charged the larger of its training's and its
evaluation's epsilons, not their sum (parallel composition, chokepoint 20). That is honest
only while no person can be read by both: the reader's person split must be a rule of each
person alone. A researcher controls one input of the split, ``training.seed`` (the split's
salt), and may hope that some seed puts a person on both sides, or makes a person's side
depend on who else is in the data, so that the two releases both read them while the
ledger charges only one.

The attack: jobs submitted through the installed CLI with seeds the researcher picks; and,
for the same seeds, the reader's two parts on the governed file, also after half the persons
leave. Every seed keeps the parts disjoint and every person's side fixed, and each job is
charged once, the plan's figure, at most the epsilon asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from cli_runner import ok, sandbox
from factories import make_world

from connectors.cohort import cohort_contract, generate_cohort
from connectors.dataset_handle import DatasetHandle
from connectors.ingest import ingest_table
from connectors.preprocess import FeaturePlan
from connectors.reader import Split, load_split
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.service import Service
from sandbox.zone import Zone

pytestmark = pytest.mark.ray

#: seeds a researcher might try: the smallest, large ones, bit patterns
SEEDS = (0, 1, 7, 2**31 - 1, 2**62, 0x5555_5555_5555)
SECRET = b"split-seed-attack-secret-0123456"
EPSILON = 0.5


def _sides(table: pa.Table, folder: Path, seed: int) -> dict[float, str]:
    """Each person's side (by a unique age) in one ingest of ``table`` under ``seed``."""
    contract = cohort_contract()
    report = ingest_table(table, contract, folder, SECRET)
    plan = FeaturePlan.from_contract(contract, ["age"])
    handle = DatasetHandle("cohort", report.path.parent, contract, "job-attack")
    sides: dict[float, str] = {}
    for part in (Split.TRAIN, Split.TEST):
        X, _ = load_split(handle, plan, "readmitted_30d", part, seed=seed)
        for code in X[:, 0].numpy():
            key = round(float(code), 5)
            assert key not in sides, f"seed {seed}: a person is on both sides"
            sides[key] = part.value
    return sides


@pytest.mark.parametrize("seed", SEEDS)
def test_no_seed_puts_a_person_on_both_sides_or_lets_others_move_them(
    tmp_path: Path, seed: int
) -> None:
    table = generate_cohort(200, seed=3).slice(0, 120)
    ages = pa.array(18.0 + 0.5 * np.arange(120), pa.float64())  # one age per person
    table = table.set_column(table.schema.get_field_index("age"), "age", ages)
    everyone = _sides(table, tmp_path / "all", seed)
    assert len(everyone) == 120
    fewer = _sides(table.take(np.arange(0, 120, 2)[::-1]), tmp_path / "fewer", seed)
    assert len(fewer) == 60 and all(everyone[k] == side for k, side in fewer.items())


def test_a_job_with_a_chosen_seed_is_charged_once_the_plans_parallel_figure(
    tmp_path: Path, ray_local: Any
) -> None:
    # set-up not under attack, in-process (each CLI start costs seconds)
    zone = tmp_path / "zone"
    world = make_world(zone, InProcessBackend(), patients=1000)
    world.svc.close()
    rita = world.researcher_token
    ray = ("--ray-address", ray_local.get_runtime_context().gcs_address)
    spent = 0.0
    for seed in (SEEDS[0], SEEDS[3]):
        spec = tmp_path / f"job-{seed}.toml"
        spec.write_text(
            f"""project = "readmission"
dataset = "cohort"
label = "readmitted_30d"
features = ["age", "sex"]
[model]
kind = "logistic"
hidden = []
[privacy]
epsilon = {EPSILON}
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = 1
batch_size = 64
lr = 0.1
seed = {seed}
[resources]
gpus = 0
""",
            encoding="utf-8",
        )
        job = ok(sandbox("submit", str(spec), *ray, "--json", zone=zone, token=rita))
        assert job["state"] == "succeeded"
        plan = job["result"]["plan"]
        assert plan["composition"] == "parallel"
        assert job["result"]["epsilon"] == plan["epsilon"] <= EPSILON
        spent += plan["epsilon"]
        out = tmp_path / f"release-{seed}"
        ok(sandbox("jobs", "result", job["id"], "--out", str(out), "--json", zone=zone, token=rita))
        card = json.loads((out / "model_card.json").read_text())
        assert "in parallel" in card["privacy"]["composition"]
    # each job charged once, its plan's figure: nothing more, nothing less
    svc = Service(Zone.open(zone), InProcessBackend())
    try:
        balance = svc.ledger.balance(BudgetKey("readmission", "cohort"))
    finally:
        svc.close()
    assert balance.spent_epsilon == pytest.approx(spent, rel=1e-12)
