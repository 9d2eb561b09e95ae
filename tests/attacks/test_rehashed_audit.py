"""Attack: erase your own lines from the audit log, then make what is left verify again.

While the chain was plain SHA-256 of each line, anyone who could write ``state.db`` could
delete the lines that showed them, renumber and re-hash the rest by the published rule, and
``sandbox audit verify`` passed; lines at the end could simply be deleted, no re-hash needed.
Now each line's hash is an HMAC under ``ZONE/audit.key`` (never in the database), and the
last line is recorded, signed with that key, in ``ZONE/audit.head``.

The attacker here holds the database (``sqlite3``, append-only triggers dropped) but not the
zone folder's keys: they re-hash with the old rule and with guessed keys, cut the tail, and
put back an older copy of the database. Every attack must make ``audit verify`` fail, name
what happened, and keep failing while the service goes on appending.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cli_runner import last_json, sandbox

from foundation.errors import IntegrityError, PolicyDenied
from policies.audit import GENESIS_HASH, event_hash, event_mac
from sandbox.backend import InProcessBackend
from sandbox.service import Service
from sandbox.zone import Zone

#: what the attacker tries for a key: the zone's is 32 random bytes they cannot read
GUESSED_KEYS = [b"\0" * 32, b"audit" * 6 + b"!!"]


class World:
    def __init__(self, root: Path, token: str, first_mallory: int, before: Path) -> None:
        self.root = root
        self.token = token
        #: the first line that names mallory
        self.first_mallory = first_mallory
        #: a copy of the database taken just before mallory's first line
        self.before = before

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    def verify(self) -> Any:
        svc = Service(Zone.open(self.root), InProcessBackend())
        try:
            return svc.audit_verify(svc.authenticate(self.token))
        finally:
            svc.close()


@pytest.fixture
def world(tmp_path: Path) -> World:
    """A zone whose last lines record mallory trying for the operator's powers."""
    root = tmp_path / "zone"
    svc, token = Service.init_zone(root, InProcessBackend())
    try:
        op = svc.authenticate(token)
        svc.add_user(op, "sam", "steward")
        _, mallory_token = svc.add_user(op, "mallory", "researcher")
        mallory = svc.authenticate(mallory_token)
        first = svc.audit.head().seq + 1  # type: ignore[union-attr]
        before = tmp_path / "before.db"
        with sqlite3.connect(root / "state.db") as live, sqlite3.connect(before) as out:
            live.backup(out)
        for name in ("mallory-op", "mallory-op2"):
            with pytest.raises(PolicyDenied):
                svc.add_user(mallory, name, "operator")
        assert svc.audit_verify(op).ok  # its own line comes last, after mallory's
    finally:
        svc.close()
    return World(root, token, first, before)


def _attacker(db: Path) -> sqlite3.Connection:
    con = sqlite3.connect(db)
    for (name,) in con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_events'"
    ).fetchall():
        con.execute(f'DROP TRIGGER "{name}"')
    return con


def _rows(con: sqlite3.Connection) -> list[dict[str, Any]]:
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM audit_events ORDER BY seq")]
    con.row_factory = None
    return rows


def _drop_mallory_and_rehash(
    db: Path, mac: Callable[..., str], from_line: int | None = None
) -> None:
    """Delete mallory's lines, renumber the rest without gaps, and re-hash from ``from_line``
    (default: the first deleted line) to the end, each linked to the line before."""
    con = _attacker(db)
    with con:
        kept = [r for r in _rows(con) if r["actor"] != "mallory"]
        first = from_line or next(i for i, r in enumerate(kept, 1) if r["seq"] != i)
        con.execute("DELETE FROM audit_events WHERE seq >= ?", (first,))
        con.execute("DELETE FROM audit_events WHERE actor = 'mallory'")
        prev = GENESIS_HASH if first == 1 else kept[first - 2]["hash"]
        for seq, row in enumerate(kept[first - 1 :], start=first):
            at = datetime.fromisoformat(row["at"]).replace(tzinfo=UTC)  # stored naive, UTC
            details = json.loads(row["details_json"])
            fields = (row["actor"], row["action"], row["outcome"], row["target"], details)
            row.update(seq=seq, prev_hash=prev, hash=mac(seq, at, *fields, prev))
            con.execute(
                "INSERT INTO audit_events (seq, at, actor, action, outcome, target,"
                " details_json, prev_hash, hash) VALUES (:seq, :at, :actor, :action, :outcome,"
                " :target, :details_json, :prev_hash, :hash)",
                row,
            )
            prev = row["hash"]
    con.close()


def _assert_broken(world: World, seq: int, problem: str) -> None:
    report = world.verify()
    assert not report.ok, report
    assert (report.first_bad_seq, report.problem) == (seq, problem), report
    assert report.detail
    # the service's own appends (each verify writes a line) do not make it verify again
    for _ in range(2):
        assert not world.verify().ok


def test_mallorys_lines_really_are_in_the_log(world: World) -> None:
    assert world.verify().ok
    con = sqlite3.connect(world.db)
    actors = [a for (a,) in con.execute("SELECT actor FROM audit_events ORDER BY seq")]
    con.close()
    assert actors[world.first_mallory - 1] == "mallory"


def test_dropped_lines_rehashed_from_line_1_with_plain_sha256_fail_at_line_1(
    world: World,
) -> None:
    _drop_mallory_and_rehash(world.db, event_hash, from_line=1)
    _assert_broken(world, 1, "unkeyed")


def test_dropped_lines_rehashed_from_the_gap_with_plain_sha256_fail_at_the_gap(
    world: World,
) -> None:
    _drop_mallory_and_rehash(world.db, event_hash)
    _assert_broken(world, world.first_mallory, "unkeyed")


@pytest.mark.parametrize("guess", GUESSED_KEYS)
def test_dropped_lines_rehashed_with_a_guessed_key_fail_at_line_1(
    world: World, guess: bytes
) -> None:
    _drop_mallory_and_rehash(world.db, lambda *f: event_mac(guess, *f), from_line=1)
    _assert_broken(world, 1, "edited")


def test_the_pseudonym_secret_is_not_the_audit_key(world: World) -> None:
    # the one other key in the folder: were it reused, reading it would be enough
    secret = (world.root / "secret.key").read_bytes()
    _drop_mallory_and_rehash(world.db, lambda *f: event_mac(secret, *f), from_line=1)
    _assert_broken(world, 1, "edited")


def test_lines_cut_off_the_end_fail_as_truncated(world: World) -> None:
    con = _attacker(world.db)
    with con:
        con.execute("DELETE FROM audit_events WHERE seq >= ?", (world.first_mallory,))
    con.close()
    _assert_broken(world, world.first_mallory, "truncated")


def test_an_older_copy_of_the_database_put_back_fails_as_truncated(world: World) -> None:
    # what restoring a backup taken before mallory acted, or swapping the file, gives
    with sqlite3.connect(world.before) as older, sqlite3.connect(world.db) as live:
        older.backup(live)
    _assert_broken(world, world.first_mallory, "truncated")


def test_the_cli_exits_1_on_a_rehashed_log(world: World) -> None:
    _drop_mallory_and_rehash(world.db, event_hash, from_line=1)
    broken = sandbox("audit", "verify", "--json", zone=world.root, token=world.token)
    assert broken.returncode == 1, (broken.stdout, broken.stderr)
    report = last_json(broken)
    assert (report["ok"], report["first_bad_seq"], report["problem"]) == (False, 1, "unkeyed")
    assert "Traceback" not in broken.stderr


def test_the_audit_key_lives_in_the_zone_folder_only(world: World) -> None:
    key_file = world.root / "audit.key"
    key = Zone.open(world.root).audit_key()
    assert len(key) == 32 and key != (world.root / "secret.key").read_bytes()
    for f in (key_file, world.root / "audit.head"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    # nothing of the key in the database (nor in its write-ahead log)
    for db in world.root.glob("state.db*"):
        data = db.read_bytes()
        assert key not in data and key.hex().encode() not in data, db


def test_a_zone_without_its_audit_key_is_refused_naming_the_file(world: World) -> None:
    (world.root / "audit.key").unlink()
    with pytest.raises(IntegrityError, match="audit.key: the audit key is missing"):
        world.verify()
    (world.root / "audit.key").write_bytes(b"short")
    with pytest.raises(IntegrityError, match="not 32"):
        Zone.open(world.root).audit_key()
