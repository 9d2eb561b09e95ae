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
``BudgetExceeded``. The job's epsilon and delta ride along for the audit line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from connectors.errors import PolicyDenied, SpecError
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

    ``action`` is the service call asking (``job.submit`` for training jobs, ``query.run``
    for DP queries): the role must be allowed to call it.
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
        key=lambda g: g.grant_id,
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
    closest = min(pool, key=lambda g: (len(_gaps(g, req.columns, req.mechanism)), g.grant_id))
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


# -- the zone-wide cap per dataset -------------------------------------------------------------


@dataclass(frozen=True)
class DatasetCap:
    """A steward's ceiling on what one person of ``dataset`` may be charged, summed over every
    live grant in every project (``delta`` ``None``: no delta cap)."""

    dataset: str
    epsilon: float
    delta: float | None
    set_by: str
    set_at: datetime

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "set_by": self.set_by,
            "set_at": self.set_at.isoformat(),
        }


@dataclass(frozen=True)
class NewGrant:
    """The grant an approval would create: what ``decide_dataset_cap`` checks."""

    project: str
    dataset: str
    mechanisms: frozenset[Mechanism]
    epsilon: float
    delta: float


@dataclass(frozen=True)
class WorstCase:
    """The most one person of a dataset can be charged across the live grants on it.

    ``epsilon`` = ``dataset_wide_epsilon`` + ``per_site_epsilon`` (summed exactly); ``delta``
    likewise. ``grant_ids`` are the live grants counted, sorted.
    """

    epsilon: float
    delta: float
    dataset_wide_epsilon: float
    per_site_epsilon: float
    grant_ids: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dataset_wide_epsilon": self.dataset_wide_epsilon,
            "per_site_epsilon": self.per_site_epsilon,
            "grants": list(self.grant_ids),
        }


def _terms(mechanisms: frozenset[Mechanism], value: float) -> tuple[list[float], list[float]]:
    """A grant's (dataset-wide, per-site) charges on one person, the way ``Service.approve``
    turns a grant into ledger budgets: ``federated`` gives every site a budget of the grant's
    full figure; every other mechanism shares one dataset-wide budget of it. A grant with
    both kinds gets both budgets, so it counts twice."""
    wide = [value] if mechanisms - {Mechanism.FEDERATED} else []
    per_site = [value] if Mechanism.FEDERATED in mechanisms else []
    return wide, per_site


@dataclass(frozen=True)
class _Charges:
    """The individual charges behind a worst case (summed with ``math.fsum``: exactly, so
    the order of the grants does not matter)."""

    live: tuple[GrantView, ...]
    wide_epsilon: tuple[float, ...]
    site_epsilon: tuple[float, ...]
    delta: tuple[float, ...]

    @classmethod
    def of(cls, grants: Sequence[GrantView], dataset: str, now: datetime) -> _Charges:
        live = tuple(
            sorted(
                (g for g in grants if g.dataset == dataset and g.live_at(now)),
                key=lambda g: g.grant_id,
            )
        )
        wide: list[float] = []
        site: list[float] = []
        delta: list[float] = []
        for g in live:
            w, s = _terms(g.mechanisms, float(g.epsilon))
            dw, ds = _terms(g.mechanisms, float(g.delta))
            wide += w
            site += s
            delta += dw + ds
        return cls(live, tuple(wide), tuple(site), tuple(delta))

    def plus(self, new: NewGrant) -> _Charges:
        w, s = _terms(new.mechanisms, float(new.epsilon))
        dw, ds = _terms(new.mechanisms, float(new.delta))
        return _Charges(
            self.live, (*self.wide_epsilon, *w), (*self.site_epsilon, *s), (*self.delta, *dw, *ds)
        )

    def worst(self) -> WorstCase:
        return WorstCase(
            epsilon=math.fsum(self.wide_epsilon + self.site_epsilon),
            delta=math.fsum(self.delta),
            dataset_wide_epsilon=math.fsum(self.wide_epsilon),
            per_site_epsilon=math.fsum(self.site_epsilon),
            grant_ids=tuple(g.grant_id for g in self.live),
        )


def person_worst_case(grants: Sequence[GrantView], dataset: str, now: datetime) -> WorstCase:
    """What one person of ``dataset`` can be charged across every live grant on it, in every
    project (grants on other datasets, revoked ones and ones expired at ``now`` don't count).

    Every person is in every dataset-wide budget, so those add up. A federated grant gives
    each site a budget and a person is at one site, so the per-site part is the largest total
    at any one site; every federated grant covers every site of the dataset, so that is the
    sum of the federated grants' figures. A person's worst case is the two parts added.
    """
    return _Charges.of(grants, dataset, now).worst()


@dataclass(frozen=True)
class CapDecision:
    """May a new grant be created under its dataset's cap?

    ``before`` is one person's worst case over the live grants already there, ``after`` with
    the new grant added. ``epsilon_left``/``delta_left`` are the room under the cap before
    the new grant; ``max_epsilon``/``max_delta`` the largest figure the new grant could get
    (0: no room at all); all four ``None`` when there is no such cap. When ``allowed`` is
    false, ``reason`` is one line naming ``--epsilon`` (or ``--delta``), the room left and
    the fixes, which ``fixes`` also lists.
    """

    allowed: bool
    dataset: str
    reason: str
    cap: DatasetCap | None
    before: WorstCase
    after: WorstCase
    epsilon_left: float | None = None
    delta_left: float | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    fixes: tuple[str, ...] = ()

    def raise_if_denied(self) -> None:
        """Raise ``PolicyDenied`` with the one-line reason (it already names the fixes)."""
        if not self.allowed:
            raise PolicyDenied(self.reason)

    def to_dict(self) -> dict[str, object]:
        return {
            "allowed": self.allowed,
            "dataset": self.dataset,
            "reason": self.reason,
            "cap": None if self.cap is None else self.cap.to_dict(),
            "worst_case_before": self.before.to_dict(),
            "worst_case_after": self.after.to_dict(),
            "epsilon_left": self.epsilon_left,
            "delta_left": self.delta_left,
            "max_epsilon": self.max_epsilon,
            "max_delta": self.max_delta,
            "fixes": list(self.fixes),
        }


#: significant digits of the figures a cap decision suggests
_SHOWN_DIGITS = 6
#: the float rounding of decimal figures a cap forgives, as a fraction of the cap (so that
#: 0.1 + 0.1 + 0.1 fits a cap of 0.3): far below any epsilon or delta that means anything
CAP_SLACK = 1e-9


def within_cap(total: float, cap: float) -> bool:
    """``total`` is at most ``cap`` (give or take ``CAP_SLACK`` of it for float rounding)."""
    return total <= cap + abs(cap) * CAP_SLACK


def _shown(x: float) -> float:
    """``x`` rounded to ``_SHOWN_DIGITS`` significant digits (to nearest)."""
    return float(f"{x:.{_SHOWN_DIGITS}g}")


def _nudged(x: float, steps: int) -> float:
    """``x`` (> 0) moved by ``steps`` units in its last shown digit, then shown."""
    unit = 10.0 ** (math.floor(math.log10(x)) - _SHOWN_DIGITS + 1)
    return _shown(x + steps * unit)


def _cap_for(x: float) -> float:
    """The smallest cap of ``_SHOWN_DIGITS`` significant digits that ``x`` fits."""
    if not x > 0:
        return x
    up = _shown(x)
    return up if within_cap(x, up) else _nudged(up, 1)


def _largest_fitting(used: Sequence[float], times: int, limit: float) -> float:
    """The largest x of ``_SHOWN_DIGITS`` significant digits for which
    ``fsum(used + [x] * times)`` is ``within_cap`` of ``limit``; 0 when no x above 0 fits."""

    def fits(x: float) -> bool:
        return x > 0 and within_cap(math.fsum([*used, *([x] * times)]), limit)

    room = (limit - math.fsum(used)) / times
    if not room > 0:
        return 0.0
    x = _shown(room)
    for _ in range(3):  # rounding error is at most a step or so
        if fits(x):
            return x
        x = _nudged(x, -1)
    return 0.0


def decide_dataset_cap(
    cap: DatasetCap | None, existing: Sequence[GrantView], new: NewGrant, now: datetime
) -> CapDecision:
    """May ``new`` be granted under the zone-wide cap on ``new.dataset``?

    One person's worst case (``person_worst_case``) over every live grant on the dataset in
    every project, plus ``new``, must stay within ``cap.epsilon`` and, if set, ``cap.delta``
    (``within_cap``: float rounding of decimal figures is forgiven). This is the defence against differencing one person across projects: two projects each
    granted epsilon 3 on the same dataset let a researcher in both spend 6 on one person.
    No cap: allowed. A cap already below the existing grants refuses every new grant.
    A cap on another dataset than ``new.dataset`` is a caller's bug (``SpecError``).
    """
    if cap is not None and cap.dataset != new.dataset:
        raise SpecError(
            "cap",
            f"is for dataset {cap.dataset} but the grant is on {new.dataset}",
            "pass the cap of the dataset the grant is on",
        )
    now_charges = _Charges.of(existing, new.dataset, now)
    then_charges = now_charges.plus(new)
    before, after = now_charges.worst(), then_charges.worst()
    where = f"dataset {new.dataset}"
    if cap is None:
        return CapDecision(True, new.dataset, f"{where} has no cap", None, before, after)

    wide, per_site = _terms(new.mechanisms, 1.0)
    times = len(wide) + len(per_site)  # how many budgets the new grant would create
    used_e = now_charges.wide_epsilon + now_charges.site_epsilon
    eps_left = max(cap.epsilon - before.epsilon, 0.0)
    max_eps = _largest_fitting(used_e, times, cap.epsilon) if times else None
    over_e = not within_cap(after.epsilon, cap.epsilon)
    cap_delta = cap.delta
    delta_left = max_delta = None
    over_d = False
    if cap_delta is not None:
        delta_left = max(cap_delta - before.delta, 0.0)
        max_delta = _largest_fitting(now_charges.delta, times, cap_delta) if times else None
        over_d = not within_cap(after.delta, cap_delta)
    if not (over_e or over_d):
        return CapDecision(
            True,
            new.dataset,
            f"one person's worst case on {where} would be epsilon {after.epsilon:g}"
            f" of the cap {cap.epsilon:g}",
            cap,
            before,
            after,
            epsilon_left=eps_left,
            delta_left=delta_left,
            max_epsilon=max_eps,
            max_delta=max_delta,
        )

    twice = " (the grant counts twice: a dataset-wide and a per-site budget)" if times == 2 else ""
    parts: list[str] = []
    fixes: list[str] = []
    if over_e:
        parts.append(
            f"--epsilon {float(new.epsilon):g} would let one person of {where} be charged"
            f" epsilon {after.epsilon:g} across all projects, over the dataset's cap of"
            f" {cap.epsilon:g} ({eps_left:g} left under the cap){twice}"
        )
        if max_eps:
            fixes.append(f"lower --epsilon to at most {max_eps:g}")
    raise_cmd = f"sandbox dataset cap {new.dataset} --epsilon " + (
        f"{_cap_for(max(after.epsilon, cap.epsilon)):g}"
    )
    if cap_delta is not None:
        if over_d:
            parts.append(
                f"--delta {float(new.delta):g} would take one person's delta to"
                f" {after.delta:g}, over the cap of {cap_delta:g} ({delta_left:g} left)"
            )
            if max_delta:
                fixes.append(f"lower --delta to at most {max_delta:g}")
        raise_cmd += f" --delta {_cap_for(max(after.delta, cap_delta)):g}"
    fixes.append(f"have a data steward raise the cap ({raise_cmd})")
    return CapDecision(
        False,
        new.dataset,
        "; ".join(parts) + ": " + ", or ".join(fixes),
        cap,
        before,
        after,
        epsilon_left=eps_left,
        delta_left=delta_left,
        max_epsilon=max_eps,
        max_delta=max_delta,
        fixes=tuple(fixes),
    )
