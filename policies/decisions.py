"""Access decisions: pure functions of frozen values.

``decide_job_access(request, project, grants, now) -> Decision`` is the policy chokepoint that
runs before any data is opened or any budget reserved. ``decide_access_request`` checks a new
access request before the store records it. Neither reads the clock, the database or any
module-level state: the same inputs always give the same ``Decision``, and the order of the
grants does not matter.

A ``Decision`` that says no carries the reason, exactly what is missing (``column age``,
``mechanism dp-sgd``, ``membership of project p``) and who can grant it (``data steward``),
so the caller can raise ``PolicyDenied(d.reason, missing=d.missing, grantor=d.grantor)`` or
simply ``d.raise_if_denied()``.

Grant coverage rule: **one** grant must cover the whole job (every column it reads and its
mechanism). Grants are not unioned: each grant is a separate steward decision about one
combination of columns and mechanisms, and a job that needs two of them needs a steward to
look at the combination. Adding a grant therefore never turns an allowed job into a denial.

Budgets are not decided here: a grant's epsilon and delta are the budget the steward gave the
ledger (``privacy/ledger.py``), which reserves each job's spend atomically and refuses with
``BudgetExceeded``. The job's epsilon and delta ride along for the audit line. The zone-wide
cap per dataset, which a new grant must fit, is decided in ``policies.caps`` (one person's
worst case across every project's grants: ``policies.worst_case``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from foundation.errors import PolicyDenied, SpecError
from policies.roles import ROLE_GRANTOR, Action, Role, is_allowed, roles_for

#: who grants data access
STEWARD = "data steward"


class Mechanism(StrEnum):
    """How a project may touch a dataset; a grant lists the ones it allows."""

    DP_SGD = "dp-sgd"
    FEDERATED = "federated"
    SYNTHETIC = "synthetic"  # DP synthetic data (charged); schema-only dummy data needs no grant
    DP_QUERY = "dp-query"


class ProjectStatus(StrEnum):
    ACTIVE = "active"  # may request access and run jobs
    CLOSED = "closed"  # finished: keeps its history, may not run anything (terminal)


#: the allowed project status changes, checked in ``check_project_transition``
PROJECT_TRANSITIONS: frozenset[tuple[ProjectStatus, ProjectStatus]] = frozenset(
    {(ProjectStatus.ACTIVE, ProjectStatus.CLOSED)}
)


class RequestState(StrEnum):
    PENDING = "pending"  # filed by a project member, waiting for a data steward
    APPROVED = "approved"  # a steward approved it; exactly one grant was created (terminal)
    DENIED = "denied"  # a steward denied it with a reason (terminal)


#: the allowed access-request state changes, checked in ``check_request_transition``
REQUEST_TRANSITIONS: frozenset[tuple[RequestState, RequestState]] = frozenset(
    {
        (RequestState.PENDING, RequestState.APPROVED),
        (RequestState.PENDING, RequestState.DENIED),
    }
)


def check_request_transition(request_id: str, current: RequestState, target: RequestState) -> None:
    """Raise ``PolicyDenied`` unless ``current -> target`` is an allowed request transition."""
    if (RequestState(current), RequestState(target)) in REQUEST_TRANSITIONS:
        return
    sources = sorted(f.value for f, t in REQUEST_TRANSITIONS if t == target)
    raise PolicyDenied(
        f"access request {request_id} is {current.value} and cannot become {target.value}"
        f" (only a {' or '.join(sources) or 'no'} request can)",
        missing=("a new access request",) if current != RequestState.PENDING else (),
    )


def check_project_transition(project: str, current: ProjectStatus, target: ProjectStatus) -> None:
    """Raise ``PolicyDenied`` unless ``current -> target`` is an allowed project transition."""
    if (ProjectStatus(current), ProjectStatus(target)) in PROJECT_TRANSITIONS:
        return
    raise PolicyDenied(f"project {project} is {current.value} and cannot become {target.value}")


@dataclass(frozen=True)
class GrantView:
    """What a grant allows, as the decision sees it."""

    grant_id: str
    project: str
    dataset: str
    columns: frozenset[str]
    mechanisms: frozenset[Mechanism]
    epsilon: float
    delta: float
    expires_at: datetime | None
    revoked: bool

    def live_at(self, now: datetime) -> bool:
        """Unrevoked and not yet expired at ``now`` (a grant expires *at* ``expires_at``)."""
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class ProjectView:
    name: str
    owner: str
    members: frozenset[str]
    status: ProjectStatus


@dataclass(frozen=True)
class JobAccessRequest:
    """Someone wants to run ``mechanism`` over ``columns`` of ``dataset`` for ``project``.

    ``action`` is the service call asking (``job.submit`` for training jobs, ``synth.fit``
    for DP synthesis): the role must be allowed to call it.
    """

    user: str
    role: Role
    project: str
    dataset: str
    columns: frozenset[str]
    mechanism: Mechanism
    epsilon: float
    delta: float
    action: Action = Action.JOB_SUBMIT


@dataclass(frozen=True)
class NewAccessRequest:
    """A project member asks a steward for ``mechanisms`` over ``columns`` of ``dataset``."""

    user: str
    role: Role
    project: str
    dataset: str
    columns: frozenset[str]
    mechanisms: frozenset[Mechanism]
    epsilon: float
    delta: float


@dataclass(frozen=True)
class FieldProblem:
    """One invalid field of a request: the field, what is wrong, how to fix it."""

    field: str
    problem: str
    fix: str

    def to_error(self) -> SpecError:
        return SpecError(self.field, self.problem, self.fix)


@dataclass(frozen=True)
class Decision:
    """The answer. When ``allowed`` is false, ``reason`` says why, ``missing`` lists exactly
    what would have to be granted, and ``grantor`` who can grant it. ``grant_id`` names the
    grant that allowed a job. ``problems`` lists invalid request fields (a ``SpecError`` each).
    """

    allowed: bool
    reason: str
    missing: tuple[str, ...]
    grantor: str
    grant_id: str | None
    problems: tuple[FieldProblem, ...] = ()

    def raise_if_denied(self) -> None:
        """Raise the first field problem as ``SpecError``, else a denial as ``PolicyDenied``."""
        if self.allowed:
            return
        if self.problems:
            raise self.problems[0].to_error()
        raise PolicyDenied(self.reason, missing=self.missing, grantor=self.grantor)


def _allow(reason: str, grant_id: str | None = None) -> Decision:
    return Decision(True, reason, (), "", grant_id)


def _deny(reason: str, missing: Iterable[str], grantor: str) -> Decision:
    return Decision(False, reason, tuple(missing), grantor, None)


def _date(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M %Z").strip()


def _people_checks(
    user: str, role: Role, action: Action, project: ProjectView, project_name: str
) -> Decision | None:
    """Role, project identity, status and membership: the checks every decision starts with."""
    if project_name != project.name:
        raise SpecError(
            "project",
            f"the request is for project {project_name} but the view is of {project.name}",
            "pass the view of the project the request names",
        )
    if not is_allowed(role, action):
        able = roles_for(action)
        return _deny(
            f"role {role.value} may not call {action.value}",
            (f"role {' or '.join(r.value for r in able)} for {action.value}",),
            ROLE_GRANTOR,
        )
    if project.status != ProjectStatus.ACTIVE:
        return _deny(
            f"project {project.name} is {project.status.value}",
            (f"an active project (not {project.status.value})",),
            STEWARD,
        )
    if user not in project.members:
        return _deny(
            f"{user} is not a member of project {project.name}",
            (f"membership of project {project.name}",),
            f"project owner ({project.owner})",
        )
    return None


def _gaps(grant: GrantView, columns: frozenset[str], mechanism: Mechanism) -> tuple[str, ...]:
    """What ``grant`` lacks for this job: missing mechanism first, then columns sorted."""
    out = [] if mechanism in grant.mechanisms else [f"mechanism {mechanism.value}"]
    out += [f"column {c}" for c in sorted(columns - grant.columns)]
    return tuple(out)


def _order(g: GrantView) -> tuple[object, ...]:
    """A total order on grants (ids first; the rest only breaks ties between equal ids), so
    a decision never depends on the order grants arrive in."""
    return (
        g.grant_id,
        tuple(sorted(g.columns)),
        tuple(sorted(m.value for m in g.mechanisms)),
        g.epsilon,
        g.delta,
        g.expires_at.isoformat() if g.expires_at else "",
        g.revoked,
    )


def decide_job_access(
    req: JobAccessRequest, project: ProjectView, grants: Sequence[GrantView], now: datetime
) -> Decision:
    """May ``req.user`` run ``req.mechanism`` over ``req.columns`` of ``req.dataset`` now?

    Checks, in order: the role may call ``req.action``; the project is active; the user is a
    member; one unrevoked grant for this project and dataset, unexpired at ``now``, covers the
    mechanism and every column. Grants for other projects or datasets are ignored.
    """
    denied = _people_checks(req.user, Role(req.role), Action(req.action), project, req.project)
    if denied is not None:
        return denied

    mine = sorted(
        (g for g in grants if g.project == req.project and g.dataset == req.dataset),
        key=_order,
    )
    where = f"project {req.project} on dataset {req.dataset}"
    if not mine:
        return _deny(
            f"{where} has no access grant",
            (f"grant of {req.mechanism.value} on dataset {req.dataset}",),
            STEWARD,
        )

    covering = [g for g in mine if not _gaps(g, req.columns, req.mechanism)]
    live_covering = [g for g in covering if g.live_at(now)]
    if live_covering:
        g = live_covering[0]
        return _allow(f"grant {g.grant_id} covers {req.mechanism.value} on {where}", g.grant_id)

    # a grant would cover it but is no longer live: say when it ended (renewal is the fix)
    expired = [(t, g.grant_id, g) for g in covering if not g.revoked and (t := g.expires_at)]
    if expired:
        ended, _, g = max(expired, key=lambda e: (e[0], e[1]))
        return _deny(
            f"grant {g.grant_id} for {where} expired on {_date(ended)}",
            (f"unexpired grant on dataset {req.dataset} (renewal of {g.grant_id})",),
            STEWARD,
        )
    if covering:
        g = covering[0]
        return _deny(
            f"grant {g.grant_id} for {where} was revoked",
            (f"unrevoked grant on dataset {req.dataset}",),
            STEWARD,
        )

    # nothing covers it: report the live grant that comes closest, and exactly what it lacks
    live = [g for g in mine if g.live_at(now)]
    pool = live or mine
    closest = min(pool, key=lambda g: (len(_gaps(g, req.columns, req.mechanism)), _order(g)))
    missing = _gaps(closest, req.columns, req.mechanism)
    if not live:
        missing += (f"unexpired, unrevoked grant on dataset {req.dataset}",)
    return _deny(
        f"no grant for {where} covers this job (closest: {closest.grant_id})",
        missing,
        STEWARD,
    )


def _budget_problems(epsilon: float, delta: float) -> list[FieldProblem]:
    out = []
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0):
        out.append(FieldProblem("epsilon", "must be a finite number above 0", "e.g. epsilon = 1.0"))
    if not (isinstance(delta, int | float) and math.isfinite(delta) and 0 < delta < 1):
        out.append(
            FieldProblem(
                "delta", "must be above 0 and below 1", "use well below 1/persons, e.g. 1e-5"
            )
        )
    return out


def check_budget(epsilon: float, delta: float) -> tuple[FieldProblem, ...]:
    """Problems with an (epsilon, delta) pair: epsilon > 0 and finite, 0 < delta < 1."""
    return tuple(_budget_problems(epsilon, delta))


def decide_access_request(
    req: NewAccessRequest, project: ProjectView, known_columns: frozenset[str]
) -> Decision:
    """May this new access request be filed? ``known_columns`` come from the dataset's contract.

    Checks the role may request access, the project is active and the user a member
    (denials), then every field (``problems``): at least one column, every column in the
    contract, at least one mechanism, epsilon > 0, 0 < delta < 1.
    """
    denied = _people_checks(req.user, Role(req.role), Action.ACCESS_REQUEST, project, req.project)
    if denied is not None:
        return denied

    problems: list[FieldProblem] = []
    unknown = sorted(req.columns - known_columns)
    if not req.columns:
        problems.append(FieldProblem("columns", "is empty", "name every column the project needs"))
    elif unknown:
        problems.append(
            FieldProblem(
                "columns",
                f"not in dataset {req.dataset}'s contract: {', '.join(unknown)}",
                f"known columns: {', '.join(sorted(known_columns)) or '(none)'}",
            )
        )
    if not req.mechanisms:
        problems.append(
            FieldProblem(
                "mechanisms",
                "is empty",
                f"use one or more of {', '.join(m.value for m in Mechanism)}",
            )
        )
    problems += _budget_problems(req.epsilon, req.delta)
    if problems:
        return Decision(
            False,
            "the access request is invalid: "
            + "; ".join(f"{p.field} {p.problem}" for p in problems),
            tuple(p.field for p in problems),
            "",
            None,
            tuple(problems),
        )
    return _allow(f"request for {req.dataset} in project {req.project} may be filed")


def parse_mechanisms(values: Iterable[str]) -> frozenset[Mechanism]:
    """``Mechanism`` values from strings; an unknown one is a ``SpecError`` naming it."""
    out = set()
    for v in values:
        try:
            out.add(Mechanism(v))
        except ValueError:
            raise SpecError(
                "mechanisms",
                f"{v!r} is not a mechanism",
                f"use one of {', '.join(m.value for m in Mechanism)}",
            ) from None
    return frozenset(out)
