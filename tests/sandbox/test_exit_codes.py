"""Exit codes scripts can trust, through the installed ``sandbox`` entry point.

0: success. 1: ``audit verify`` found a broken chain. 2: a user error (one ``error:`` line on
stderr, or one JSON object with ``--json``). Every call runs ``.venv/bin/sandbox`` in a
subprocess with ``SANDBOX_ZONE`` and ``SANDBOX_TOKEN`` set, as a script would. No Ray: no
training or synthesis job runs here (the over-budget synthesis is refused before any compute).

Each CLI call pays the interpreter's start-up (several seconds), so the zone is built once
per module and independent calls run a few at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policies.audit import event_hash

SANDBOX = Path(sys.executable).with_name("sandbox")
#: parallel CLI calls (each is one short process; the zone's SQLite takes concurrent writers)
PARALLEL = 4


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> dict:
        """The one JSON object a ``--json`` call prints (and nothing else on stdout)."""
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        assert len(lines) == 1, (self.args, self.out, self.err)
        obj = json.loads(lines[0])
        assert isinstance(obj, dict), (self.args, self.out)
        return obj


@dataclass(frozen=True)
class Call:
    args: tuple[str, ...]
    token: str | None
    zone: Path

    def run(self, cwd: Path) -> Result:
        env = {k: v for k, v in os.environ.items() if k not in ("SANDBOX_TOKEN", "RAY_ADDRESS")}
        env["SANDBOX_ZONE"] = str(self.zone)
        if self.token is not None:
            env["SANDBOX_TOKEN"] = self.token
        proc = subprocess.run(
            [str(SANDBOX), *self.args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return Result(self.args, proc.returncode, proc.stdout, proc.stderr)


class Zone:
    """A zone driven only through the installed CLI."""

    def __init__(self, root: Path, cwd: Path) -> None:
        self.root = root
        self.cwd = cwd
        self.tokens: dict[str, str] = {}

    def call(self, *args: str, as_: str | None = None, token: str | None = None) -> Call:
        tok = token if token is not None else (self.tokens[as_] if as_ else None)
        return Call(tuple(args), tok, self.root)

    def run(self, *args: str, as_: str | None = None, code: int = 0) -> Result:
        r = self.call(*args, as_=as_).run(self.cwd)
        assert r.code == code, (args, r.code, r.out, r.err)
        assert "Traceback" not in r.err, (args, r.err)
        return r

    def run_many(self, calls: Sequence[Call]) -> list[Result]:
        with ThreadPoolExecutor(PARALLEL) as pool:
            return list(pool.map(lambda c: c.run(self.cwd), calls))

    def copy(self, dest: Path) -> Zone:
        shutil.copytree(self.root, dest)
        z = Zone(dest, self.cwd)
        z.tokens = dict(self.tokens)
        return z


def _both(args: Iterable[str]) -> list[tuple[str, ...]]:
    """A command's human and ``--json`` variants."""
    args = tuple(args)
    return [args, (*args, "--json")]


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Zone:
    """operator, a steward (sam) and a researcher (rita); the demo cohort; one project with
    one approved request (req1, on dp-sgd and synthetic, epsilon 1), one denied (req2) and
    one pending (req3)."""
    base = tmp_path_factory.mktemp("exit-codes")
    z = Zone(base / "zone", base)
    z.tokens["op"] = z.run("init", "--json").json()["token"]
    sam, rita = z.run_many(
        [
            z.call("user", "add", "sam", "--role", "steward", "--json", as_="op"),
            z.call("user", "add", "rita", "--role", "researcher", "--json", as_="op"),
        ]
    )
    assert sam.code == 0 and rita.code == 0, (sam, rita)
    z.tokens["sam"], z.tokens["rita"] = sam.json()["token"], rita.json()["token"]
    ingest, project = z.run_many(
        [
            z.call(
                "dataset", "ingest", "cohort", "--demo", "--patients", "300", "--json", as_="sam"
            ),
            z.call("project", "create", "readmission", "--purpose", "risk", "--json", as_="rita"),
        ]
    )
    assert ingest.code == 0 and ingest.json()["rows"] == 300, ingest
    assert project.code == 0 and project.json()["name"] == "readmission", project
    request = z.call(
        "access",
        "request",
        "readmission",
        "--dataset",
        "cohort",
        "--columns",
        "age,readmitted_30d",
        "--mechanism",
        "dp-sgd,synthetic",
        "--epsilon",
        "1",
        "--json",
        as_="rita",
    )
    reqs = z.run_many([request, request, request])
    assert all(r.code == 0 for r in reqs), reqs
    z.tokens.update({f"req{i}": r.json()["id"] for i, r in enumerate(reqs, 1)})
    approve, deny = z.run_many(
        [
            z.call(
                "access",
                "approve",
                z.tokens["req1"],
                "--expires",
                "2099-01-01",
                "--json",
                as_="sam",
            ),
            z.call(
                "access", "deny", z.tokens["req2"], "--reason", "too broad", "--json", as_="sam"
            ),
        ]
    )
    assert approve.code == 0 and approve.json()["epsilon"] == 1, approve
    assert deny.code == 0 and deny.json()["state"] == "denied", deny
    return z


# --- 0: success ----------------------------------------------------------------------------


def test_reads_succeed_with_exit_0_human_and_json(zone: Zone) -> None:
    # (args, who, also run without --json): every read as JSON, a few as prose too (each
    # call costs seconds of start-up)
    reads = [
        (("user", "list"), "op", True),
        (("dataset", "list"), "rita", False),
        (("dataset", "show", "cohort"), "rita", True),
        (("access", "list"), "rita", False),
        (("access", "list", "--pending"), "sam", False),
        (("budget", "readmission"), "rita", False),
        (("audit", "list"), "sam", False),
        (("audit", "verify"), "sam", True),
    ]
    calls = [
        zone.call(*v, as_=who)
        for args, who, human in reads
        for v in (_both(args) if human else [(*args, "--json")])
    ]
    results = zone.run_many(calls)
    for r in results:
        assert r.code == 0, (r.args, r.code, r.out, r.err)
        assert r.err.strip() == "", (r.args, r.err)
        if "--json" in r.args:
            r.json()  # exactly one JSON object
        else:
            assert r.out.strip(), r.args
    by = {r.args: r for r in results}
    users = by[("user", "list", "--json")].json()["users"]
    assert {u["name"] for u in users} == {"operator", "rita", "sam"}
    assert by[("dataset", "show", "cohort", "--json")].json()["name"] == "cohort"
    pending = by[("access", "list", "--pending", "--json")].json()["requests"]
    assert [r["id"] for r in pending] == [zone.tokens["req3"]]
    budgets = by[("budget", "readmission", "--json")].json()["budgets"]
    assert budgets[0]["granted_epsilon"] == 1
    verified = by[("audit", "verify", "--json")].json()
    assert verified["ok"] is True and verified["problem"] is None
    assert "verified" in by[("audit", "verify")].out


# --- 2: user errors ------------------------------------------------------------------------

USER_ERRORS = {
    "unknown dataset": (("dataset", "show", "nope"), "rita", "not_found"),
    "unknown token": (("user", "list"), "sz_not_a_real_token", "auth_error"),
    "bad role": (("user", "add", "wanda", "--role", "wizard"), "op", "spec_error"),
    "researcher approves": (("access", "approve", "{req3}"), "rita", "policy_denied"),
    "over budget": (
        (
            "synth",
            "fit",
            "cohort",
            "--project",
            "readmission",
            "--columns",
            "age,readmitted_30d",
            "--epsilon",
            "50",
        ),
        "rita",
        "budget_exceeded",
    ),
    "past --expires": (
        ("access", "approve", "{req3}", "--expires", "2000-01-01"),
        "sam",
        "spec_error",
    ),
}


def test_user_errors_exit_2_with_one_line_or_one_json_object(zone: Zone) -> None:
    calls, expected = [], []
    for name, (args, who, kind) in USER_ERRORS.items():
        args = tuple(a.format(**zone.tokens) for a in args)
        token = zone.tokens.get(who, who)  # an unknown name is a literal (bogus) token
        for variant in _both(args):
            calls.append(zone.call(*variant, token=token))
            expected.append((name, kind))
    for r, (name, kind) in zip(zone.run_many(calls), expected, strict=True):
        assert r.code == 2, (name, r.args, r.code, r.out, r.err)
        assert "Traceback" not in r.err and "Traceback" not in r.out, (name, r.err)
        if "--json" in r.args:
            obj = r.json()
            assert obj["error"] == kind, (name, obj)
            assert obj["message"], name
        else:
            lines = r.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.err)
            assert r.out.strip() == "", (name, r.out)
    # nothing was granted, reserved or charged by the refusals
    after = zone.run("budget", "readmission", "--json", as_="rita").json()["budgets"]
    assert len(after) == 1 and after[0]["granted_epsilon"] == 1
    assert after[0]["spent_epsilon"] == 0 and after[0]["reserved_epsilon"] == 0


# --- 1: a broken audit chain ---------------------------------------------------------------

#: the line each break is made at (the zone's log has well over this many lines)
AT = 4


def _open_as_attacker(db: Path) -> sqlite3.Connection:
    """The state database with any append-only trigger on the audit table dropped."""
    con = sqlite3.connect(db)
    triggers = con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_events'"
    ).fetchall()
    for (name,) in triggers:
        con.execute(f'DROP TRIGGER "{name}"')
    return con


def _edit(con: sqlite3.Connection) -> None:
    con.execute("UPDATE audit_events SET target = 'someone-else' WHERE seq = ?", (AT,))


def _edit_time(con: sqlite3.Connection) -> None:
    con.execute("UPDATE audit_events SET at = 'not a time' WHERE seq = ?", (AT,))


def _drop(con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM audit_events WHERE seq = ?", (AT,))


def _reorder(con: sqlite3.Connection) -> None:
    con.execute("UPDATE audit_events SET seq = -1 WHERE seq = ?", (AT,))
    con.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (AT, AT + 1))
    con.execute("UPDATE audit_events SET seq = ? WHERE seq = -1", (AT + 1,))


def _insert(con: sqlite3.Connection) -> None:
    """A forged line slipped in at ``AT``, linked to the line before and hashed by the old
    unkeyed rule; the later lines renumbered to make room (what an attacker with the
    database but not the audit key can do)."""
    at_text, prev = con.execute(
        "SELECT at, hash FROM audit_events WHERE seq = ?", (AT - 1,)
    ).fetchone()
    con.execute("UPDATE audit_events SET seq = -seq WHERE seq >= ?", (AT,))
    con.execute("UPDATE audit_events SET seq = 1 - seq WHERE seq < 0")
    at = datetime.fromisoformat(at_text).replace(tzinfo=UTC)  # stored naive, in UTC
    details = {"role": "operator"}
    digest = event_hash(AT, at, "mallory", "user.add", "ok", "mallory", details, prev)
    con.execute(
        "INSERT INTO audit_events (seq, at, actor, action, outcome, target, details_json,"
        " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (AT, at_text, "mallory", "user.add", "ok", "mallory", json.dumps(details), prev, digest),
    )


BREAKS = {
    # name: (how, first bad line, what verify calls it)
    "edited line": (_edit, AT, "edited"),
    "edited time": (_edit_time, AT, "edited"),
    "dropped line": (_drop, AT, "dropped"),
    "reordered lines": (_reorder, AT, "reordered"),
    # the forged line links correctly, but its hash is plain SHA-256: without the zone's
    # audit key (ZONE/audit.key) no one can make a line that verifies
    "inserted line": (_insert, AT, "unkeyed"),
}


def test_audit_verify_exits_1_on_every_kind_of_break(zone: Zone, tmp_path: Path) -> None:
    calls, expected = [], []
    for i, (name, (how, seq, problem)) in enumerate(BREAKS.items()):
        broken = zone.copy(tmp_path / f"zone-{i}")
        con = _open_as_attacker(broken.root / "state.db")
        with con:
            how(con)
        con.close()
        for variant in _both(("audit", "verify")):
            calls.append(broken.call(*variant, as_="sam"))
            expected.append((name, seq, problem))
    for r, (name, seq, problem) in zip(zone.run_many(calls), expected, strict=True):
        assert r.code == 1, (name, r.args, r.code, r.out, r.err)
        assert "Traceback" not in r.err, (name, r.err)
        if "--json" in r.args:
            rep = r.json()
            assert rep["ok"] is False, (name, rep)
            assert (rep["first_bad_seq"], rep["problem"]) == (seq, problem), (name, rep)
            assert rep["detail"], name
        else:
            assert f"audit chain broken at event {seq}: {problem}" in r.out, (name, r.out)
