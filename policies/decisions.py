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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from connectors.errors import PolicyDenied, SpecError
from policies.roles import ROLE_GRANTOR, Action, Role, is_allowed, roles_for
from privacy.ledger import BudgetKey, EventKind, LedgerEvent, fold_balance

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
    """A steward's ceiling on what one person of ``dataset`` may be charged across every grant
    ever made on it, in every project (``person_worst_case``: what live grants can still
    release plus what expired and revoked ones did release); ``delta`` ``None``: no delta cap."""

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


def ledger_grant_id(grant_id: str, site: str = "") -> str:
    """The id of the ledger GRANT event ``Service.approve`` writes for ``grant_id`` on one of
    its budget keys: the grant id on the dataset-wide key, ``grant_id@site`` on a site's."""
    return f"{grant_id}@{site}" if site else grant_id


@dataclass(frozen=True)
class KeySpend:
    """One ledger budget key on a dataset as the cap counts it (``key_spends`` folds these
    from the ledger's events).

    ``granted_*`` is every GRANT ever appended to the key, whichever grant it came from: the
    ledger pools a key's grants, so a later grant on the key makes an earlier, expired or
    revoked one's unspent remainder spendable again. ``released_*`` is what was spent
    (committed) plus what open reservations hold (they may still commit up to that).
    ``grant_events`` are the ids of the key's GRANT events (``ledger_grant_id``): a grant
    whose event is not there yet is counted from its grant row instead.
    """

    key: BudgetKey
    granted_epsilon: float
    granted_delta: float
    released_epsilon: float
    released_delta: float
    grant_events: frozenset[str] = frozenset()

    def reach(self, open_: bool) -> tuple[float, float]:
        """(epsilon, delta) the key can charge one person in all: if a live grant can still
        spend from it (``open_``), everything ever granted on it (and at least what was
        released, should float rounding have let that pass the grants); else what was
        released."""
        if open_:
            return (
                max(self.granted_epsilon, self.released_epsilon),
                max(self.granted_delta, self.released_delta),
            )
        return self.released_epsilon, self.released_delta


def key_spends(events: Iterable[LedgerEvent], dataset: str) -> tuple[KeySpend, ...]:
    """Every ledger key on ``dataset`` (all projects and sites) that has events, folded from
    ``events`` by ``privacy.ledger.fold_balance`` (events on other datasets are ignored),
    sorted by key."""
    mine = [ev for ev in events if ev.key.dataset == dataset]
    out: list[KeySpend] = []
    for key in sorted({ev.key for ev in mine}):
        bal = fold_balance(key, mine)
        out.append(
            KeySpend(
                key=key,
                granted_epsilon=bal.granted_epsilon,
                granted_delta=bal.granted_delta,
                released_epsilon=math.fsum([bal.spent_epsilon, bal.reserved_epsilon]),
                released_delta=math.fsum([bal.spent_delta, bal.reserved_delta]),
                grant_events=frozenset(
                    ev.event_id for ev in mine if ev.key == key and ev.kind is EventKind.GRANT
                ),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class WorstCase:
    """The most one person of a dataset can be charged across every grant ever made on it.

    ``epsilon`` = ``dataset_wide_epsilon`` + ``per_site_epsilon`` (summed exactly); ``delta``
    likewise. ``grant_ids`` are the live grants counted, sorted. ``released_epsilon`` is the
    part of ``epsilon`` the ledger shows spent or reserved already, and ``ledger_keys`` the
    ledger budgets counted (those of expired and revoked grants included).
    """

    epsilon: float
    delta: float
    dataset_wide_epsilon: float
    per_site_epsilon: float
    grant_ids: tuple[str, ...]
    released_epsilon: float = 0.0
    ledger_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dataset_wide_epsilon": self.dataset_wide_epsilon,
            "per_site_epsilon": self.per_site_epsilon,
            "grants": list(self.grant_ids),
            "released_epsilon": self.released_epsilon,
            "ledger_keys": list(self.ledger_keys),
        }


def _terms(mechanisms: frozenset[Mechanism], value: float) -> tuple[list[float], list[float]]:
    """A grant's (dataset-wide, per-site) charges on one person, the way ``Service.approve``
    turns a grant into ledger budgets: ``federated`` gives every site a budget of the grant's
    full figure; every other mechanism shares one dataset-wide budget of it. A grant with
    both kinds gets both budgets, so it counts twice."""
    wide = [value] if mechanisms - {Mechanism.FEDERATED} else []
    per_site = [value] if Mechanism.FEDERATED in mechanisms else []
    return wide, per_site


class _Term(NamedTuple):
    """One charge on one person: a ledger key's reach, or a grant not in the ledger yet."""

    epsilon: float
    delta: float
    released_epsilon: float
    key: str  # the ledger key ("" for a grant counted from its row)


def _worst_slot(
    wide: Sequence[float], slots: dict[str, list[_Term]], pick: Callable[[_Term], float]
) -> tuple[str, float]:
    """The site whose people are charged most (wide + that site's terms, summed exactly)."""
    name = max(slots, key=lambda s: (math.fsum([*wide, *map(pick, slots[s])]), s))
    return name, math.fsum([*wide, *map(pick, slots[name])])


def _in_ledger(
    keys: dict[tuple[str, str], KeySpend], project: str, grant_id: str | None, site: str
) -> bool:
    """Is the grant's GRANT event on its project's key at ``site`` (the new grant: never)?"""
    on = keys.get((project, site))
    return (
        grant_id is not None
        and on is not None
        and ledger_grant_id(grant_id, site) in on.grant_events
    )


@dataclass(frozen=True)
class _Charges:
    """The individual charges behind a worst case, per slot: the dataset-wide budgets (every
    person is in them) and each site's budgets (a person is at one site). Sums use
    ``math.fsum`` (exact, so the order of grants and keys does not matter)."""

    live: tuple[GrantView, ...]
    wide: tuple[_Term, ...]
    #: site -> its terms; "" is a site with no ledger key yet (any site, for grant rows)
    sites: tuple[tuple[str, tuple[_Term, ...]], ...]

    @classmethod
    def of(
        cls,
        grants: Sequence[GrantView],
        ledger: Sequence[KeySpend],
        dataset: str,
        now: datetime,
        new: NewGrant | None = None,
    ) -> _Charges:
        live = tuple(
            sorted(
                (g for g in grants if g.dataset == dataset and g.live_at(now)),
                key=lambda g: g.grant_id,
            )
        )
        # (project, grant id or None for the new grant, mechanisms, epsilon, delta)
        adds: list[tuple[str, str | None, frozenset[Mechanism], float, float]] = [
            (g.project, g.grant_id, g.mechanisms, g.epsilon, g.delta) for g in live
        ]
        if new is not None:
            adds.append((new.project, None, new.mechanisms, new.epsilon, new.delta))
        # a key is open while a live grant (or the new one) of its project can spend from it
        open_wide = {p for p, _, m, _, _ in adds if m - {Mechanism.FEDERATED}}
        open_site = {p for p, _, m, _, _ in adds if Mechanism.FEDERATED in m}
        keys: dict[tuple[str, str], KeySpend] = {}
        for k in ledger:
            if k.key.dataset != dataset:
                continue
            if (k.key.project, k.key.site) in keys:
                raise SpecError("ledger", f"lists budget {k.key} twice", "fold each key once")
            keys[(k.key.project, k.key.site)] = k
        wide: list[_Term] = []
        sites: dict[str, list[_Term]] = {"": []}
        for (project, site), k in sorted(keys.items()):
            e, d = k.reach(project in (open_site if site else open_wide))
            term = _Term(float(e), float(d), float(k.released_epsilon), str(k.key))
            (sites.setdefault(site, []) if site else wide).append(term)
        for project, gid, mechs, eps, dlt in adds:
            term = _Term(float(eps), float(dlt), 0.0, "")
            if mechs - {Mechanism.FEDERATED} and not _in_ledger(keys, project, gid, ""):
                wide.append(term)
            if Mechanism.FEDERATED in mechs:
                for site, terms in sites.items():
                    # "" here is a site with no ledger key: the grant is not in the ledger there
                    if not (site and _in_ledger(keys, project, gid, site)):
                        terms.append(term)
        return cls(live, tuple(wide), tuple((s, tuple(t)) for s, t in sorted(sites.items())))

    def worst(self) -> WorstCase:
        slots = {s: list(t) for s, t in self.sites}
        wide_e = [t.epsilon for t in self.wide]
        site, epsilon = _worst_slot(wide_e, slots, lambda t: t.epsilon)
        _, delta = _worst_slot([t.delta for t in self.wide], slots, lambda t: t.delta)
        counted = [*self.wide, *slots[site]]
        return WorstCase(
            epsilon=epsilon,
            delta=delta,
            dataset_wide_epsilon=math.fsum(wide_e),
            per_site_epsilon=math.fsum(t.epsilon for t in slots[site]),
            grant_ids=tuple(g.grant_id for g in self.live),
            released_epsilon=math.fsum(t.released_epsilon for t in counted),
            ledger_keys=tuple(
                sorted({t.key for t in counted if t.key and (t.epsilon > 0 or t.delta > 0)})
            ),
        )


def person_worst_case(
    grants: Sequence[GrantView],
    dataset: str,
    now: datetime,
    ledger: Sequence[KeySpend] = (),
) -> WorstCase:
    """The most one person of ``dataset`` can ever be charged through the grants made on it,
    in every project: what the live ones can still release plus what every grant, live or
    not, has already released. ``ledger`` is the ledger's keys on the dataset
    (``key_spends``); grants on other datasets are ignored.

    The rule, per ledger budget key (project, dataset, site), since the ledger spends per key,
    not per grant:

    - a key is *open* while a grant of its project that is live at ``now`` feeds it (a
      non-federated grant feeds the dataset-wide key, a federated one every site's key). An
      open key counts everything ever granted on it, expired and revoked grants included:
      the ledger pools a key's grants, so their unspent remainder is spendable through the
      live one (at least what was spent and reserved on it, should rounding exceed that);
    - a *closed* key (every grant feeding it expired or revoked) counts what was spent
      (committed) plus what open reservations hold: loss already suffered, or that a running
      job may still commit. Its unspent remainder is dormant: it counts again the moment a
      new grant would open the key (``decide_dataset_cap`` charges the new grant for it);
    - a live grant whose GRANT event is not on its key yet (``KeySpend.grant_events``)
      counts its full figure on top (the grant row is written before its ledger budget).

    This never undercounts: a key never releases more than was granted on it, and a closed
    key can release more only through a new grant, which is checked again. It overcounts by
    up to the dormant remainders, which is the price of not attributing spend to grants.

    Every person is in every dataset-wide budget, so those add up. A federated grant gives
    each site a budget and a person is at one site, so the per-site part is the largest total
    at any one site (a live federated grant not in the ledger yet counts at every site). A
    person's worst case is the two parts added; ``delta`` likewise, its worst site taken on
    its own. Without ``ledger`` only live grants count, each in full.
    """
    return _Charges.of(grants, ledger, dataset, now).worst()


@dataclass(frozen=True)
class CapDecision:
    """May a new grant be created under its dataset's cap?

    ``before`` is one person's worst case over what is already there (``person_worst_case``),
    ``after`` with the new grant added. ``epsilon_left``/``delta_left`` are the room under the
    cap before the new grant; ``max_epsilon``/``max_delta`` the largest figure the new grant
    could get (0: no room at all; less than the room when the new grant would reopen a ledger
    key with a dormant remainder); all four ``None`` when there is no such cap. When
    ``allowed`` is false, ``reason`` is one line naming ``--epsilon`` (or ``--delta``), the
    room left and the fixes, which ``fixes`` also lists.
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


def _largest_fitting(total_at: Callable[[float], float], times: int, limit: float) -> float:
    """The largest x of ``_SHOWN_DIGITS`` significant digits for which ``total_at(x)`` (the
    worst case with the new grant at x, which counts ``times`` times) is ``within_cap`` of
    ``limit``; 0 when no x above 0 fits."""

    def fits(x: float) -> bool:
        return x > 0 and within_cap(total_at(x), limit)

    room = (limit - total_at(0.0)) / times
    if not room > 0:
        return 0.0
    x = _shown(room)
    for _ in range(3):  # rounding error is at most a step or so
        if fits(x):
            return x
        x = _nudged(x, -1)
    return 0.0


def decide_dataset_cap(
    cap: DatasetCap | None,
    existing: Sequence[GrantView],
    new: NewGrant,
    now: datetime,
    ledger: Sequence[KeySpend] = (),
) -> CapDecision:
    """May ``new`` be granted under the zone-wide cap on ``new.dataset``?

    One person's worst case (``person_worst_case``: live grants in full, expired and revoked
    ones by what the ledger shows they spent or reserved, per ledger key) over every grant on
    the dataset in every project, plus ``new``, must stay within ``cap.epsilon`` and, if set,
    ``cap.delta`` (``within_cap``: float rounding of decimal figures is forgiven). ``new``
    opens its ledger keys: a key it shares with earlier, now dead grants of its project (same
    project and dataset) brings their unspent remainder back, and that counts too. This is
    the defence against differencing one person across projects: two projects each granted
    epsilon 3 on the same dataset let a researcher in both spend 6 on one person; and loss
    spent under a grant stays loss after the grant expires or is revoked.
    No cap: allowed. A cap already below the existing charges refuses every new grant.
    A cap on another dataset than ``new.dataset`` is a caller's bug (``SpecError``).
    Pure: ``ledger`` is the ledger's keys on the dataset as values (``key_spends``).
    """
    if cap is not None and cap.dataset != new.dataset:
        raise SpecError(
            "cap",
            f"is for dataset {cap.dataset} but the grant is on {new.dataset}",
            "pass the cap of the dataset the grant is on",
        )

    def worst_with(g: NewGrant | None) -> WorstCase:
        return _Charges.of(existing, ledger, new.dataset, now, g).worst()

    before, after = worst_with(None), worst_with(new)
    where = f"dataset {new.dataset}"
    if cap is None:
        return CapDecision(True, new.dataset, f"{where} has no cap", None, before, after)

    wide, per_site = _terms(new.mechanisms, 1.0)
    times = len(wide) + len(per_site)  # how many budgets the new grant would create
    eps_left = max(cap.epsilon - before.epsilon, 0.0)
    max_eps = (
        _largest_fitting(lambda x: worst_with(replace(new, epsilon=x)).epsilon, times, cap.epsilon)
        if times
        else None
    )
    over_e = not within_cap(after.epsilon, cap.epsilon)
    cap_delta = cap.delta
    delta_left = max_delta = None
    over_d = False
    if cap_delta is not None:
        delta_left = max(cap_delta - before.delta, 0.0)
        max_delta = (
            _largest_fitting(lambda x: worst_with(replace(new, delta=x)).delta, times, cap_delta)
            if times
            else None
        )
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
    reopened = worst_with(replace(new, epsilon=0.0, delta=0.0)).epsilon
    back = (
        f"; a grant to project {new.project} reopens its ledger budget on {new.dataset}, which"
        f" brings back epsilon {reopened - before.epsilon:g} its expired or revoked grants"
        " left unspent"
        if not within_cap(reopened, before.epsilon)
        else ""
    )
    parts: list[str] = []
    fixes: list[str] = []
    if over_e:
        parts.append(
            f"--epsilon {float(new.epsilon):g} would let one person of {where} be charged"
            f" epsilon {after.epsilon:g} across all projects, over the dataset's cap of"
            f" {cap.epsilon:g} ({eps_left:g} left under the cap){twice}{back}"
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
