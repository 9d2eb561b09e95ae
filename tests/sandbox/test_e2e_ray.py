"""The first slice end to end on a real local Ray: submit -> DP-SGD -> charge -> release -> predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories import FEATURES, job_spec, make_world

from foundation.errors import ComputeError
from privacy.budget_events import BudgetKey
from sandbox.jobs import JobState
from sandbox.ray_backend import RayBackend

pytestmark = pytest.mark.ray


def test_dp_job_on_ray_is_charged_released_and_usable(tmp_path: Path, ray_local) -> None:
    w = make_world(tmp_path / "zone", RayBackend(tmp_path / "zone"), patients=3000)
    seen: list[dict] = []
    job = w.svc.submit(w.researcher, job_spec(**{"training.epochs": 3}), on_progress=seen.append)
    assert job.state is JobState.SUCCEEDED
    assert seen and seen[-1]["epoch"] == 3  # live progress reached the caller
    r = job.result
    assert 0 < r["epsilon"] <= 1.0
    assert r["clipping"] == "book-keeping"
    # a small noisy test split can leave the AUROC undefined (no noisy positives): None then
    auroc = r["metrics"]["auroc"]
    assert auroc is None or 0.0 <= auroc <= 1.0

    bal = w.svc.ledger.balance(BudgetKey("readmission", "cohort"))
    assert bal.spent_epsilon == pytest.approx(r["epsilon"])
    assert bal.remaining_epsilon == pytest.approx(5.0 - r["epsilon"])

    out = tmp_path / "release"
    w.svc.job_result(w.researcher, job.id, out)
    card = json.loads((out / "model_card.json").read_text())
    for key in ("noise_multiplier", "sample_rate", "steps", "accountant", "epsilon", "delta"):
        assert key in card["privacy"]
    assert card["spec_hash"] == job.spec_hash
    assert card["audit_event"]["seq"] is not None

    # the release is usable outside the zone with one call
    from connectors.cohort import generate_cohort
    from training.predict import ReleasedModel

    model = ReleasedModel.load(out)
    fresh = generate_cohort(500, seed=42)
    scores = model.predict(fresh.select(FEATURES))
    assert scores.shape == (500,) and np.all((scores >= 0) & (scores <= 1))
    assert w.svc.audit_verify(w.steward).ok
    w.svc.close()


@pytest.mark.slow
def test_killed_worker_is_a_retryable_error_and_budget_is_consistent(
    tmp_path: Path, ray_local
) -> None:
    class KillingBackend(RayBackend):
        def submit(self, fn, payload, resources):
            def die(p):
                import os

                os._exit(1)

            return super().submit(die, payload, resources)

    w = make_world(tmp_path / "zone", KillingBackend(tmp_path / "zone"), patients=500)
    with pytest.raises(ComputeError) as err:
        w.svc.submit(w.researcher, job_spec())
    assert err.value.retryable
    (job,) = w.svc.jobs.list()
    assert job.state is JobState.FAILED
    # it died before opening data: nothing charged, nothing left reserved
    bal = w.svc.ledger.balance(BudgetKey("readmission", "cohort"))
    assert bal.spent_epsilon == 0 and bal.reserved_epsilon == 0
    w.svc.close()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, ray_local) -> None:
    from sandbox.demo import run_demo

    summary = run_demo(patients=4000, keep=tmp_path / "zone", as_json=True)
    assert summary["job"]["state"] == "succeeded"
    assert summary["audit"]["verified"]
    assert summary["budget"]["spent_epsilon"] > 0
    assert summary["scored_rows"] == 1000


@pytest.mark.slow
def test_served_demo_runs_end_to_end_through_the_installed_cli() -> None:
    """`sandbox demo --served`: the service under its own account, the CLI steps as others
    (as root; otherwise all as the caller), the same summary as the embedded demo."""
    import os
    import subprocess

    from cli_runner import SANDBOX

    proc = subprocess.run(
        [str(SANDBOX), "demo", "--served", "--patients", "4000", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["os_boundary"] is (os.geteuid() == 0)
    assert summary["job"]["state"] == "succeeded"
    assert 0 < summary["job"]["epsilon"] <= 1.0
    assert summary["synthetic"]["state"] == "succeeded" and summary["synthetic"]["report"]
    assert len(summary["federated"]) >= 2
    assert summary["audit"]["verified"] is True
    b = summary["budget"]
    assert b["spent_epsilon"] + b["remaining_epsilon"] == pytest.approx(b["granted_epsilon"])
