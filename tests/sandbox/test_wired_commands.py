"""The commands wired to store methods and actions that had no path from the CLI: ``project
show``, ``project add-member``, ``project close``, ``access show``, ``access grants``, ``user
reissue`` and ``dataset caps``.

Each runs through the installed ``sandbox`` entry point in a subprocess with ``SANDBOX_ZONE``
and ``SANDBOX_TOKEN`` (``cli_runner``), and is checked on its exit code (0 done, 2 refused)
and its ``--json`` output. The zone is set up in-process (``factories.make_world``) and
independent calls run two at a time, to keep CLI starts few. No job runs: the closed
project's refusal is decided before anything is reserved.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_runner import ok, refused, sandbox
from factories import job_spec, make_world

from foundation.errors import PolicyDenied
from sandbox.backend import InProcessBackend
from sandbox.service import Service
from sandbox.zone import Zone

#: CLI calls at once (each is one short process; the zone's SQLite takes concurrent readers)
PARALLEL = 2


@dataclass
class World:
    root: Path
    tokens: dict[str, str]
    approved: str  # rita's approved request
    pending: str  # rita's pending request, with a quote attached
    grant: str

    def run(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        return sandbox(*args, zone=self.root, token=self.tokens[who], timeout=120)

    def many(self, *calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(PARALLEL) as pool:
            return list(pool.map(lambda c: self.run(c[0], *c[1:]), calls))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """operator, sam (steward), rita (researcher, owner of ``readmission`` with one dp-sgd
    grant and one pending request), ana (analyst, not yet a member), rex (researcher, not a
    member); two caps set on ``cohort``."""
    root = tmp_path_factory.mktemp("wired") / "zone"
    w = make_world(root, InProcessBackend(), patients=200)
    svc = w.svc
    try:
        _, ana = svc.add_user(w.operator, "ana", "analyst")
        _, rex = svc.add_user(w.operator, "rex", "researcher")
        svc.set_dataset_cap(w.steward, "cohort", 20.0)
        svc.set_dataset_cap(w.steward, "cohort", 12.0, 1e-4)
        (approved,) = svc.list_requests(w.researcher)
        pending = svc.request_access(
            w.researcher, "readmission", "cohort", ["age"], ["dp-sgd"], 1.0, 1e-6,
            quote={"epsilon": 0.9, "jobs": 2},
        )  # fmt: skip
        tokens = {
            "op": w.operator_token,
            "sam": w.steward_token,
            "rita": w.researcher_token,
            "ana": ana,
            "rex": rex,
        }
        assert approved.grant_id is not None
        yield World(root, tokens, approved.id, pending.id, approved.grant_id)
    finally:
        svc.close()


def _denied(proc: subprocess.CompletedProcess[str], kind: str = "policy_denied") -> str:
    out = refused(proc)
    assert out["error"] == kind, out
    return str(out["message"])


def test_reads_and_their_refusals(world: World) -> None:
    (
        show_rita,
        show_op,
        show_rex,
        show_human,
        req_rita,
        req_rex,
        req_human,
        grants_op,
        grants_rex,
        grants_filtered,
        grants_rex_named,
        caps_sam,
        caps_op_human,
        caps_rita,
    ) = world.many(
        ("rita", "project", "show", "readmission", "--json"),
        ("op", "project", "show", "readmission", "--json"),
        ("rex", "project", "show", "readmission", "--json"),
        ("ana", "project", "show", "nope"),
        ("rita", "access", "show", world.pending, "--json"),
        ("rex", "access", "show", world.pending, "--json"),
        ("sam", "access", "show", world.approved),
        ("op", "access", "grants", "--json"),
        ("rex", "access", "grants", "--json"),
        ("rita", "access", "grants", "--project", "readmission", "--dataset", "cohort", "--json"),
        ("rex", "access", "grants", "--project", "readmission", "--json"),
        ("sam", "dataset", "caps", "cohort", "--json"),
        ("op", "dataset", "caps", "cohort"),
        ("rita", "dataset", "caps", "cohort", "--json"),
    )

    # project show: purpose, owner, status, members and grants, for members and operators
    p = ok(show_rita)
    assert (p["name"], p["purpose"], p["owner"], p["status"]) == (
        "readmission",
        "readmission risk",
        "rita",
        "active",
    )
    assert p["members"] == ["rita"]
    (g,) = p["grants"]
    assert g["id"] == world.grant and g["dataset"] == "cohort"
    assert g["mechanisms"] == ["dp-sgd"] and "age" in g["columns"]
    assert (g["epsilon"], g["delta"], g["revoked"], g["live"]) == (5.0, 1e-5, False, True)
    assert g["expires_at"] is not None
    assert ok(show_op) == p
    assert "not a member of project readmission" in _denied(show_rex)
    assert show_human.returncode == 2 and "unknown project 'nope'" in show_human.stderr

    # access show: the whole request, quote included, for the project's members and stewards
    r = ok(req_rita)
    assert (r["id"], r["project"], r["dataset"], r["requested_by"]) == (
        world.pending,
        "readmission",
        "cohort",
        "rita",
    )
    assert (r["columns"], r["mechanisms"], r["epsilon"], r["delta"]) == (
        ["age"],
        ["dp-sgd"],
        1.0,
        1e-6,
    )
    assert (r["state"], r["decided_by"], r["decided_at"], r["grant_id"]) == (
        "pending",
        None,
        None,
        None,
    )
    assert r["quote"] == {"epsilon": 0.9, "jobs": 2}
    assert "not a member" in _denied(req_rex)
    assert req_human.returncode == 0, req_human.stderr
    assert "decided by sam" in req_human.stdout and world.grant in req_human.stdout

    # access grants: stewards and operators see all, others only their projects'
    assert [x["id"] for x in ok(grants_op)["grants"]] == [world.grant]
    assert ok(grants_rex)["grants"] == []
    (mine,) = ok(grants_filtered)["grants"]
    assert mine["id"] == world.grant and mine["project"] == "readmission"
    assert "not a member" in _denied(grants_rex_named)

    # dataset caps: the cap in force and its history, for stewards and operators only
    c = ok(caps_sam)
    assert c["cap"]["epsilon"] == 12.0 and c["cap"]["delta"] == 1e-4
    assert [h["epsilon"] for h in c["history"]] == [20.0, 12.0]
    assert c["worst_case"]["epsilon"] == pytest.approx(5.0)
    assert c["epsilon_left"] == pytest.approx(7.0) and c["over_cap"] is False
    assert caps_op_human.returncode == 0, caps_op_human.stderr
    assert "capped at epsilon 12" in caps_op_human.stdout
    assert "roles that may: operator, steward" in _denied(caps_rita)


def test_members_reissue_and_close(world: World) -> None:
    # only the owner adds members, and only researchers and analysts
    by_rex, steward_member, reissue_by_rita = world.many(
        ("rex", "project", "add-member", "readmission", "ana", "--json"),
        ("rita", "project", "add-member", "readmission", "sam", "--json"),
        ("rita", "user", "reissue", "ana", "--json"),
    )
    assert "project owner" in _denied(by_rex)
    assert "researchers and analysts" in _denied(steward_member)
    assert "roles that may: operator" in _denied(reissue_by_rita)

    added, reissued = world.many(
        ("rita", "project", "add-member", "readmission", "ana", "--json"),
        ("op", "user", "reissue", "ana", "--json"),
    )
    assert ok(added)["members"] == ["ana", "rita"]
    out = ok(reissued)
    assert out["user"]["name"] == "ana" and out["reactivated"] is False
    old, new = world.tokens["ana"], out["token"]
    assert new != old

    # the old token stops working; the new one sees the project she now belongs to
    world.tokens["ana-old"], world.tokens["ana"] = old, new
    with_old, with_new, close_by_rex, close_by_ana = world.many(
        ("ana-old", "project", "show", "readmission", "--json"),
        ("ana", "project", "show", "readmission", "--json"),
        ("rex", "project", "close", "readmission", "--json"),
        ("ana", "project", "close", "readmission", "--json"),
    )
    _denied(with_old, "auth_error")
    assert ok(with_new)["members"] == ["ana", "rita"]
    assert "project owner" in _denied(close_by_rex)
    assert "roles that may: researcher" in _denied(close_by_ana)

    closed = world.run("rita", "project", "close", "readmission", "--json")
    assert ok(closed)["status"] == "closed"
    again, add_after, show_after = world.many(
        ("rita", "project", "close", "readmission"),
        ("rita", "project", "add-member", "readmission", "rex", "--json"),
        ("ana", "project", "show", "readmission", "--json"),
    )
    assert again.returncode == 2 and "is closed and cannot become closed" in again.stderr
    assert "takes no new members" in _denied(add_after)
    assert ok(show_after)["status"] == "closed"


def test_closed_project_runs_nothing_and_every_call_is_audited(world: World) -> None:
    """After ``test_members_reissue_and_close``: the closed project's grant is still live,
    yet the access decision refuses the job before anything is reserved."""
    svc = Service(Zone.open(world.root), InProcessBackend())
    try:
        rita = svc.authenticate(world.tokens["rita"])
        if svc.store.get_project("readmission").status.value != "closed":
            pytest.skip("runs after test_members_reissue_and_close")
        with pytest.raises(PolicyDenied, match="project readmission is closed"):
            svc.submit(rita, job_spec())
        with pytest.raises(PolicyDenied, match="closed"):
            svc.request_access(rita, "readmission", "cohort", ["age"], ["dp-sgd"], 1.0, 1e-6)
        (balance,) = svc.ledger.balances("readmission")
        assert (balance.reserved_epsilon, balance.spent_epsilon) == (0.0, 0.0)

        events = svc.audit.list(limit=500)
        seen: dict[str, set[str]] = {}
        for e in events:
            seen.setdefault(e.action, set()).add(e.outcome.value)
        want: dict[str, set[str]] = {
            "project.show": {"ok", "denied"},
            "project.member.add": {"ok", "denied"},
            "project.close": {"ok", "denied"},
            "user.reissue": {"ok", "denied"},
            "dataset.cap.show": {"ok", "denied"},
            "access.list": {"ok", "denied"},
        }
        for action, outcomes in want.items():
            assert seen.get(action, set()) >= outcomes, (action, seen.get(action))
        assert svc.audit.verify().ok
    finally:
        svc.close()
