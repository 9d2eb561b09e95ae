"""A steward revokes a grant; a researcher cancels a queued job. Both leave the ledger whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import job_spec, make_world

from foundation.errors import PolicyDenied, SpecError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState

KEY = BudgetKey("readmission", "cohort")


def test_a_revoked_grant_refuses_every_later_job(tmp_path: Path, db_url: str) -> None:
    w = make_world(tmp_path / "zone", InProcessBackend(), patients=600, db_url=db_url)
    (grant,) = w.svc.store.list_grants(dataset="cohort")
    with pytest.raises(PolicyDenied):  # only a steward may revoke
        w.svc.revoke_grant(w.researcher, grant.id)
    revoked = w.svc.revoke_grant(w.steward, grant.id)
    assert revoked.revoked_at is not None
    with pytest.raises(PolicyDenied, match="revoked"):
        w.svc.submit(w.researcher, job_spec(**{"training.epochs": 1}))
    assert w.svc.ledger.balance(KEY).reserved_epsilon == 0
    last = w.svc.audit.list(limit=3)
    assert any(e.action == "access.revoke" and e.outcome == "ok" for e in last)


def test_a_queued_job_is_cancelled_and_its_reservation_released(
    tmp_path: Path, db_url: str
) -> None:
    w = make_world(tmp_path / "zone", InProcessBackend(), patients=600, db_url=db_url)
    spec = job_spec(**{"training.epochs": 1})
    job_id = w.svc.runner.admit("dp-sgd", w.researcher, spec, target=spec.project)
    assert w.svc.jobs.get(job_id).state is JobState.QUEUED
    assert w.svc.ledger.balance(KEY).reserved_epsilon == pytest.approx(1.0)

    with pytest.raises(PolicyDenied):  # a steward does not cancel researchers' jobs
        w.svc.cancel_job(w.steward, job_id)
    done = w.svc.cancel_job(w.researcher, job_id)
    assert done.state is JobState.FAILED and done.error == "cancelled by its submitter"
    bal = w.svc.ledger.balance(KEY)
    assert bal.reserved_epsilon == 0 and bal.spent_epsilon == 0
    with pytest.raises(SpecError, match="has ended"):
        w.svc.cancel_job(w.researcher, job_id)
    # the runner finds the job final and does nothing more
    assert w.svc.runner.handle_job(job_id).state is JobState.FAILED
