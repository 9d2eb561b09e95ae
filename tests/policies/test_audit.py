"""The hash-chained audit log: appending, listing, and verify naming the first bad line."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from foundation.errors import SpecError
from foundation.sql import make_engine
from policies.audit import GENESIS_HASH, AuditLog, ChainProblem, event_hash

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


class TickingClock:
    """Frozen time that moves one second per reading: deterministic and strictly increasing."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=1)
            return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'zone.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def log(engine: Engine) -> AuditLog:
    return AuditLog(engine, clock=TickingClock())


def fill(log: AuditLog, n: int = 6) -> None:
    for i in range(1, n + 1):
        log.append(f"user{i % 3}", "job.submit", "ok", f"job-{i}", {"epsilon": i / 2, "n": i})


def sql(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def independent_hash(row: dict[str, Any]) -> str:
    """The chain rule as documented, written out without the code under test."""
    body = {
        "seq": row["seq"],
        "at": row["at"],
        "actor": row["actor"],
        "action": row["action"],
        "outcome": row["outcome"],
        "target": row["target"],
        "details": row["details"],
        "prev_hash": row["prev_hash"],
    }
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


# -- appending and listing ---------------------------------------------------------------------


def test_empty_log_verifies(log: AuditLog) -> None:
    report = log.verify()
    assert report.ok and report.checked == 0 and report.first_bad_seq is None
    assert report.head_hash == GENESIS_HASH
    assert log.head() is None


def test_append_links_and_hashes_by_the_documented_rule(log: AuditLog) -> None:
    first = log.append("sam", "access.approve", "ok", "req-1", {"epsilon": 2.5, "note": "é"})
    second = log.append("rita", "job.submit", "denied", "", None)
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.hash
    assert first.at == START + timedelta(seconds=1)
    for ev in (first, second):
        assert ev.hash == independent_hash(ev.to_dict())
    assert first.to_dict()["at"] == "2026-03-01T09:00:01.000000+00:00"


def test_stored_rows_match_what_append_returned(log: AuditLog) -> None:
    made = [
        log.append("a", "x", "ok", "t", {"i": i, "f": 0.1 * i, "b": i % 2 == 0, "none": None})
        for i in range(3)
    ]
    assert log.list() == made
    assert log.head() == made[-1]


def test_list_is_latest_first_filtered_oldest_first_ordered(log: AuditLog) -> None:
    fill(log, 9)
    assert [e.seq for e in log.list(limit=3)] == [7, 8, 9]
    assert [e.seq for e in log.list(actor="user0")] == [3, 6, 9]
    assert [e.seq for e in log.list(actor="user1", limit=2)] == [4, 7]
    log.append("sam", "access.deny", "denied", "req-9")
    assert [e.seq for e in log.list(action="access.deny")] == [10]
    assert [e.seq for e in log.list(outcome="denied")] == [10]


def test_details_keep_their_types(log: AuditLog) -> None:
    log.append("a", "x", "ok", "", {"i": 3, "f": 1e-5, "b": True, "n": None, "s": "3"})
    (ev,) = log.list()
    assert dict(ev.details) == {"i": 3, "f": 1e-5, "b": True, "n": None, "s": "3"}
    assert type(ev.details["i"]) is int and type(ev.details["b"]) is bool


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"outcome": "maybe"}, "outcome"),
        ({"actor": ""}, "actor"),
        ({"action": "  "}, "action"),
        ({"details": {"rows": [1, 2]}}, "details"),
        ({"details": {"eps": float("nan")}}, "details"),
        ({"details": {1: "x"}}, "details"),
    ],
)
def test_bad_events_name_the_field(log: AuditLog, kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"actor": "a", "action": "x", "outcome": "ok", **kwargs}
    with pytest.raises(SpecError) as info:
        log.append(**args)
    assert info.value.field == field
    assert log.list() == []


def test_naive_clock_is_refused(engine: Engine) -> None:
    naive = AuditLog(engine, clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(SpecError) as info:
        naive.append("a", "x", "ok")
    assert info.value.field == "clock"


def test_list_limit_must_be_positive(log: AuditLog) -> None:
    with pytest.raises(SpecError) as info:
        log.list(limit=0)
    assert info.value.field == "limit"


def test_append_in_commits_and_rolls_back_with_the_caller(engine: Engine, log: AuditLog) -> None:
    with engine.begin() as conn:
        log.append_in(conn, "sam", "dataset.ingest", "ok", "cohort")
    with pytest.raises(RuntimeError), engine.begin() as conn:
        log.append_in(conn, "sam", "dataset.ingest", "ok", "lost")
        raise RuntimeError("the caller's own change failed")
    log.append("sam", "audit.verify", "ok")
    assert [(e.seq, e.target) for e in log.list()] == [(1, "cohort"), (2, "")]
    assert log.verify().ok


def test_a_second_log_on_the_same_database_continues_the_chain(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 3)
    again = AuditLog(engine, clock=TickingClock(START + timedelta(hours=1)))
    ev = again.append("op", "audit.verify", "ok")
    assert ev.seq == 4 and ev.prev_hash == log.list()[2].hash
    assert again.verify().ok and again.verify().checked == 4


# -- verify: tampering with raw SQL --------------------------------------------------------------


def test_untouched_chain_verifies(log: AuditLog) -> None:
    fill(log, 6)
    report = log.verify()
    assert report.ok and report.checked == 6 and report.problem is None
    assert report.head_hash == log.list()[-1].hash
    assert report.to_dict()["ok"] is True


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "mallory"),
        ("action", "job.cancel"),
        ("outcome", "denied"),
        ("target", "job-99"),
        ("details_json", '{"epsilon":0.1,"n":3}'),
        ("at", "2020-01-01 00:00:00.000000"),
    ],
)
def test_an_edited_line_is_named(engine: Engine, log: AuditLog, column: str, value: str) -> None:
    fill(log, 6)
    sql(engine, f"UPDATE audit_events SET {column} = :v WHERE seq = 3", v=value)
    report = log.verify()
    assert not report.ok
    assert (report.first_bad_seq, report.problem) == (3, ChainProblem.EDITED)
    assert report.checked == 2
    assert "line 3" in report.detail


def test_an_edited_and_rehashed_line_is_named(engine: Engine, log: AuditLog) -> None:
    fill(log, 6)
    row = log.list()[2]
    forged = event_hash(
        row.seq, row.at, "mallory", row.action, row.outcome, row.target, row.details, row.prev_hash
    )
    sql(engine, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 3", h=forged)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (3, ChainProblem.EDITED)
    assert "re-hashed" in report.detail


def test_an_edited_first_line_is_named(engine: Engine, log: AuditLog) -> None:
    fill(log, 3)
    sql(engine, "UPDATE audit_events SET target = 'x' WHERE seq = 1")
    report = log.verify()
    assert (report.first_bad_seq, report.problem, report.checked) == (1, ChainProblem.EDITED, 0)


def test_an_edited_link_is_named(engine: Engine, log: AuditLog) -> None:
    fill(log, 5)
    sql(engine, "UPDATE audit_events SET prev_hash = :h WHERE seq = 4", h="f" * 64)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (4, ChainProblem.EDITED)


def test_a_renumbered_line_is_named(engine: Engine, log: AuditLog) -> None:
    fill(log, 5)
    sql(engine, "UPDATE audit_events SET seq = 9 WHERE seq = 5")
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (5, ChainProblem.EDITED)
    assert "renumbered" in report.detail


@pytest.mark.parametrize("seq", [1, 3, 5])
def test_a_dropped_line_is_named(engine: Engine, log: AuditLog, seq: int) -> None:
    fill(log, 6)
    sql(engine, "DELETE FROM audit_events WHERE seq = :s", s=seq)
    report = log.verify()
    assert not report.ok
    assert (report.first_bad_seq, report.problem) == (seq, ChainProblem.DROPPED)
    assert report.checked == seq - 1
    assert f"line {seq} missing" in report.detail


def test_several_dropped_lines_are_named_as_a_range(engine: Engine, log: AuditLog) -> None:
    fill(log, 6)
    sql(engine, "DELETE FROM audit_events WHERE seq IN (3, 4)")
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (3, ChainProblem.DROPPED)
    assert "line 3-4 missing" in report.detail


def test_a_dropped_and_renumbered_line_is_caught(engine: Engine, log: AuditLog) -> None:
    fill(log, 5)
    sql(engine, "DELETE FROM audit_events WHERE seq = 3")
    for s in (4, 5):
        sql(engine, "UPDATE audit_events SET seq = :n WHERE seq = :s", n=s - 1, s=s)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (3, ChainProblem.EDITED)
    assert "dropped" in report.detail


def test_swapped_line_numbers_are_named_as_reordered(engine: Engine, log: AuditLog) -> None:
    fill(log, 6)
    sql(engine, "UPDATE audit_events SET seq = -1 WHERE seq = 3")
    sql(engine, "UPDATE audit_events SET seq = 3 WHERE seq = 4")
    sql(engine, "UPDATE audit_events SET seq = 4 WHERE seq = -1")
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (3, ChainProblem.REORDERED)
    assert report.checked == 2


def test_swapped_line_contents_are_named_as_reordered(engine: Engine, log: AuditLog) -> None:
    fill(log, 6)
    with engine.begin() as conn:
        rows = {
            r.seq: r._mapping
            for r in conn.execute(text("SELECT * FROM audit_events WHERE seq IN (2, 3)"))
        }
        conn.execute(text("DELETE FROM audit_events WHERE seq IN (2, 3)"))
        for seq, other in ((2, 3), (3, 2)):
            conn.execute(
                text(
                    "INSERT INTO audit_events (seq, at, actor, action, outcome, target,"
                    " details_json, prev_hash, hash) VALUES (:seq, :at, :actor, :action,"
                    " :outcome, :target, :details_json, :prev_hash, :hash)"
                ),
                {**rows[other], "seq": seq},
            )
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (2, ChainProblem.REORDERED)


def test_cutting_the_tail_needs_the_recorded_head(engine: Engine, log: AuditLog) -> None:
    fill(log, 5)
    recorded = log.verify().head_hash
    sql(engine, "DELETE FROM audit_events WHERE seq = 5")
    report = log.verify()
    assert report.ok  # documented limit: a chain cannot see its own end cut off...
    assert report.head_hash != recorded  # ...but the head recorded outside the zone can


# -- concurrency -----------------------------------------------------------------------------------


def test_sixteen_threads_appending_keep_one_valid_chain(engine: Engine) -> None:
    log = AuditLog(engine)  # the real clock: threads interleave for real
    per_thread, threads = 8, 16
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for j in range(per_thread):
                log.append(f"user{i}", "job.submit", "ok", f"job-{i}-{j}", {"i": i, "j": j})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    report = log.verify()
    assert report.ok, report
    assert report.checked == threads * per_thread
    events = log.list(limit=1000)
    assert [e.seq for e in events] == list(range(1, threads * per_thread + 1))
    assert len({e.target for e in events}) == threads * per_thread
