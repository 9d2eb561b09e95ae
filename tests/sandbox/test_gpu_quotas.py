"""Per-project GPU quotas (``sandbox.gpu_quotas``), on SQLite and PostgreSQL.

A job over its project's quota is refused at submit with nothing reserved; jobs that fit the
quota but not beside the project's running jobs wait, and however many start at once the
project's running GPUs never exceed the quota; a quota is a steward's call.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from factories import job_spec, make_world

from foundation.errors import PolicyDenied, SpecError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.gpu_quotas import GpuQuotas, fits, job_gpus
from sandbox.jobs import JobState

KEY = BudgetKey("readmission", "cohort")


def test_fits_is_the_sum_against_the_quota() -> None:
    assert fits(0, 2, 2) and fits(1, 1, 2) and not fits(1, 2, 2) and not fits(2, 0.5, 2)
    assert job_gpus({"resources": {"gpus": 2}}) == 2 and job_gpus({}) == 0


def _world(tmp_path: Path, db_url: str):
    return make_world(
        tmp_path / "zone", InProcessBackend(gpus=4), patients=300, grant_epsilon=5.0,
        db_url=db_url,
    )  # fmt: skip


def test_only_a_steward_sets_a_quota_and_project_show_has_it(tmp_path: Path, db_url: str) -> None:
    w = _world(tmp_path, db_url)
    with pytest.raises(PolicyDenied):
        w.svc.set_gpu_quota(w.researcher, "readmission", 8)
    w.svc.set_gpu_quota(w.steward, "readmission", 1)
    assert w.svc.show_project(w.researcher, "readmission")["gpu_quota"] == 1
    with pytest.raises(SpecError, match="--gpus"):
        w.svc.set_gpu_quota(w.steward, "readmission", -1)
    w.svc.set_gpu_quota(w.steward, "readmission", None)
    assert w.svc.show_project(w.researcher, "readmission")["gpu_quota"] is None
    w.svc.close()


def test_a_job_over_the_quota_is_refused_with_nothing_reserved(tmp_path: Path, db_url: str) -> None:
    w = _world(tmp_path, db_url)
    w.svc.set_gpu_quota(w.steward, "readmission", 1)
    with pytest.raises(SpecError, match="resources.gpus") as err:
        w.svc.submit(w.researcher, job_spec(**{"resources.gpus": 2}))
    assert "quota is 1" in str(err.value)
    bal = w.svc.ledger.balance(KEY)
    assert bal.reserved_epsilon == 0 and bal.spent_epsilon == 0
    assert all(j.state is JobState.FAILED for j in w.svc.jobs.list())
    w.svc.close()


def test_concurrent_starts_never_exceed_the_quota_and_a_waiting_job_starts_later(
    tmp_path: Path, db_url: str
) -> None:
    w = _world(tmp_path, db_url)
    w.svc.set_gpu_quota(w.steward, "readmission", 2)
    spec = job_spec(**{"resources.gpus": 1, "privacy.epsilon": 0.1})
    ids = [w.svc.runner.admit("dp-sgd", w.researcher, spec, target="readmission") for _ in range(8)]
    quotas = GpuQuotas(w.svc.jobs.engine)
    barrier = threading.Barrier(len(ids))
    started: list[str] = []

    def start(job_id: str) -> None:
        barrier.wait(timeout=30)
        if quotas.start_within_quota(job_id, "readmission", 1, 2).started:
            started.append(job_id)

    threads = [threading.Thread(target=start, args=(j,)) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(started) == 2
    running = [j for j in w.svc.jobs.list() if j.state is JobState.RUNNING]
    assert sorted(j.id for j in running) == sorted(started)
    # a waiting job starts once a running one ends
    waiting = next(j for j in ids if j not in started)
    assert not quotas.start_within_quota(waiting, "readmission", 1, 2).started
    w.svc.jobs.move(started[0], JobState.FAILED, error="test: ended")
    assert quotas.start_within_quota(waiting, "readmission", 1, 2).started
    w.svc.close()


def test_a_dry_run_records_that_it_holds_no_gpu(tmp_path: Path) -> None:
    w = make_world(tmp_path / "zone", InProcessBackend(gpus=1), patients=300)
    job = w.svc.dry_run(w.researcher, job_spec(**{"resources.gpus": 1}), "dummy")
    assert job_gpus(job.spec) == 0
    w.svc.close()
