"""The privacy ledger's vocabulary and arithmetic: budget keys, events, reservations, and
folding events into balances. Pure: nothing here touches a database. ``privacy.ledger.Ledger``
appends the events to ``ledger_events`` (``privacy.ledger_schema``) and folds them with the
functions below.

Budgets
    A budget is keyed by :class:`BudgetKey` ``(project, dataset, site)``. ``site == ""``
    is the whole dataset; a non-empty site is that site's own ledger (federated training
    charges per site: sites hold disjoint people, so their budgets compose in parallel and
    the ledger keeps them apart; it does not also charge the whole-dataset key). Epsilon and
    delta are per person-level unit (``docs/privacy-model.md``): a row-level figure is never
    charged here.

Events (:class:`EventKind`), each one row of ``ledger_events``, never updated or deleted:
    GRANT    a steward grants (epsilon, delta) on a key; several grants add up (top-ups).
             The caller's ``grant_id`` is the event id, so a repeated grant is a no-op.
    RESERVE  a job reserves (epsilon, delta) before it runs; opens a reservation.
    COMMIT   the job's actual spend as its accountant reports it (<= the reservation);
             closes the reservation, and the unspent remainder returns to the budget.
    RELEASE  the job failed before touching any data; closes the reservation, charges nothing.

Reservations (:class:`ReservationState`; the allowed moves are the data
:data:`ALLOWED_TRANSITIONS`, checked only in :func:`check_transition`)::

    OPEN --commit--> COMMITTED
    OPEN --release-> RELEASED

Every figure (granted, reserved, spent, remaining) is computed from the events by
:func:`fold_balance`; no total is ever stored.

Composition
    Across jobs the ledger composes by the basic (sequential, summing) composition theorem:
    a key's spend is the sum of its jobs' epsilons and the sum of their deltas. Each job's
    own (epsilon, delta) already comes from an accountant (RDP or PLD, add/remove one
    person) that composes the steps *inside* the job tightly; summing across jobs is a valid,
    if loose, upper bound on the total privacy loss of the people in the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from foundation.errors import IntegrityError, SpecError

#: the longest project/dataset/site/actor/job name, and the longest grant id (column widths)
MAX_NAME = 256
MAX_ID = 128


# --------------------------------------------------------------------------- vocabulary


class EventKind(StrEnum):
    """What one ledger row records."""

    #: a steward adds (epsilon, delta) to a key's budget
    GRANT = "grant"
    #: a job holds (epsilon, delta) before it runs; opens a reservation
    RESERVE = "reserve"
    #: the job's accountant-reported spend (<= reserved); closes the reservation
    COMMIT = "commit"
    #: the job failed before touching data; closes the reservation, charges nothing
    RELEASE = "release"


class ReservationState(StrEnum):
    """Where a reservation is; computed from its events, never stored."""

    #: reserved; counts against the budget until committed or released
    OPEN = "open"
    #: the job's spend is charged; the unspent remainder is back in the budget
    COMMITTED = "committed"
    #: nothing charged; the whole reservation is back in the budget
    RELEASED = "released"


#: the only moves a reservation can make; everything else raises IntegrityError
ALLOWED_TRANSITIONS: frozenset[tuple[ReservationState, ReservationState]] = frozenset(
    {
        (ReservationState.OPEN, ReservationState.COMMITTED),
        (ReservationState.OPEN, ReservationState.RELEASED),
    }
)

#: the state each closing event moves a reservation to
CLOSES_TO: dict[EventKind, ReservationState] = {
    EventKind.COMMIT: ReservationState.COMMITTED,
    EventKind.RELEASE: ReservationState.RELEASED,
}


def check_transition(
    current: ReservationState, target: ReservationState, *, reservation_id: str = ""
) -> None:
    """Raise :class:`IntegrityError` unless ``current -> target`` is in ALLOWED_TRANSITIONS.

    The one place a reservation's state change is checked.
    """
    if (current, target) not in ALLOWED_TRANSITIONS:
        what = f"reservation {reservation_id}" if reservation_id else "a reservation"
        raise IntegrityError(
            f"{what} is already {current.value} and cannot become {target.value}: "
            "a reservation is closed exactly once, by one commit or one release; "
            "investigate the job before touching the ledger (never retry)"
        )


@dataclass(frozen=True, order=True)
class BudgetKey:
    """One budget: a dataset in a project, or one site of it (``site=""`` = whole dataset)."""

    project: str
    dataset: str
    site: str = ""

    def __post_init__(self) -> None:
        for name in ("project", "dataset", "site"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise SpecError(f"budget.{name}", "must be a string", "pass the name as text")
            if value != value.strip() or any(not ch.isprintable() for ch in value):
                raise SpecError(
                    f"budget.{name}",
                    "has surrounding whitespace or control characters",
                    "use the name exactly as registered",
                )
            if len(value) > MAX_NAME:
                raise SpecError(
                    f"budget.{name}", f"is longer than {MAX_NAME} characters", "use a shorter name"
                )
        if not self.project:
            raise SpecError("budget.project", "is empty", "name the project")
        if not self.dataset:
            raise SpecError("budget.dataset", "is empty", "name the dataset")

    def __str__(self) -> str:
        base = f"{self.project}/{self.dataset}"
        return f"{base}@{self.site}" if self.site else base


@dataclass(frozen=True)
class LedgerEvent:
    """One row of ``ledger_events``, exactly as stored.

    ``epsilon``/``delta`` mean: GRANT the amount granted, RESERVE the amount reserved,
    COMMIT the amount spent, RELEASE zero (nothing is charged).
    """

    seq: int
    event_id: str
    kind: EventKind
    key: BudgetKey
    epsilon: float
    delta: float
    reservation_id: str | None
    job_id: str | None
    actor: str
    at: datetime
    note: str = ""


@dataclass(frozen=True)
class Balance:
    """A key's budget, folded from its events. ``remaining = granted - spent - reserved``."""

    key: BudgetKey
    granted_epsilon: float
    granted_delta: float
    reserved_epsilon: float
    reserved_delta: float
    spent_epsilon: float
    spent_delta: float
    remaining_epsilon: float
    remaining_delta: float


@dataclass(frozen=True)
class Reservation:
    """One job's reservation, folded from its RESERVE event and its closing event, if any."""

    reservation_id: str
    key: BudgetKey
    state: ReservationState
    epsilon: float
    delta: float
    job_id: str
    reserved_at: datetime
    spent_epsilon: float = 0.0
    spent_delta: float = 0.0
    closed_at: datetime | None = field(default=None)


# --------------------------------------------------------------------------- folding


def fold_balance(key: BudgetKey, events: Iterable[LedgerEvent]) -> Balance:
    """Compute ``key``'s balance from its events (events of other keys are ignored)."""
    grants_e: list[float] = []
    grants_d: list[float] = []
    spent_e: list[float] = []
    spent_d: list[float] = []
    reserved: dict[str, LedgerEvent] = {}
    closed: set[str] = set()
    for ev in events:
        if ev.key != key:
            continue
        if ev.kind is EventKind.GRANT:
            grants_e.append(ev.epsilon)
            grants_d.append(ev.delta)
        elif ev.kind is EventKind.RESERVE and ev.reservation_id is not None:
            reserved[ev.reservation_id] = ev
        elif ev.kind is EventKind.COMMIT and ev.reservation_id is not None:
            spent_e.append(ev.epsilon)
            spent_d.append(ev.delta)
            closed.add(ev.reservation_id)
        elif ev.kind is EventKind.RELEASE and ev.reservation_id is not None:
            closed.add(ev.reservation_id)
    open_e = [ev.epsilon for rid, ev in reserved.items() if rid not in closed]
    open_d = [ev.delta for rid, ev in reserved.items() if rid not in closed]
    return Balance(
        key=key,
        granted_epsilon=math.fsum(grants_e),
        granted_delta=math.fsum(grants_d),
        reserved_epsilon=math.fsum(open_e),
        reserved_delta=math.fsum(open_d),
        spent_epsilon=math.fsum(spent_e),
        spent_delta=math.fsum(spent_d),
        remaining_epsilon=math.fsum([*grants_e, *(-x for x in spent_e), *(-x for x in open_e)]),
        remaining_delta=math.fsum([*grants_d, *(-x for x in spent_d), *(-x for x in open_d)]),
    )


def fold_reservations(events: Iterable[LedgerEvent]) -> dict[str, Reservation]:
    """Compute every reservation's state from the events, in ``seq`` order.

    Raises :class:`IntegrityError` if a closing event has no RESERVE before it or makes a
    move outside ALLOWED_TRANSITIONS (which the schema's constraints should make impossible).
    """
    out: dict[str, Reservation] = {}
    for ev in sorted(events, key=lambda e: e.seq):
        rid = ev.reservation_id
        if ev.kind is EventKind.GRANT or rid is None:
            continue
        if ev.kind is EventKind.RESERVE:
            out[rid] = Reservation(
                reservation_id=rid,
                key=ev.key,
                state=ReservationState.OPEN,
                epsilon=ev.epsilon,
                delta=ev.delta,
                job_id=ev.job_id or "",
                reserved_at=ev.at,
            )
            continue
        current = out.get(rid)
        if current is None:
            raise IntegrityError(
                f"ledger event {ev.event_id} closes reservation {rid}, which was never "
                "reserved: the ledger is inconsistent; stop and investigate (never retry)"
            )
        target = CLOSES_TO[ev.kind]
        check_transition(current.state, target, reservation_id=rid)
        out[rid] = Reservation(
            reservation_id=rid,
            key=current.key,
            state=target,
            epsilon=current.epsilon,
            delta=current.delta,
            job_id=current.job_id,
            reserved_at=current.reserved_at,
            spent_epsilon=ev.epsilon if ev.kind is EventKind.COMMIT else 0.0,
            spent_delta=ev.delta if ev.kind is EventKind.COMMIT else 0.0,
            closed_at=ev.at,
        )
    return out
