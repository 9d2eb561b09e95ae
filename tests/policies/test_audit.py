"""The keyed, hash-chained audit log: appending, listing, its head file, and verify naming the
first bad line."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from foundation.errors import IntegrityError, SpecError
from foundation.sql import make_engine
from policies.audit import GENESIS_HASH, AuditLog, ChainProblem, event_hash, event_mac
from policies.audit_head import Head, read_head, write_head

START = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
#: a fixed audit key (a zone draws 32 random bytes)
KEY = b"k" * 32


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
def engine(db_url: str) -> Iterator[Engine]:
    # every engine the product supports (conftest ``db_url``: SQLite, PostgreSQL)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def head_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.head"


@pytest.fixture
def log(engine: Engine, head_path: Path) -> AuditLog:
    return AuditLog(engine, clock=TickingClock(), key=KEY, head_path=head_path)


def fill(log: AuditLog, n: int = 6) -> None:
    for i in range(1, n + 1):
        log.append(f"user{i % 3}", "job.submit", "ok", f"job-{i}", {"epsilon": i / 2, "n": i})


def sql(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(text(statement), params)


def independent_mac(row: dict[str, Any], key: bytes | None = KEY) -> str:
    """The chain rule as documented, written out without the code under test (``key=None``:
    the old plain SHA-256 rule)."""
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
    if key is None:
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()
    return hmac.new(key, canon.encode("utf-8"), hashlib.sha256).hexdigest()


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
        assert ev.hash == independent_mac(ev.to_dict())
        assert ev.hash != independent_mac(ev.to_dict(), key=None)
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
    naive = AuditLog(engine, clock=lambda: datetime(2026, 1, 1), key=KEY, head_path=None)
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
    engine: Engine, log: AuditLog, head_path: Path
) -> None:
    fill(log, 3)
    again = AuditLog(
        engine, clock=TickingClock(START + timedelta(hours=1)), key=KEY, head_path=head_path
    )
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


def test_a_line_rehashed_with_the_key_is_named_by_the_next_line(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 6)
    row = log.list()[2]
    forged = event_mac(
        KEY,
        row.seq,
        row.at,
        "mallory",
        row.action,
        row.outcome,
        row.target,
        row.details,
        row.prev_hash,
    )
    sql(engine, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 3", h=forged)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (3, ChainProblem.EDITED)
    assert "re-hashed" in report.detail


def test_a_line_rehashed_without_the_key_is_named_unkeyed(engine: Engine, log: AuditLog) -> None:
    fill(log, 6)
    row = log.list()[2]
    forged = event_hash(
        row.seq, row.at, "mallory", row.action, row.outcome, row.target, row.details, row.prev_hash
    )
    sql(engine, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 3", h=forged)
    report = log.verify()
    assert (report.first_bad_seq, report.problem, report.checked) == (3, ChainProblem.UNKEYED, 2)
    assert "audit key" in report.detail


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


def test_without_a_head_file_a_cut_tail_goes_unseen(engine: Engine) -> None:
    bare = AuditLog(engine, clock=TickingClock(), key=KEY, head_path=None)
    fill(bare, 5)
    recorded = bare.verify().head_hash
    sql(engine, "DELETE FROM audit_events WHERE seq = 5")
    report = bare.verify()
    assert report.ok  # documented limit: a chain cannot see its own end cut off...
    assert report.head_hash != recorded  # ...which is what the head file is for


# -- the key: re-hashing without it ----------------------------------------------------------------


def rehash_from(engine: Engine, first: int, mac: Any) -> None:
    """What an attacker who can write the database does: rewrite every line from ``first`` on
    (renumbered 1, 2, ... with no gaps), each linked to the one before and hashed by ``mac``
    (a function of the line's fields, as ``event_hash`` takes them)."""
    with engine.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM audit_events"))]
        rows.sort(key=lambda r: r["seq"])
        conn.execute(text("DELETE FROM audit_events WHERE seq >= :s"), {"s": first})
        prev = GENESIS_HASH if first == 1 else rows[first - 2]["hash"]
        for seq, row in enumerate((r for r in rows if r["seq"] >= first), start=first):
            at = datetime.fromisoformat(str(row["at"])).replace(tzinfo=UTC)
            details = json.loads(row["details_json"])
            fields = (seq, at, row["actor"], row["action"], row["outcome"], row["target"])
            digest = mac(*fields, details, prev)
            conn.execute(
                text(
                    "INSERT INTO audit_events (seq, at, actor, action, outcome, target,"
                    " details_json, prev_hash, hash) VALUES (:seq, :at, :actor, :action,"
                    " :outcome, :target, :details_json, :prev_hash, :hash)"
                ),
                {**row, "seq": seq, "prev_hash": prev, "hash": digest},
            )
            prev = digest


def test_the_whole_chain_rehashed_without_the_key_fails_at_line_1(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 6)
    sql(engine, "DELETE FROM audit_events WHERE seq = 4")
    rehash_from(engine, 1, event_hash)  # the old, unkeyed rule
    report = log.verify()
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 1, ChainProblem.UNKEYED)
    assert report.checked == 0


def test_the_whole_chain_rehashed_with_a_guessed_key_fails_at_line_1(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 6)
    sql(engine, "DELETE FROM audit_events WHERE seq = 2")
    guessed = b"g" * 32
    rehash_from(engine, 1, lambda *fields: event_mac(guessed, *fields))
    report = log.verify()
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 1, ChainProblem.EDITED)
    assert "audit key" in report.detail


def test_lines_dropped_and_the_rest_rehashed_fail_where_the_rewrite_starts(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 8)
    sql(engine, "DELETE FROM audit_events WHERE seq IN (4, 5)")
    rehash_from(engine, 4, event_hash)
    report = log.verify()
    assert (report.first_bad_seq, report.problem, report.checked) == (4, ChainProblem.UNKEYED, 3)


def test_a_short_key_is_refused(engine: Engine) -> None:
    with pytest.raises(SpecError) as info:
        AuditLog(engine, key=b"short", head_path=None)
    assert info.value.field == "key"


def test_another_key_cannot_verify_the_log(engine: Engine, log: AuditLog, head_path: Path) -> None:
    fill(log, 3)
    other = AuditLog(engine, key=b"o" * 32, head_path=head_path)
    report = other.verify()
    assert (report.first_bad_seq, report.problem) == (1, ChainProblem.EDITED)


# -- the head file ---------------------------------------------------------------------------------


def test_each_append_moves_the_head_to_the_last_line(log: AuditLog, head_path: Path) -> None:
    assert read_head(head_path, KEY) is None  # nothing written for an empty log
    for _ in range(3):
        ev = log.append("sam", "job.submit", "ok")
        assert read_head(head_path, KEY) == Head(ev.seq, ev.hash)
    assert stat.S_IMODE(os.stat(head_path).st_mode) == 0o600
    assert [p.name for p in head_path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("cut", [1, 3])
def test_lines_cut_off_the_end_are_named_truncated(engine: Engine, log: AuditLog, cut: int) -> None:
    fill(log, 6)
    sql(engine, "DELETE FROM audit_events WHERE seq > :n", n=6 - cut)
    report = log.verify()
    assert not report.ok
    assert (report.first_bad_seq, report.problem) == (7 - cut, ChainProblem.TRUNCATED)
    assert report.checked == 6 - cut
    assert f"line {7 - cut}" in report.detail and "cut off" in report.detail


def test_the_whole_log_deleted_is_named_truncated(engine: Engine, log: AuditLog) -> None:
    fill(log, 2)
    sql(engine, "DELETE FROM audit_events")
    report = log.verify()
    assert (report.first_bad_seq, report.problem, report.checked) == (1, ChainProblem.TRUNCATED, 0)


def test_a_cut_tail_stays_caught_while_the_service_keeps_appending(
    engine: Engine, log: AuditLog, head_path: Path
) -> None:
    fill(log, 6)
    recorded = read_head(head_path, KEY)
    sql(engine, "DELETE FROM audit_events WHERE seq > 4")
    log.append("op", "audit.verify", "ok")  # line 5 again, but another line 5
    assert log.verify().problem == ChainProblem.TRUNCATED
    for _ in range(3):  # now past the recorded end
        log.append("op", "audit.verify", "ok")
        report = log.verify()
        assert (report.first_bad_seq, report.problem) == (6, ChainProblem.HEAD_MISMATCH)
        assert report.checked == 5
    assert read_head(head_path, KEY) == recorded  # the head kept the evidence


def test_the_last_line_edited_and_rehashed_without_the_key_fails(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 5)
    row = log.list()[-1]
    forged = event_hash(
        row.seq, row.at, "mallory", row.action, row.outcome, row.target, row.details, row.prev_hash
    )
    sql(engine, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 5", h=forged)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (5, ChainProblem.UNKEYED)


def test_the_last_line_rehashed_even_with_the_key_fails_against_the_head(
    engine: Engine, log: AuditLog
) -> None:
    fill(log, 5)
    row = log.list()[-1]
    forged = event_mac(
        KEY,
        row.seq,
        row.at,
        "mallory",
        row.action,
        row.outcome,
        row.target,
        row.details,
        row.prev_hash,
    )
    sql(engine, "UPDATE audit_events SET actor = 'mallory', hash = :h WHERE seq = 5", h=forged)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (5, ChainProblem.HEAD_MISMATCH)
    assert report.checked == 4 and report.head_hash == log.list()[3].hash


def test_a_missing_head_file_fails(log: AuditLog, head_path: Path) -> None:
    fill(log, 3)
    head_path.unlink()
    report = log.verify()
    assert (report.first_bad_seq, report.problem, report.checked) == (
        4,
        ChainProblem.HEAD_MISSING,
        3,
    )
    assert str(head_path) in report.detail


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"seq": 3}',
        json.dumps({"seq": 9, "mac": "0" * 64, "head_mac": "0" * 64}),
    ],
)
def test_an_edited_or_forged_head_file_fails(log: AuditLog, head_path: Path, content: str) -> None:
    fill(log, 3)
    head_path.write_text(content)
    report = log.verify()
    assert (report.first_bad_seq, report.problem) == (4, ChainProblem.HEAD_MISMATCH)
    assert str(head_path) in report.detail


def test_a_head_signed_with_another_key_fails(log: AuditLog, head_path: Path) -> None:
    fill(log, 3)
    last = log.list()[-1]
    write_head(head_path, b"o" * 32, Head(last.seq, last.hash))
    assert log.verify().problem == ChainProblem.HEAD_MISMATCH


def test_a_head_behind_the_log_is_accepted_and_moved_on(
    tmp_path: Path, log: AuditLog, head_path: Path
) -> None:
    # a writer that committed but died before writing the head leaves it behind
    fill(log, 2)
    shutil.copy(head_path, tmp_path / "old.head")
    fill(log, 2)
    shutil.copy(tmp_path / "old.head", head_path)
    assert read_head(head_path, KEY) == Head(2, log.list()[1].hash)
    assert log.verify().ok and log.verify().checked == 4
    ev = log.append("op", "audit.verify", "ok")
    assert read_head(head_path, KEY) == Head(ev.seq, ev.hash)


def test_append_in_writes_the_head_only_after_the_caller_commits(
    engine: Engine, log: AuditLog, head_path: Path
) -> None:
    with engine.begin() as conn:
        ev = log.append_in(conn, "sam", "dataset.ingest", "ok", "cohort")
        assert read_head(head_path, KEY) is None  # not committed yet
    assert read_head(head_path, KEY) == Head(ev.seq, ev.hash)
    with pytest.raises(RuntimeError), engine.begin() as conn:
        log.append_in(conn, "sam", "dataset.ingest", "ok", "lost")
        raise RuntimeError("the caller's own change failed")
    assert read_head(head_path, KEY) == Head(ev.seq, ev.hash)  # the rolled-back line is not
    assert log.verify().ok


def test_a_head_that_cannot_be_written_is_an_integrity_error(
    engine: Engine, tmp_path: Path
) -> None:
    nowhere = tmp_path / "gone" / "audit.head"
    log = AuditLog(engine, clock=TickingClock(), key=KEY, head_path=nowhere)
    with pytest.raises(IntegrityError, match="audit head"):
        log.append("sam", "job.submit", "ok")
    assert [e.seq for e in log.list()] == [1]  # the event itself is recorded


# -- concurrency -----------------------------------------------------------------------------------


def test_sixteen_threads_appending_keep_one_valid_chain_and_its_head(
    engine: Engine, head_path: Path
) -> None:
    # the real clock: threads interleave for real
    log = AuditLog(engine, key=KEY, head_path=head_path)
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
    # whichever thread wrote the head last, it names the true last line
    assert read_head(head_path, KEY) == Head(events[-1].seq, events[-1].hash)
