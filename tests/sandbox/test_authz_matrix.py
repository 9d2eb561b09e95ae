"""The authorisation matrix over HTTP: every route x every caller x own/other project.

The rows are generated from the route table (``sandbox.api.calls.CALLS``): each call is made
by each of five callers (operator, steward, the owner of project ``readmission``, a
researcher who is only a member of it, an analyst member of it) against targets in
``readmission`` (the callers' *own* project) and in ``other`` (a project none of them
belongs to), through a real ``sandbox serve``. An oracle written from ``policies.roles``
and the service's scoping rules says whether each row may succeed; the tests assert that no
row succeeds that the oracle refuses, that refusals are 403 ``policy_denied``, that enough
allowed rows succeed for the matrix to mean something, that list calls are filtered to the
caller's projects, that every refusal left a ``denied`` audit event, and that no route
answers anything but 401 without a valid token.

Mutating calls point at throwaway targets made for them (users, projects, requests, grants,
dataset names), and run last, so no row changes what a later row is decided on.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from factories import FEATURES, LABEL, job_spec, make_world
from served import served_zone

from connectors.cohort import cohort_contract, generate_cohort
from policies.roles import PERMISSIONS, Action, Role
from sandbox.api.calls import CALLS, Call
from sandbox.backend import InProcessBackend
from sandbox.service import Service
from sandbox.zone import Zone

# ~400 HTTP rows against a real server: make test-slow (CI runs it)
pytestmark = [pytest.mark.slow, pytest.mark.ray]

OWN, OTHER = "readmission", "other"
PROJECTS = (OWN, OTHER)
#: the callers, by user name: the four roles, and a researcher who is a member, not the owner
CALLERS: dict[str, Role] = {
    "operator": Role.OPERATOR,
    "sam": Role.STEWARD,
    "rita": Role.RESEARCHER,
    "rhea": Role.RESEARCHER,
    "ana": Role.ANALYST,
}
#: the columns the synthetic-data grants and fits use
SYNTH_COLS = ["hospital", "age", "sex", "diabetes", LABEL]

#: how a call is scoped beyond the role table (read from the service; absent: not scoped)
#: member       stewards and operators see every project, others only their own
#: member_only  the caller must be a member whatever the role (``request_access``)
#: owner        the project's owner only (``add_project_member``, ``close_project``)
#: submitter    a member who submitted the job (``cancel_job``)
#: dp_synth     a DP synthetic fit: researchers who are members (``SyntheticMechanism``)
SCOPE: dict[str, str] = {
    "show_project": "member",
    "add_project_member": "owner",
    "close_project": "owner",
    "request_access": "member_only",
    "show_request": "member",
    "list_grants": "member",
    "submit": "member",
    "job_status": "member",
    "cancel_job": "submitter",
    "job_result": "member",
    "dry_run": "member",
    "quote": "member",
    "quote_curve": "member",
    "tune": "member",
    "synth_fit": "dp_synth",
    "synth_report": "member",
    "budget": "member",
    "run_query": "member",
    "list_queries": "member",
}

#: allowed rows that still fail, for a reason that is no authorisation: the status expected
ALLOWED_BUT: dict[str, int] = {
    "cancel_job": 422,  # the target job has finished: only a queued job can be cancelled
    "quote_curve": 422,  # sent with on="bogus": six dry runs would cost too much here
    "totp_confirm": 422,  # sent with a wrong code (the secret went to the enrolling caller)
}

#: calls that change the zone: they run after every other call
DESTRUCTIVE = (
    "approve",
    "deny",
    "revoke_grant",
    "cancel_job",
    "close_project",
    "revoke_user",
    "reissue_token",
    "delete_dataset",
)


@dataclass
class Targets:
    """What the rows point at, per project, made in-process before the server starts."""

    members: dict[str, set[str]] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    job: dict[str, str] = field(default_factory=dict)  # a finished job of each project
    submitter: dict[str, str] = field(default_factory=dict)  # job id -> who submitted it
    req_show: dict[str, str] = field(default_factory=dict)
    req_approve: dict[str, str] = field(default_factory=dict)
    req_deny: dict[str, str] = field(default_factory=dict)
    grant_revoke: dict[str, str] = field(default_factory=dict)
    close: dict[str, str] = field(default_factory=dict)  # a throwaway project to close
    upload: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    call: str
    caller: str
    project: str  # OWN or OTHER
    target: str | None  # the project the row's target belongs to (scoped calls)
    allowed: bool
    role_allowed: bool
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None

    def __str__(self) -> str:
        side = "own" if self.project == OWN else "other"
        msg = self.body.get("message", "") if isinstance(self.body, dict) else ""
        return (
            f"{self.call} by {self.caller} ({CALLERS[self.caller].value}) on {side} project: "
            f"HTTP {self.status} {self.error or ''} {msg}".rstrip()
        )


@dataclass
class Matrix:
    rows: list[Row]
    anonymous: list[tuple[str, str, int, Any]]  # (call, token kind, status, body)
    denied_events: Counter[tuple[str, str]]
    seconds: float


# -- the oracle --------------------------------------------------------------------------------


def allowed(call: Call, caller: str, target: str | None, t: Targets) -> bool:
    """May ``caller`` call ``call`` on a target of project ``target``? (the service's intent)"""
    role = CALLERS[caller]
    if call.action not in PERMISSIONS[role]:
        return False
    rule = SCOPE.get(call.name)
    if rule is None:
        return True
    assert target is not None, call.name
    member = caller in t.members[target]
    sees_all = role in (Role.OPERATOR, Role.STEWARD)
    if rule == "member":
        return sees_all or member
    if rule == "member_only":
        return member
    if rule == "owner":
        return caller == t.owner[target]
    if rule == "submitter":
        return (sees_all or member) and caller == t.submitter[t.job[target]]
    if rule == "dp_synth":
        return role is Role.RESEARCHER and member
    raise AssertionError(rule)


# -- the rows' arguments -----------------------------------------------------------------------


def _spec(project: str) -> dict[str, Any]:
    return job_spec(
        project=project,
        model={"kind": "logistic", "hidden": []},
        **{"training.epochs": 1},
    ).to_dict()


def arguments(call: str, caller: str, p: str, t: Targets) -> tuple[dict[str, Any], str | None]:
    """The call's arguments for ``caller`` on project ``p``, and the target's project."""
    tag = f"{caller}-{p}"
    table: dict[str, Callable[[], tuple[dict[str, Any], str | None]]] = {
        "list_users": lambda: ({}, None),
        "add_user": lambda: ({"name": f"added-{tag}", "role": "analyst"}, None),
        "revoke_user": lambda: ({"name": f"rv-{tag}"}, None),
        "reissue_token": lambda: ({"name": f"ri-{tag}"}, None),
        "totp_enrol": lambda: ({}, None),
        "totp_confirm": lambda: ({"code": "abcdef"}, None),
        "list_datasets": lambda: ({}, None),
        "show_dataset": lambda: ({"name": "cohort"}, None),
        "ingest_dataset": lambda: (
            {"name": f"up-{tag}", "source": t.upload, "contract": cohort_contract().to_dict()},
            None,
        ),
        "ingest_demo": lambda: ({"name": f"demo-{tag}", "patients": 100, "seed": 1}, None),
        "set_dataset_cap": lambda: ({"dataset": "cohort", "epsilon": 1000.0}, None),
        "dataset_caps": lambda: ({"dataset": "cohort"}, None),
        # a throwaway dataset per row (made for stewards in build_world)
        "delete_dataset": lambda: ({"name": f"del-{tag}"}, None),
        "list_projects": lambda: ({}, None),
        "create_project": lambda: ({"name": f"new-{tag}", "purpose": "matrix"}, None),
        "show_project": lambda: ({"name": p}, p),
        # a quota above what any row's job asks: it changes no later decision
        "set_gpu_quota": lambda: ({"project": p, "gpus": 2.0}, p),
        "add_project_member": lambda: ({"project": p, "user": "extra"}, p),
        "close_project": lambda: ({"name": t.close[p]}, t.close[p]),
        "request_access": lambda: (
            {
                "project": p,
                "dataset": "cohort",
                "columns": ["age"],
                "mechanisms": ["dp-sgd"],
                "epsilon": 0.1,
                "delta": 1e-6,
            },
            p,
        ),
        "list_requests": lambda: ({}, None),
        "show_request": lambda: ({"request_id": t.req_show[p]}, p),
        "approve": lambda: (
            {
                "request_id": t.req_approve[p],
                "expires_at": (datetime.now(UTC) + timedelta(days=2)).isoformat(),
            },
            p,
        ),
        "deny": lambda: ({"request_id": t.req_deny[p], "reason": "not this time"}, p),
        "list_grants": lambda: ({"project": p}, p),
        "revoke_grant": lambda: ({"grant_id": t.grant_revoke[p]}, p),
        "submit": lambda: ({"spec": _spec(p)}, p),
        "list_jobs": lambda: ({}, None),
        "job_status": lambda: ({"job_id": t.job[p]}, p),
        "cancel_job": lambda: ({"job_id": t.job[p]}, p),
        "job_result": lambda: ({"job_id": t.job[p]}, p),
        "dry_run": lambda: ({"spec": _spec(p), "on": "dummy"}, p),
        "quote": lambda: ({"spec": _spec(p)}, p),
        "quote_curve": lambda: ({"spec": _spec(p), "on": "bogus"}, p),
        # every hyperparameter written: the search has nothing to choose (no training here)
        "tune": lambda: ({"spec": _spec(p), "on": "dummy"}, p),
        "synth_dummy": lambda: ({"dataset": "cohort", "rows": 20}, None),
        "synth_fit": lambda: (
            {
                "project": p,
                "dataset": "cohort",
                "epsilon": 0.2,
                "method": "mst",
                "rows": 50,
                "columns": SYNTH_COLS,
            },
            p,
        ),
        "synth_report": lambda: ({"job_id": t.job[p]}, p),
        "synth_release": lambda: ({"job_id": t.job[p]}, p),
        "budget": lambda: ({"project": p}, p),
        # a quote (dry): decided like a run, on the dp-query grant every project holds
        "run_query": lambda: (
            {
                "project": p,
                "query": {"dataset": "cohort", "kind": "mean", "column": "age", "epsilon": 0.05},
                "dry": True,
            },
            p,
        ),
        "list_queries": lambda: ({"project": p}, p),
        "audit_list": lambda: ({"limit": 5}, None),
        "audit_verify": lambda: ({}, None),
    }
    return table[call]()


def send(http: httpx.Client, call: Call, args: dict[str, Any], token: str | None) -> httpx.Response:
    path = call.path.format(**{k: args[k] for k in call.path_params})
    rest = {k: v for k, v in args.items() if k not in call.path_params}
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    if call.verb == "GET":
        return http.get(path, params=rest, headers=headers)
    return http.post(path, json=rest, headers=headers)


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


# -- the world ---------------------------------------------------------------------------------


def build_world(root: Path) -> tuple[dict[str, str], Targets]:
    """The zone, its users and the rows' targets, in-process; the callers' tokens."""
    w = make_world(root, InProcessBackend(), patients=300)
    svc, op, sam, rita = w.svc, w.operator, w.steward, w.researcher
    tokens = {"operator": w.operator_token, "sam": w.steward_token, "rita": w.researcher_token}
    actors: dict[str, Any] = {"operator": op, "sam": sam, "rita": rita}
    for name, role in [
        ("rhea", "researcher"),
        ("ana", "analyst"),
        ("rex", "researcher"),
        ("oz", "analyst"),
        ("extra", "analyst"),
    ]:
        _, tokens[name] = svc.add_user(op, name, role)
        actors[name] = svc.authenticate(tokens[name])
    for caller in CALLERS:
        for p in PROJECTS:
            svc.add_user(op, f"rv-{caller}-{p}", "analyst")
            svc.add_user(op, f"ri-{caller}-{p}", "analyst")
    rex = actors["rex"]
    for user in ("ana", "rhea"):
        svc.add_project_member(rita, OWN, user)
    svc.create_project(rex, OTHER, "someone else's project")
    svc.add_project_member(rex, OTHER, "oz")

    for caller, role in CALLERS.items():
        if Action.DATASET_DELETE in PERMISSIONS[role]:
            for p in PROJECTS:
                svc.ingest_demo(sam, f"del-{caller}-{p}", 100, seed=1)

    t = Targets()
    expires = datetime.now(UTC) + timedelta(days=30)
    owners = {OWN: (rita, ["ana", "rhea"]), OTHER: (rex, ["oz"])}

    def granted(p: str, columns: list[str], mechanisms: list[str], epsilon: float) -> str:
        req = svc.request_access(owners[p][0], p, "cohort", columns, mechanisms, epsilon, 1e-5)
        return str(svc.approve(sam, req.id, expires_at=expires).id)

    # readmission has its dp-sgd grant (make_world); both projects get what the rows need
    granted(OWN, SYNTH_COLS, ["synthetic"], 2.0)
    granted(OTHER, sorted({*FEATURES, LABEL, *SYNTH_COLS}), ["dp-sgd", "synthetic"], 5.0)
    for p, (owner, members) in owners.items():
        t.owner[p] = owner.name
        t.members[p] = {owner.name, *members}
        # a dp-query grant: run_query's rows quote on it, then revoke_grant revokes it
        t.grant_revoke[p] = granted(p, ["age"], ["dp-query"], 0.1)
        for bucket in (t.req_show, t.req_approve, t.req_deny):
            bucket[p] = str(
                svc.request_access(owner, p, "cohort", ["age"], ["dp-sgd"], 0.1, 1e-6).id
            )
        # a throwaway project with the same owner and members, for close_project
        close = f"closeme-{p}"
        svc.create_project(owner, close, "to be closed")
        for m in members:
            svc.add_project_member(owner, close, m)
        t.close[p] = close
        t.owner[close] = owner.name
        t.members[close] = set(t.members[p])
        # a finished job in each project: a DP synthetic fit (cheap), its report released
        job = svc.synth_fit(
            owner, p, "cohort", epsilon=0.3, method="mst", rows=100, columns=SYNTH_COLS
        )
        assert job.state.value == "succeeded", job.error
        svc.synth_release(sam, job.id)
        t.job[p] = job.id
        t.submitter[job.id] = owner.name

    buf = io.BytesIO()
    pq.write_table(generate_cohort(100, seed=5), buf)
    t.upload = {"name": "x.parquet", "data": base64.b64encode(buf.getvalue()).decode()}
    svc.close()
    return tokens, t


def run_matrix(root: Path) -> Matrix:
    tokens, t = build_world(root)
    by_name = {c.name: c for c in CALLS}
    order = [c for c in CALLS if c.name not in DESTRUCTIVE]
    order += [by_name[n] for n in DESTRUCTIVE]
    assert sorted(c.name for c in order) == sorted(by_name), "every call is in the matrix"
    rows: list[Row] = []
    anonymous: list[tuple[str, str, int, Any]] = []
    start = time.monotonic()
    with served_zone(root) as server, httpx.Client(base_url=server.url, timeout=300) as http:
        # no token, a token that is not one: 401 on every route, before anything else
        for call in CALLS:
            args, _ = arguments(call.name, "operator", OWN, t)
            for kind, token in (("none", None), ("bad", "not-a-token")):
                resp = send(http, call, args, token)
                anonymous.append((call.name, kind, resp.status_code, _body(resp)))
        for call in order:
            for caller in CALLERS:
                for p in PROJECTS:
                    args, target = arguments(call.name, caller, p, t)
                    resp = send(http, call, args, tokens[caller])
                    rows.append(
                        Row(
                            call=call.name,
                            caller=caller,
                            project=p,
                            target=target,
                            allowed=allowed(call, caller, target, t),
                            role_allowed=call.action in PERMISSIONS[CALLERS[caller]],
                            status=resp.status_code,
                            body=_body(resp),
                        )
                    )
    seconds = time.monotonic() - start
    svc = Service(Zone.open(root))
    try:
        events = svc.audit.list(limit=1_000_000, outcome="denied")
    finally:
        svc.close()
    denied = Counter((e.actor, e.action) for e in events)
    return Matrix(rows, anonymous, denied, seconds)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    yield run_matrix(tmp_path_factory.mktemp("authz") / "zone")


def _lines(rows: list[Any]) -> str:
    return "\n".join(f"  {r}" for r in rows)


# -- the tests ---------------------------------------------------------------------------------


def test_every_call_is_in_the_matrix(matrix: Matrix) -> None:
    made = {r.call for r in matrix.rows}
    assert made == {c.name for c in CALLS}
    assert len(matrix.rows) == len(CALLS) * len(CALLERS) * len(PROJECTS)


def test_no_unauthorised_call_succeeds(matrix: Matrix) -> None:
    bad = [r for r in matrix.rows if r.ok and not r.allowed]
    assert not bad, f"{len(bad)} unauthorised successes:\n{_lines(bad)}"


def test_a_role_forbidden_call_is_403_policy_denied(matrix: Matrix) -> None:
    bad = [
        r
        for r in matrix.rows
        if not r.role_allowed and (r.status != 403 or r.error != "policy_denied")
    ]
    assert not bad, f"role-forbidden calls not refused with 403 policy_denied:\n{_lines(bad)}"


def test_a_call_out_of_scope_is_403_policy_denied(matrix: Matrix) -> None:
    """Allowed by role, refused by scope (membership, ownership, submitter): 403 too."""
    bad = [
        r
        for r in matrix.rows
        if r.role_allowed and not r.allowed and (r.status != 403 or r.error != "policy_denied")
    ]
    assert not bad, f"out-of-scope calls not refused with 403 policy_denied:\n{_lines(bad)}"


def test_allowed_calls_do_what_they_are_allowed_to(matrix: Matrix) -> None:
    """The matrix is not vacuous: allowed rows succeed (or fail for a stated non-access
    reason), and none of them is refused as if it were not allowed."""
    allowed_rows = [r for r in matrix.rows if r.allowed]
    wrong = [
        r
        for r in allowed_rows
        if not (r.status == ALLOWED_BUT[r.call] if r.call in ALLOWED_BUT else r.ok)
    ]
    assert not wrong, f"allowed calls that did not do what was expected:\n{_lines(wrong)}"
    succeeded = [r for r in allowed_rows if r.ok]
    assert len(succeeded) >= 120, len(succeeded)
    assert {r.call for r in succeeded} >= {c.name for c in CALLS} - set(ALLOWED_BUT)


def test_no_call_fails_inside_the_service(matrix: Matrix) -> None:
    bad = [r for r in matrix.rows if r.status >= 500]
    assert not bad, f"server errors:\n{_lines(bad)}"


def test_every_refusal_left_a_denied_audit_event(matrix: Matrix) -> None:
    want: Counter[tuple[str, str]] = Counter(
        (r.caller, str(next(c.action for c in CALLS if c.name == r.call)))
        for r in matrix.rows
        if 400 <= r.status < 500
    )
    short = {
        k: (n, matrix.denied_events[k]) for k, n in want.items() if matrix.denied_events[k] < n
    }
    assert not short, (
        "(caller, action): (refused rows, denied audit events) where the log has fewer:\n"
        + "\n".join(f"  {k}: {v}" for k, v in sorted(short.items()))
    )


def test_list_calls_show_only_the_callers_projects(matrix: Matrix) -> None:
    """Lists are filtered, not refused: a member sees nothing of a project they are not in."""

    def values(obj: Any, keys: tuple[str, ...]) -> Iterator[str]:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in keys and isinstance(v, str):
                    yield v
                yield from values(v, keys)
        elif isinstance(obj, list):
            for v in obj:
                yield from values(v, keys)

    keys = {
        "list_projects": ("name",),
        "list_requests": ("project",),
        "list_grants": ("project",),
        "list_jobs": ("project",),
    }
    foreign = {OTHER, f"closeme-{OTHER}"}
    leaks = []
    for r in matrix.rows:
        if r.call not in keys or not r.ok or CALLERS[r.caller] in (Role.OPERATOR, Role.STEWARD):
            continue
        seen = set(values(r.body, keys[r.call]))
        if seen & foreign:
            leaks.append(f"{r} shows {sorted(seen & foreign)}")
    assert not leaks, "\n".join(leaks)
    # and the lists are not empty for the caller's own project (the check above means something)
    own = [
        r
        for r in matrix.rows
        if r.call in ("list_projects", "list_requests", "list_grants")
        and r.caller in ("rita", "ana")
        and r.project == OWN
    ]
    assert own and all(r.ok and OWN in set(values(r.body, keys[r.call])) for r in own), own


def test_no_token_or_a_bad_token_is_401_on_every_route(matrix: Matrix) -> None:
    bad = [
        (call, kind, status, body)
        for call, kind, status, body in matrix.anonymous
        if status != 401 or not isinstance(body, dict) or body.get("error") is None
    ]
    assert not bad, "\n".join(map(str, bad))
    assert len(matrix.anonymous) == 2 * len(CALLS)
