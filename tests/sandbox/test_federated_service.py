"""A federated job through the zone's service: per-site grants, reservations, charges, release."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import FEATURES, LABEL, job_spec

from foundation.errors import BudgetExceeded, PolicyDenied, SpecError
from privacy.accountant import GaussianStep, epsilon_for
from privacy.budget_events import BudgetKey
from sandbox.jobs import JobState
from sandbox.ray_backend import RayBackend
from sandbox.service import Service

pytestmark = pytest.mark.ray

SITES = ["hospital-a", "hospital-b", "hospital-c"]
#: two CPUs per site's client: on the tests' two-CPU Ray, Flower's pool is one ClientApp actor
#: (each costs ~5 CPU-s to start: a Ray worker importing Flower and torch) and the sites train
#: in turn; tests/training/test_federated.py runs a simulation with two actors
CLIENT_CPUS = 2


def _fed_spec(**overrides):
    fed = {"rounds": 2, "sites": SITES, "min_sites": 2, "local_epochs": 1, "strategy": "fedavg"}
    fed.update(overrides.pop("federated", {}))
    return job_spec(
        mode="federated",
        federated=fed,
        **{"training.batch_size": 64, "model": {"kind": "logistic", "hidden": []}},
        resources={"gpus": 0, "cpus": CLIENT_CPUS},
        **overrides,
    )


def _world(root: Path, mechanisms=("federated",), epsilon=3.0):
    svc, op = Service.init_zone(root, RayBackend(root))
    operator = svc.authenticate(op)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, rita = svc.authenticate(st), svc.authenticate(rt)
    svc.ingest_demo(steward, "cohort", 6000, seed=3)
    svc.create_project(rita, "readmission", "risk")
    req = svc.request_access(
        rita, "readmission", "cohort", [*FEATURES, LABEL], list(mechanisms), epsilon, 1e-5
    )
    svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=10))
    return svc, steward, rita


def test_federated_job_charges_each_site(tmp_path: Path, ray_local) -> None:
    svc, steward, rita = _world(tmp_path / "zone")
    ds = svc.store.get_dataset("cohort")
    # a budget per hospital, none on the dataset as a whole (no other mechanism granted)
    for site in ds.sites:
        assert svc.ledger.balance(BudgetKey("readmission", "cohort", site)).granted_epsilon == 3.0
    assert svc.ledger.balance(BudgetKey("readmission", "cohort")).granted_epsilon == 0

    quote = svc.quote(rita, _fed_spec())
    seen = []
    job = svc.submit(rita, _fed_spec(), on_progress=seen.append)
    assert job.state is JobState.SUCCEEDED
    assert [p["round"] for p in seen] == [1, 2]
    summary = json.loads((svc.zone.job_dir(job.id) / "federated" / "summary.json").read_text())
    for site in SITES:
        bal = svc.ledger.balance(BudgetKey("readmission", "cohort", site))
        info = summary["sites"][site]
        assert 0 < bal.spent_epsilon <= 1.0 + 1e-9
        assert bal.reserved_epsilon == 0
        # independent recomputation: the site's plan in full (every round, the evaluation),
        # whatever the server reports the site spent
        plan = info["plan"]
        planned_steps = plan["steps_per_round"] * 2
        assert info["steps"] <= planned_steps
        history = [
            GaussianStep(plan["noise_multiplier"], plan["sample_rate"], planned_steps),
            GaussianStep(plan["eval_sigma"], 1.0, 1),
        ]
        assert bal.spent_epsilon == pytest.approx(epsilon_for(history, 1e-6), rel=1e-6)
        # the quote showed what the site ran and what it was charged, to the last digit:
        # every site plans on the service's size for it (its persons x 0.8), never its count
        quoted = quote["sites"][site]
        assert plan["n"] == int(ds.sites[site] * 0.8)
        for name in ("noise_multiplier", "sample_rate", "eval_sigma"):
            assert quoted[name] == plan[name], (site, name)
        assert quoted["steps"] == planned_steps
        assert quoted["epsilon"] == bal.spent_epsilon
    # sites not in the job are untouched
    other = sorted(set(ds.sites) - set(SITES))[0]
    assert svc.ledger.balance(BudgetKey("readmission", "cohort", other)).spent_epsilon == 0
    rounds = [e for e in svc.audit.list(limit=500) if e.action == "federated.round"]
    assert len(rounds) == 2

    out = tmp_path / "release"
    svc.job_result(rita, job.id, out)
    card = json.loads((out / "model_card.json").read_text())
    assert set(card["privacy"]["per_site"]) >= set(SITES)
    assert card["federated"]["rounds"] == 2
    # each site's optimizer (the spec's default, Adam) and whether the pooled DP AUROC's
    # interval shows learning, on the card and in the result the CLI prints
    assert card["training"]["optimizer"] == "adam" and "epochs" not in card["training"]
    assert job.result["optimizer"] == {"name": "adam", "lr": card["training"]["lr"]}
    assert card["learned"]["verdict"] in ("yes", "not shown")
    assert "DP AUROC" in card["learned"]["statement"]
    from training.predict import ReleasedModel

    assert ReleasedModel.load(out).plan.n_outputs > 0
    assert svc.audit_verify(steward).ok
    svc.close()


def test_federated_needs_its_own_grant_and_budget(tmp_path: Path, ray_local) -> None:
    svc, _, rita = _world(tmp_path / "zone", mechanisms=("dp-sgd",))
    with pytest.raises(PolicyDenied, match="federated"):
        svc.submit(rita, _fed_spec())
    svc.close()
    svc, _, rita = _world(tmp_path / "zone2", epsilon=0.5)
    with pytest.raises(BudgetExceeded, match="no site was charged"):
        svc.submit(rita, _fed_spec())
    for site in SITES:
        bal = svc.ledger.balance(BudgetKey("readmission", "cohort", site))
        assert bal.reserved_epsilon == 0 and bal.spent_epsilon == 0
    with pytest.raises(SpecError, match="federated.sites"):
        svc.submit(
            rita,
            _fed_spec(
                federated={"sites": ["hospital-zz"], "min_sites": 1}, **{"privacy.epsilon": 0.1}
            ),
        )
    svc.close()
