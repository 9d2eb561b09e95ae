"""Synthetic data through the service: free dummy rows, charged DP synthesis, reports, dry runs, quotes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from factories import FEATURES, LABEL, job_spec

from connectors.cohort import Canaries
from foundation.errors import PolicyDenied
from privacy.accountant import GaussianStep, epsilon_for
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState
from sandbox.service import Service

SYNTH_COLS = ["hospital", "age", "sex", "diabetes", "hba1c", "prior_admissions", "readmitted_30d"]


@pytest.fixture
def world(tmp_path: Path):
    svc, op = Service.init_zone(tmp_path / "zone", InProcessBackend())
    operator = svc.authenticate(op)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, rita = svc.authenticate(st), svc.authenticate(rt)
    canaries = Canaries.make(3)
    svc.ingest_demo(steward, "cohort", 3000, seed=2, canaries=canaries)
    svc.create_project(rita, "readmission", "risk")
    req = svc.request_access(
        rita,
        "readmission",
        "cohort",
        sorted({*FEATURES, LABEL, *SYNTH_COLS, "primary_dx", "ethnicity"}),
        ["dp-sgd", "synthetic"],
        6.0,
        1e-5,
    )
    svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=5))
    yield svc, steward, rita, canaries
    svc.close()


def test_dummy_is_free_and_has_the_governed_schema(world, tmp_path: Path) -> None:
    svc, _, rita, _ = world
    out = tmp_path / "dummy.parquet"
    r = svc.synth_dummy(rita, "cohort", 500, out)
    assert r["charged_epsilon"] == 0 and pq.read_table(out).num_rows == 500
    assert svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon == 0


def test_dp_synthetic_release_is_charged_and_report_is_gated(world, tmp_path: Path) -> None:
    svc, steward, rita, canaries = world
    job = svc.synth_fit(
        rita,
        "readmission",
        "cohort",
        epsilon=2.0,
        method="mst",
        rows=1500,
        columns=[*SYNTH_COLS, "primary_dx", "ethnicity"],
    )
    assert job.state is JobState.SUCCEEDED
    r = job.result
    steps = [GaussianStep(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in r["steps"]]
    assert epsilon_for(steps, r["delta"]) == pytest.approx(r["epsilon"]) and r["epsilon"] <= 2.0
    bal = svc.ledger.balance(BudgetKey("readmission", "cohort"))
    assert bal.spent_epsilon == pytest.approx(r["epsilon"])

    out = tmp_path / "release"
    files = svc.job_result(rita, job.id, out)["files"]
    assert sorted(Path(f).name for f in files) == ["synth_card.json", "synthetic.parquet"]
    blob = (out / "synthetic.parquet").read_bytes() + (out / "synth_card.json").read_bytes()
    for c in canaries.values():
        assert c.encode() not in blob

    with pytest.raises(PolicyDenied, match="not released"):
        svc.synth_report(rita, job.id)
    full = svc.synth_report(steward, job.id)
    assert full["view"] == "steward" and full["plots"]
    svc.synth_release(steward, job.id)
    agg = svc.synth_report(rita, job.id)["report"]
    assert all(isinstance(v, int | float) or v is None for v in agg.values())
    assert not any(c in json.dumps(agg) for c in canaries.values())


def test_non_dp_baseline_is_held_for_the_steward(world, tmp_path: Path) -> None:
    svc, steward, rita, _ = world
    with pytest.raises(PolicyDenied, match="not differentially private"):
        svc.synth_fit(
            rita,
            "readmission",
            "cohort",
            epsilon=None,
            method="gaussian-copula",
            rows=200,
            columns=SYNTH_COLS,
        )
    job = svc.synth_fit(
        steward,
        "readmission",
        "cohort",
        epsilon=None,
        method="gaussian-copula",
        rows=200,
        columns=SYNTH_COLS,
    )
    assert job.state is JobState.SUCCEEDED and job.result["epsilon"] is None
    with pytest.raises(PolicyDenied, match="steward"):
        svc.job_result(rita, job.id, tmp_path / "x")
    assert svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon == 0


def test_dry_runs_charge_nothing_and_quote_matches_the_real_job(world, tmp_path: Path) -> None:
    svc, _, rita, _ = world
    spec = job_spec()
    dry = svc.dry_run(rita, spec, "dummy")
    assert dry.state is JobState.SUCCEEDED and dry.result["dry_run"] == "dummy"
    synth = svc.synth_fit(
        rita,
        "readmission",
        "cohort",
        epsilon=1.0,
        method="mst",
        rows=2000,
        columns=sorted({*FEATURES, LABEL, "hospital"}),
    )
    spent_before = svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon
    dry2 = svc.dry_run(rita, spec, f"synthetic:{synth.id}")
    assert dry2.state is JobState.SUCCEEDED
    assert svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon == spent_before
    svc.job_result(rita, dry2.id, tmp_path / "dry")  # a dry run's model is free to take

    q = svc.quote(rita, spec)
    assert q["epsilon"] <= spec.privacy.epsilon and q["plan"]["noise_multiplier"] > 0
    real = svc.submit(rita, spec)
    assert real.result["plan"]["noise_multiplier"] == pytest.approx(
        q["plan"]["noise_multiplier"], rel=0.05
    )

    curve = svc.quote_curve(rita, spec, "dummy", tmp_path / "curve", epsilons=(0.5, 2.0))
    assert len(curve["points"]) == 2 and Path(curve["png"]).read_bytes()[:4] == b"\x89PNG"
