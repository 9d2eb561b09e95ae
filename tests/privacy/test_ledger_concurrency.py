"""The ledger never goes over budget under concurrency.

Each race grants epsilon 10 and has 64 submitters each ask for 0.5, so exactly 20 fit. All
submitters wait at a barrier and then reserve at once; once every reservation attempt has
finished, each winner commits (a random part of its reservation, as an accountant would) or
releases, chosen at random. Reserving and closing are separate phases so that no budget is
freed while others are still reserving: that is what makes "exactly 20" the right answer.

- threads: 64 threads sharing one ``Ledger`` (one engine, pooled connections), on every
  backend available (SQLite file; PostgreSQL: ``tests/pg_cluster.py``).
- processes: 64 separate OS processes (multiprocessing, 'spawn' context), each importing the
  ledger afresh and opening its own engine on the same SQLite file; one submitter per
  process, released together by a cross-process barrier. This exercises SQLite's file lock
  (``BEGIN IMMEDIATE``) between processes; it does not exercise PostgreSQL.

What is checked afterwards, in the ledger and against what each submitter reported: exactly
20 RESERVE events, each with a distinct reservation id; spent + reserved <= granted; no
reservation left open; every reservation closed by exactly one event, the one its submitter
asked for; and the balance equals a recomputation from the events.

Cost: the process race spawns 64 interpreters (each imports pytest and SQLAlchemy, ~0.3 s of
CPU); about 17 s on an idle 2-core box, up to ~40 s when the cores are shared.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from foundation.errors import BudgetExceeded, IntegrityError
from foundation.sql import make_engine
from privacy.budget_events import BudgetKey, EventKind, ReservationState
from privacy.ledger import Ledger

KEY = BudgetKey("proj-race", "icu-cohort")
SUBMITTERS = 64
GRANTED = 10.0
ASK = 0.5
FITS = 20  # GRANTED / ASK
#: seconds any submitter waits for the others before the test fails rather than hangs; long,
#: because the first spawned process may wait while 63 others start on a loaded 2-core box
BARRIER_TIMEOUT_S = 240

#: (submitter index, reservation id or None, "commit" / "release" / "", epsilon spent)
Outcome = tuple[int, str | None, str, float]


def _submit(ledger: Ledger, index: int, start: Any, closing: Any) -> Outcome:
    """One submitter: reserve at the start signal, then commit or release at the next."""
    rng = random.Random(index)
    start.wait(BARRIER_TIMEOUT_S)
    try:
        rid: str | None = ledger.reserve(
            KEY, ASK, 0.0, job_id=f"job-{index}", actor=f"user-{index}"
        )
    except BudgetExceeded:
        rid = None
    closing.wait(BARRIER_TIMEOUT_S)
    if rid is None:
        return (index, None, "", 0.0)
    if rng.random() < 0.5:
        spent = ASK * rng.choice([0.25, 0.5, 1.0])
        ledger.commit(rid, spent, 0.0, actor="runner", note="test accountant")
        return (index, rid, "commit", spent)
    ledger.release(rid, actor="runner", reason="failed before reading data")
    return (index, rid, "release", 0.0)


def _check_books(ledger: Ledger, outcomes: list[Outcome]) -> None:
    assert len(outcomes) == SUBMITTERS
    assert sorted(o[0] for o in outcomes) == list(range(SUBMITTERS))
    winners = [o for o in outcomes if o[1] is not None]
    assert len(winners) == FITS
    events = ledger.events(KEY)
    reserves = [e for e in events if e.kind is EventKind.RESERVE]
    closes = [e for e in events if e.kind in (EventKind.COMMIT, EventKind.RELEASE)]
    # exactly the winners reserved, once each, with distinct ids
    assert len(reserves) == FITS
    assert len({e.reservation_id for e in reserves}) == FITS
    assert {e.reservation_id for e in reserves} == {o[1] for o in winners}
    assert len({e.event_id for e in events}) == len(events)
    # every reservation closed exactly once, the way its submitter closed it
    assert Counter(e.reservation_id for e in closes) == Counter(o[1] for o in winners)
    assert ledger.open_reservations() == []
    for index, rid, how, spent in winners:
        assert rid is not None
        res = ledger.reservation(rid)
        assert res.job_id == f"job-{index}"
        expected = ReservationState.COMMITTED if how == "commit" else ReservationState.RELEASED
        assert res.state is expected
        assert res.spent_epsilon == spent
    # never over budget, and the balance is the sum of the events
    bal = ledger.balance(KEY)
    spent_total = sum(o[3] for o in winners)
    assert bal.granted_epsilon == GRANTED
    assert bal.reserved_epsilon == 0.0
    assert bal.spent_epsilon == spent_total == sum(e.epsilon for e in closes)
    assert bal.spent_epsilon + bal.reserved_epsilon <= bal.granted_epsilon
    assert math.isclose(bal.remaining_epsilon, GRANTED - spent_total, abs_tol=1e-12)


def test_64_threads_never_overspend(engine_factory: Callable[[], Engine]) -> None:
    ledger = Ledger(engine_factory())
    ledger.create_schema()
    ledger.grant(KEY, GRANTED, 0.0, actor="steward", grant_id="race-grant")
    start, closing = threading.Barrier(SUBMITTERS), threading.Barrier(SUBMITTERS)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        try:
            out = _submit(ledger, index, start, closing)
        except BaseException as exc:  # surfaced below; a broken barrier frees the others
            start.abort()
            closing.abort()
            with lock:
                errors.append(exc)
            return
        with lock:
            outcomes.append(out)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(SUBMITTERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_TIMEOUT_S * 2)
    assert not errors, errors[:3]
    _check_books(ledger, outcomes)


def test_racing_closes_of_one_reservation_charge_once(engine_factory: Callable[[], Engine]) -> None:
    """16 threads try to close the same reservation at once, half committing, half releasing."""
    ledger = Ledger(engine_factory())
    ledger.create_schema()
    ledger.grant(KEY, 1.0, 0.0, actor="steward", grant_id="g")
    rid = ledger.reserve(KEY, 1.0, 0.0, job_id="job", actor="user")
    start = threading.Barrier(16)
    results: list[object] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        start.wait(BARRIER_TIMEOUT_S)
        try:
            if index % 2:
                out: object = ledger.commit(rid, 0.75, 0.0, actor=f"runner-{index}")
            else:
                out = ledger.release(rid, actor=f"runner-{index}", reason="race")
        except IntegrityError as exc:
            out = exc
        with lock:
            results.append(out)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BARRIER_TIMEOUT_S * 2)
    closes = [e for e in ledger.events(KEY) if e.kind in (EventKind.COMMIT, EventKind.RELEASE)]
    assert len(closes) == 1
    winner = closes[0]
    assert len(results) == 16
    # the winner's side all got the same event back; the other side all got IntegrityError
    assert sum(1 for r in results if r == winner) == 8
    assert sum(1 for r in results if isinstance(r, IntegrityError)) == 8
    bal = ledger.balance(KEY)
    assert bal.spent_epsilon == (0.75 if winner.kind is EventKind.COMMIT else 0.0)
    assert bal.reserved_epsilon == 0.0


def _process_submitter(url: str, index: int, start: Any, closing: Any, results: Any) -> None:
    """Runs in its own spawned process with its own engine; reports through ``results``."""
    try:
        engine = make_engine(url)
        try:
            results.put(("ok", _submit(Ledger(engine), index, start, closing)))
        finally:
            engine.dispose()
    except BaseException as exc:  # report, and free the others from the barriers
        start.abort()
        closing.abort()
        results.put(("error", f"submitter {index}: {exc!r}"))


@pytest.mark.slow
def test_64_processes_never_overspend(tmp_path: Path) -> None:
    """64 spawned processes, one submitter each, racing on one SQLite file (see module doc)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    ledger = Ledger(engine)
    ledger.create_schema()
    ledger.grant(KEY, GRANTED, 0.0, actor="steward", grant_id="race-grant")

    ctx = multiprocessing.get_context("spawn")
    start, closing, results = ctx.Barrier(SUBMITTERS), ctx.Barrier(SUBMITTERS), ctx.Queue()
    procs = [
        ctx.Process(target=_process_submitter, args=(url, i, start, closing, results), daemon=True)
        for i in range(SUBMITTERS)
    ]
    for p in procs:
        p.start()
    outcomes: list[Outcome] = []
    errors: list[str] = []
    try:
        for _ in range(SUBMITTERS):
            status, payload = results.get(timeout=BARRIER_TIMEOUT_S + 60)
            if status == "ok":
                outcomes.append(payload)
            else:
                errors.append(payload)
    except queue.Empty:
        errors.append(f"only {len(outcomes) + len(errors)} of {SUBMITTERS} submitters reported")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # only ever our own children
                p.terminate()
                p.join()
    assert not errors, errors[:3]
    assert all(p.exitcode == 0 for p in procs)
    _check_books(ledger, outcomes)
    engine.dispose()
