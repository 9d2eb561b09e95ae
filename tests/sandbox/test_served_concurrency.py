"""Concurrency against a served zone: 64 clients against one grant, first submits to a fresh
service, and a cancel that races the start of its job.

The grant allows epsilon 2.0 and each job asks 0.5: however the 64 submits interleave in the
service's thread pool, exactly four are admitted, every other one is refused with 409
``budget_exceeded`` (never a 500), and once the admitted jobs have ended (the queued ones are
cancelled, the others run to their end) the ledger holds: spent + reserved <= granted, no
reservation open, one committed charge per job that read rows, released reservations for the
others (the cancelled ones among them), one reservation per admitted job and none for a
refused one. A service that has not started Ray yet answers a few simultaneous first
submits each (admitted or refused). A job the executor starts while ``cancel_job`` is
cancelling it is charged if it reads rows, never freed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import job_spec, make_world
from served import served_zone

from foundation.errors import ZoneError
from privacy.budget_events import BudgetKey, EventKind, ReservationState
from sandbox.backend import InProcessBackend
from sandbox.context import ZoneContext
from sandbox.jobs import JobState
from sandbox.service import Service
from sandbox.zone import Zone

pytestmark = pytest.mark.ray

CLIENTS = 64
GRANT_EPSILON = 2.0
JOB_EPSILON = 0.5
MOST_ADMITTED = int(GRANT_EPSILON / JOB_EPSILON)  # 4
KEY = BudgetKey("readmission", "cohort")
#: how long the admitted jobs may take to end (the first one starts the service's Ray)
JOBS_WAIT_S = 240.0
#: what a refused submit may say: a clear refusal, never a server error
CLEAR_REFUSALS = {"budget_exceeded"}


def _spec() -> dict[str, Any]:
    return job_spec(
        model={"kind": "logistic", "hidden": []},
        **{"training.epochs": 1, "training.batch_size": 32, "privacy.epsilon": JOB_EPSILON},
    ).to_dict()


def _warm_up(url: str, token: str) -> None:
    """A free dry run starts the service's Ray (``RayBackend`` starts it on first use), and a
    quote plans the spec once (``privacy.job_plan`` caches plans): the burst then measures
    admission, not 64 threads starting Ray or calibrating the same noise at once
    (``test_concurrent_first_submits_to_a_fresh_service_are_all_answered`` covers a cold
    start)."""
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        dry = http.post("/v1/dry-runs", json={"spec": _spec(), "on": "dummy"})
        assert dry.status_code == 200 and dry.json()["state"] == "succeeded", dry.text
        quote = http.post("/v1/quotes", json={"spec": _spec()})
        assert quote.status_code == 200, quote.text


def _burst(url: str, token: str, clients: int = CLIENTS, timeout: float = 180) -> list[Any]:
    """``clients`` threads, each with its own HTTP client, submit at the same moment; each
    one's (status, body), or (-1, the client's error)."""
    barrier = threading.Barrier(clients)
    results: list[tuple[int, Any] | None] = [None] * clients
    spec = _spec()

    def client(i: int) -> None:
        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
            barrier.wait(timeout=60)
            try:
                resp = http.post("/v1/jobs", json={"spec": spec})
                body = resp.json()
            except (httpx.HTTPError, ValueError) as exc:  # recorded, asserted below
                results[i] = (-1, f"{type(exc).__name__}: {exc}")
                return
            results[i] = (resp.status_code, body)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout + 120)
    assert all(r is not None for r in results), "a client thread did not finish"
    return [r for r in results if r is not None]


def _wait_ended(http: httpx.Client, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + JOBS_WAIT_S
    final: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id in final:
                continue
            rec = http.get(f"/v1/jobs/{job_id}").json()
            if rec["state"] in ("succeeded", "failed"):
                final[job_id] = rec
        if len(final) == len(job_ids):
            return final
        time.sleep(0.5)
    pending = sorted(set(job_ids) - set(final))
    raise AssertionError(f"jobs not ended after {JOBS_WAIT_S:.0f}s: {pending}")


@pytest.mark.slow  # a real server and 64 clients: make test-slow (CI runs it)
def test_64_clients_against_one_grant_never_overspend_it(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    w = make_world(root, InProcessBackend(), patients=300, grant_epsilon=GRANT_EPSILON)
    token = w.researcher_token
    w.svc.close()

    with served_zone(root) as server:
        _warm_up(server.url, token)
        results = _burst(server.url, token)
        admitted = [body["id"] for status, body in results if 200 <= status < 300]
        refused = [(status, body) for status, body in results if not 200 <= status < 300]

        # at most what the budget allows, and the rest refused clearly
        assert len(admitted) <= MOST_ADMITTED, (len(admitted), refused[:3])
        unclear = [
            (s, b)
            for s, b in refused
            if s != 409 or not isinstance(b, dict) or b.get("error") not in CLEAR_REFUSALS
        ]
        assert not unclear, f"{len(unclear)} refusals not 409 budget_exceeded: {unclear[:5]}"
        assert len(admitted) + len(refused) == CLIENTS
        # and no fewer: a refusal while the budget had room would be one too many
        assert len(admitted) == MOST_ADMITTED, (len(admitted), refused[:3])

        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=180) as http:
            # the executor runs two jobs at once: cancel the admitted jobs still queued
            cancelled = []
            for job_id in admitted:
                if http.get(f"/v1/jobs/{job_id}").json()["state"] != "queued":
                    continue
                resp = http.post(f"/v1/jobs/{job_id}/cancel", json={})
                if resp.status_code == 200:
                    cancelled.append(job_id)
                else:  # it started meanwhile: a clear refusal, never a server error
                    assert resp.status_code == 422, (resp.status_code, resp.text)
                    assert resp.json()["error"] == "spec_error", resp.text
            final = _wait_ended(http, admitted)
            budget = http.get("/v1/projects/readmission/budget").json()

    succeeded = [j for j, rec in final.items() if rec["state"] == "succeeded"]
    for job_id in cancelled:
        assert final[job_id]["state"] == "failed", final[job_id]
        assert "cancelled" in (final[job_id].get("error") or ""), final[job_id]

    # the API's view of the budget: nothing reserved any more, never more than granted
    (shown,) = [b for b in budget if b["key"]["dataset"] == "cohort"]
    assert shown["reserved_epsilon"] == 0.0, shown
    assert shown["spent_epsilon"] <= GRANT_EPSILON + 1e-9, shown

    # the ledger itself, once the service has stopped
    svc = Service(Zone.open(root))
    try:
        bal = svc.ledger.balance(KEY)
        opened = svc.ledger.open_reservations()
        events = svc.ledger.events(KEY)
        jobs = {j.id: j for j in svc.jobs.list(project="readmission")}
        denied = svc.audit.list(limit=10_000, action="job.submit", outcome="denied")
    finally:
        svc.close()

    assert bal.spent_epsilon + bal.reserved_epsilon <= bal.granted_epsilon + 1e-9, bal
    assert bal.granted_epsilon == pytest.approx(GRANT_EPSILON), bal
    assert not opened, f"reservations left open: {opened}"
    reserves = [e for e in events if e.kind is EventKind.RESERVE]
    commits = [e for e in events if e.kind is EventKind.COMMIT]
    releases = [e for e in events if e.kind is EventKind.RELEASE]
    # one reservation per admitted job, none for a refused submit
    assert sorted(str(e.job_id) for e in reserves) == sorted(admitted), (reserves, admitted)
    # one committed charge per job that read rows (a succeeded job, or a failed one that
    # opened its data), released reservations for the rest (the cancelled ones among them)
    read_rows = {j for j in admitted if jobs[j].data_opened}
    assert set(succeeded) <= read_rows
    assert sorted(str(e.job_id) for e in commits) == sorted(read_rows), (commits, read_rows)
    assert sorted(str(e.job_id) for e in releases) == sorted(set(admitted) - read_rows), releases
    assert set(cancelled) <= {e.job_id for e in releases}
    assert len(commits) == len(succeeded) + len(read_rows - set(succeeded))
    assert bal.spent_epsilon == pytest.approx(sum(e.epsilon for e in commits), abs=1e-12)
    assert bal.spent_epsilon <= len(read_rows) * JOB_EPSILON + 1e-9
    # every refused submit left its denied audit event, naming the budget
    kinds = Counter(e.details.get("error") for e in denied)
    assert kinds["budget_exceeded"] >= len(refused), kinds


@pytest.mark.slow  # a real server and 64 clients: make test-slow (CI runs it)
def test_concurrent_first_submits_to_a_fresh_service_are_all_answered(tmp_path: Path) -> None:
    """A service just started has not started Ray yet (``RayBackend`` starts it on first
    use): a few submits arriving together must each be admitted or refused, not left
    waiting on, or failed by, several threads starting Ray at once."""
    root = tmp_path / "zone"
    w = make_world(root, InProcessBackend(), patients=300, grant_epsilon=GRANT_EPSILON)
    w.svc.close()
    with served_zone(root) as server:
        results = _burst(server.url, w.researcher_token, clients=MOST_ADMITTED, timeout=150)
    bad = [(s, b) for s, b in results if not (200 <= s < 300 or s == 409)]
    assert not bad, f"{len(bad)} of {len(results)} first submits not answered: {bad}"


# -- a cancel that races the start of its job (served mode's executor) ---------------------------


class _HeldExecutor(Executor):
    """Served mode's executor, held: the test decides when the job's thread starts."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.held.append((fn, args))
        return Future()


def test_a_cancel_racing_the_start_of_its_job_never_frees_a_job_that_reads_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cancel_job`` reads the job QUEUED and only later releases its reservation and moves
    it to FAILED. If the executor starts the job in between (QUEUED -> RUNNING is one
    statement in ``JobRunner._start``), the job reads rows while its reservation is being
    released: the invariant is that a job that opened its data is charged, never freed."""
    w = make_world(tmp_path / "zone", InProcessBackend(), patients=300, grant_epsilon=2.0)
    svc, rita = w.svc, w.researcher
    executor = _HeldExecutor()
    svc.runner.executor = executor
    spec = job_spec(
        model={"kind": "logistic", "hidden": []},
        **{"training.epochs": 1, "training.batch_size": 32, "privacy.epsilon": JOB_EPSILON},
    )
    job = svc.submit(rita, spec, wait=False)
    assert job.state is JobState.QUEUED
    (drive, args) = executor.held[0]
    runner_thread = threading.Thread(target=drive, args=args)

    real_check_member = ZoneContext.check_member
    real_wait = svc.backend.wait
    cancel_done = threading.Event()

    def check_member(self: ZoneContext, actor: Any, project: str) -> None:
        real_check_member(self, actor, project)
        if runner_thread.ident is None:
            # cancel_job has read the job QUEUED; now a thread of the executor frees up
            runner_thread.start()
            deadline = time.monotonic() + 60
            while svc.jobs.get(job.id).state is JobState.QUEUED:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.01)

    def wait(handle: Any, *, poll: Callable[[], None], poll_s: float = 0.5) -> Any:
        # the worker is on its way (on Ray it runs in another process, whatever the
        # service does next); it reads its rows once the cancel has answered
        cancel_done.wait(timeout=60)
        return real_wait(handle, poll=poll, poll_s=poll_s)

    monkeypatch.setattr(ZoneContext, "check_member", check_member)
    monkeypatch.setattr(svc.backend, "wait", wait)
    try:
        cancelled: Any = svc.cancel_job(rita, job.id)
    except ZoneError as exc:  # refusing the cancel is a fine answer
        cancelled = exc
    finally:
        cancel_done.set()
    monkeypatch.undo()
    runner_thread.join(timeout=300)
    assert not runner_thread.is_alive()

    rec = svc.jobs.get(job.id)
    assert rec.reservation_id is not None
    reservation = svc.ledger.reservation(rec.reservation_id)
    svc.close()
    if rec.data_opened:
        assert reservation.state is ReservationState.COMMITTED, (
            f"job {job.id} read rows (data_opened) but its reservation is "
            f"{reservation.state.value}: nothing was charged for it. The cancel returned "
            f"{cancelled!r}; the job is {rec.state.value} ({rec.error})"
        )
    else:
        assert reservation.state is ReservationState.RELEASED, reservation
