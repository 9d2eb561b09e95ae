"""Reserve, plan and hand-over sit inside one guard: a submit that fails before compute has
the job releases every reservation and fails the job (nothing stays reserved or queued)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import FEATURES, LABEL, job_spec, make_world

from foundation.errors import ComputeError, SpecError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend


def _federated_world(root: Path, db_url: str | None = None):
    w = make_world(root, InProcessBackend(), patients=3000, grant_epsilon=None, db_url=db_url)
    req = w.svc.request_access(
        w.researcher, "readmission", "cohort", [*FEATURES, LABEL], ["federated"], 3.0, 1e-5
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    return w


def _fed_spec(**fed):
    return job_spec(
        mode="federated",
        federated={"rounds": 2, "sites": "all", "min_sites": 2, **fed},
        **{"training.batch_size": 32, "model": {"kind": "logistic", "hidden": []}},
    )


def _open_reservations(w) -> list:
    return [r for r in w.svc.ledger.open_reservations()]


def test_a_spec_the_planner_refuses_reserves_nothing(tmp_path: Path, db_url: str) -> None:
    """Was: eight sites reserved and the job queued forever (clients_per_round > sites)."""
    w = _federated_world(tmp_path / "zone", db_url)
    with pytest.raises(SpecError, match="clients_per_round"):
        w.svc.submit(w.researcher, _fed_spec(clients_per_round=50))
    assert _open_reservations(w) == []
    assert w.svc.jobs.list() == []
    for site in w.svc.store.get_dataset("cohort").sites:
        bal = w.svc.ledger.balance(BudgetKey("readmission", "cohort", site))
        assert bal.reserved_epsilon == 0 and bal.spent_epsilon == 0


def test_a_payload_that_cannot_be_written_releases_every_site(tmp_path: Path, db_url: str) -> None:
    w = _federated_world(tmp_path / "zone", db_url)
    jobs_dir = w.svc.zone.jobs_dir
    jobs_dir.rmdir()
    jobs_dir.write_text("not a folder")  # the job's folder cannot be made: after reserving
    with pytest.raises(ComputeError, match="nothing was charged"):
        w.svc.submit(w.researcher, _fed_spec())
    assert _open_reservations(w) == []
    # the job row is written only once its work is built: nothing is left queued
    assert w.svc.jobs.list() == []
    for site in w.svc.store.get_dataset("cohort").sites:
        bal = w.svc.ledger.balance(BudgetKey("readmission", "cohort", site))
        assert bal.reserved_epsilon == 0 and bal.spent_epsilon == 0
    last = w.svc.audit.list(limit=1)[0]
    assert (last.action, last.outcome) == ("job.submit", "error")
