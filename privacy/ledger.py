"""The zone's one privacy ledger: an append-only log of immutable budget events.

This module is the whole contract between the zone and the privacy budget. Nothing else
writes to ``ledger_events``; nothing anywhere stores a running total.

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

Atomicity
    ``reserve`` reads the balance and appends inside ONE transaction that holds the key's
    write lock (SQLite: ``BEGIN IMMEDIATE`` emitted by :func:`privacy.sql.make_engine`'s
    engine; PostgreSQL: :func:`privacy.sql.lock_key`), so racing jobs on any number of
    threads or processes can never together reserve more than was granted. ``commit`` and
    ``release`` take the same lock, and a unique constraint allows at most one closing event
    per reservation, so a reservation is never charged twice.

Floating point
    Sums use :func:`math.fsum`. A request fits when it exceeds the remainder by at most
    ``REL_TOLERANCE`` of the scale of the figures (the grant for ``reserve``, the reservation
    for ``commit``; at least 1.0 for epsilon), so that e.g. 0.1 + 0.2 fits a grant of 0.3.
    A key therefore never goes over its grant by more than 1e-12 of it per commit.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from connectors.errors import (
    BudgetExceeded,
    IntegrityError,
    NotFoundError,
    SpecError,
)
from privacy.sql import lock_key

__all__ = [
    "ALLOWED_TRANSITIONS",
    "MAX_ID",
    "MAX_NAME",
    "REL_TOLERANCE",
    "Balance",
    "BudgetKey",
    "EventKind",
    "Ledger",
    "LedgerEvent",
    "Reservation",
    "ReservationState",
    "check_transition",
    "fold_balance",
    "fold_reservations",
    "ledger_events",
    "metadata",
]

#: relative slack for float rounding when comparing a request with what is left (see above)
REL_TOLERANCE = 1e-12

#: the longest project/dataset/site/actor/job name, and the longest grant id (column widths)
MAX_NAME = 256
MAX_ID = 128

#: the fix every refused reservation prints
_BUDGET_FIX = "ask the steward for more budget or lower privacy.epsilon"
_DELTA_FIX = "ask the steward for more budget or lower privacy.delta"


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
_CLOSES_TO: dict[EventKind, ReservationState] = {
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
        target = _CLOSES_TO[ev.kind]
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


# --------------------------------------------------------------------------- schema

metadata = sa.MetaData()

#: append-only: rows are inserted, never updated or deleted (triggers refuse both)
ledger_events = sa.Table(
    "ledger_events",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("event_id", sa.String(MAX_ID), nullable=False, unique=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("project", sa.String(MAX_NAME), nullable=False),
    sa.Column("dataset", sa.String(MAX_NAME), nullable=False),
    sa.Column("site", sa.String(MAX_NAME), nullable=False),
    sa.Column("epsilon", sa.Double(), nullable=False),
    sa.Column("delta", sa.Double(), nullable=False),
    sa.Column("reservation_id", sa.String(64), nullable=True),
    # "open" on RESERVE, "close" on COMMIT/RELEASE, NULL on GRANT: with the constraint
    # below, a reservation has at most one RESERVE and at most one closing event
    sa.Column("phase", sa.String(8), nullable=True),
    sa.Column("job_id", sa.String(MAX_NAME), nullable=True),
    sa.Column("actor", sa.String(MAX_NAME), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
    sa.UniqueConstraint("reservation_id", "phase", name="uq_ledger_events_one_open_one_close"),
    sa.CheckConstraint(
        "kind IN ('grant', 'reserve', 'commit', 'release')", name="ck_ledger_events_kind"
    ),
    sa.CheckConstraint("epsilon >= 0 AND delta >= 0", name="ck_ledger_events_nonnegative"),
    sa.Index("ix_ledger_events_key", "project", "dataset", "site"),
    sqlite_autoincrement=True,
)

_PHASE: dict[EventKind, str | None] = {
    EventKind.GRANT: None,
    EventKind.RESERVE: "open",
    EventKind.COMMIT: "close",
    EventKind.RELEASE: "close",
}

# Refuse UPDATE and DELETE in the database itself, so that a bypass of this module fails too.
for _statement, _dialect in (
    (
        "CREATE TRIGGER IF NOT EXISTS ledger_events_no_update BEFORE UPDATE ON ledger_events "
        "BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END",
        "sqlite",
    ),
    (
        "CREATE TRIGGER IF NOT EXISTS ledger_events_no_delete BEFORE DELETE ON ledger_events "
        "BEGIN SELECT RAISE(ABORT, 'ledger_events is append-only'); END",
        "sqlite",
    ),
    (
        "CREATE OR REPLACE FUNCTION ledger_events_append_only() RETURNS trigger AS $fn$ "
        "BEGIN RAISE EXCEPTION 'ledger_events is append-only'; END; $fn$ LANGUAGE plpgsql",
        "postgresql",
    ),
    (
        "CREATE TRIGGER ledger_events_append_only BEFORE UPDATE OR DELETE ON ledger_events "
        "FOR EACH ROW EXECUTE FUNCTION ledger_events_append_only()",
        "postgresql",
    ),
):
    sa.event.listen(ledger_events, "after_create", sa.DDL(_statement).execute_if(dialect=_dialect))


# --------------------------------------------------------------------------- validation


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _amount(value: object, field_name: str, *, positive: bool, below_one: bool) -> float:
    """Validate one epsilon/delta figure given by a caller; SpecError names the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field_name, "must be a number", "give a finite decimal number")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise SpecError(field_name, "must be finite", "give a finite decimal number")
    if positive and number <= 0:
        raise SpecError(field_name, "must be greater than 0", "give a positive number")
    if number < 0:
        raise SpecError(field_name, "must not be negative", "give 0 or a positive number")
    if below_one and number >= 1:
        raise SpecError(field_name, "must be below 1", "give a delta well below 1/n")
    return number


def _name(value: object, field_name: str, fix: str, *, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(field_name, "is empty", fix)
    if len(value) > limit:
        raise SpecError(field_name, f"is longer than {limit} characters", "use a shorter id")
    return value


def _spent(value: object, field_name: str, reservation_id: str) -> float:
    """Validate an accountant's figure for ``commit``: a bad one is a backend fault."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        number = math.nan
    else:
        number = float(value)
    if math.isnan(number) or math.isinf(number) or number < 0:
        raise IntegrityError(
            f"{field_name} for reservation {reservation_id} is not a finite non-negative "
            "number: the accountant's figure is broken; nothing was written, the reservation "
            "stays open (fix the accountant and commit again, or release if no data was read)"
        )
    return number


def _fits(amount: float, remaining: float, scale: float) -> bool:
    return amount <= remaining + REL_TOLERANCE * scale


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """The privacy ledger on a SQLAlchemy engine (from :func:`privacy.sql.make_engine`).

    Every method is one transaction. Writers serialise per key (see the module docstring),
    so the same ledger may be used from many threads, and many processes may open their
    own ``Ledger`` on the same database.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = engine
        self._clock = clock

    # -- schema

    def create_schema(self) -> None:
        """Create ``ledger_events`` (and its append-only triggers) if absent. Idempotent."""
        with self._engine.begin() as conn:
            lock_key(conn, "ledger-schema")
            metadata.create_all(conn, checkfirst=True)

    # -- writes

    def grant(
        self,
        key: BudgetKey,
        epsilon: float,
        delta: float,
        *,
        actor: str,
        grant_id: str,
        note: str = "",
    ) -> LedgerEvent:
        """Append a GRANT of (epsilon, delta) to ``key``; grants on a key add up.

        Idempotent on ``grant_id`` (it becomes the event id): the same grant again returns
        the existing event and writes nothing; a different grant under the same id raises
        :class:`IntegrityError`.
        """
        eps = _amount(epsilon, "grant.epsilon", positive=False, below_one=False)
        dlt = _amount(delta, "grant.delta", positive=False, below_one=True)
        if eps == 0 and dlt == 0:
            raise SpecError("grant.epsilon", "and grant.delta are both 0", "grant something")
        _name(actor, "grant.actor", "name the steward making the grant")
        _name(grant_id, "grant.grant_id", "give the grant a unique id (a ticket)", limit=MAX_ID)
        with self._engine.begin() as conn:
            lock_key(conn, f"ledger-grant:{grant_id}")
            lock_key(conn, str(key))
            row = conn.execute(
                sa.select(ledger_events).where(ledger_events.c.event_id == grant_id)
            ).first()
            if row is not None:
                existing = _event_from_row(row._mapping)
                same = (
                    existing.kind is EventKind.GRANT
                    and existing.key == key
                    and existing.epsilon == eps
                    and existing.delta == dlt
                )
                if not same:
                    raise IntegrityError(
                        f"grant.grant_id {grant_id!r} already records a different event "
                        f"({existing.kind.value} on {existing.key}): give this grant a new id"
                    )
                return existing
            return self._append(
                conn,
                kind=EventKind.GRANT,
                key=key,
                epsilon=eps,
                delta=dlt,
                actor=actor,
                event_id=grant_id,
                note=note,
            )

    def reserve(
        self, key: BudgetKey, epsilon: float, delta: float, *, job_id: str, actor: str
    ) -> str:
        """Reserve (epsilon, delta) on ``key`` for ``job_id``; return the reservation id.

        Atomic: under the key's lock, reads granted, spent and open-reserved and appends the
        RESERVE only if ``spent + reserved + epsilon <= granted`` and likewise for delta.
        Otherwise raises :class:`BudgetExceeded` and writes nothing. The reservation starts
        OPEN. Not idempotent: each call is a new reservation.
        """
        eps = _amount(epsilon, "privacy.epsilon", positive=True, below_one=False)
        dlt = _amount(delta, "privacy.delta", positive=False, below_one=True)
        _name(job_id, "job_id", "pass the id of the job that will spend the budget")
        _name(actor, "actor", "name the user or service submitting the job")
        with self._engine.begin() as conn:
            lock_key(conn, str(key))
            bal = fold_balance(key, self._select_events(conn, key))
            if not _fits(eps, bal.remaining_epsilon, max(bal.granted_epsilon, 1.0)):
                raise BudgetExceeded(
                    _refusal(key, "epsilon", eps, bal.remaining_epsilon, bal, _BUDGET_FIX)
                )
            if not _fits(dlt, bal.remaining_delta, bal.granted_delta):
                raise BudgetExceeded(
                    _refusal(key, "delta", dlt, bal.remaining_delta, bal, _DELTA_FIX)
                )
            reservation_id = str(uuid.uuid4())
            self._append(
                conn,
                kind=EventKind.RESERVE,
                key=key,
                epsilon=eps,
                delta=dlt,
                actor=actor,
                reservation_id=reservation_id,
                job_id=job_id,
            )
            return reservation_id

    def commit(
        self,
        reservation_id: str,
        epsilon_spent: float,
        delta_spent: float,
        *,
        actor: str,
        note: str = "",
    ) -> LedgerEvent:
        """Charge the job's spend, as its accountant reports it; OPEN -> COMMITTED.

        The spend must not exceed the reservation (beyond float rounding), else
        :class:`IntegrityError` and nothing is written; the unspent remainder returns to the
        budget. Idempotent: committing a COMMITTED reservation with the same figures returns
        the existing event (no new row, no second charge); different figures, or a RELEASED
        reservation, raise :class:`IntegrityError`. ``note`` should name the accountant,
        the neighbouring relation and the unit.
        """
        eps = _spent(epsilon_spent, "epsilon_spent", reservation_id)
        dlt = _spent(delta_spent, "delta_spent", reservation_id)
        _name(actor, "actor", "name the service committing the spend")
        with self._engine.begin() as conn:
            res, closing = self._lock_reservation(conn, reservation_id)
            if closing is not None and closing.kind is EventKind.COMMIT:
                if closing.epsilon != eps or closing.delta != dlt:
                    raise IntegrityError(
                        f"reservation {reservation_id} is already committed with epsilon "
                        f"{closing.epsilon:g}, delta {closing.delta:g}; a second commit with "
                        f"epsilon {eps:g}, delta {dlt:g} would disagree with it: "
                        "investigate the job's accountant (never retry with new figures)"
                    )
                return closing
            check_transition(res.state, ReservationState.COMMITTED, reservation_id=reservation_id)
            if not _fits(eps, res.epsilon, max(res.epsilon, 1.0)):
                raise IntegrityError(
                    f"epsilon_spent {eps:g} exceeds the {res.epsilon:g} reserved by "
                    f"reservation {reservation_id} (job {res.job_id}): nothing was written; "
                    "a job must reserve at least what its accountant will spend"
                )
            if not _fits(dlt, res.delta, res.delta):
                raise IntegrityError(
                    f"delta_spent {dlt:g} exceeds the {res.delta:g} reserved by "
                    f"reservation {reservation_id} (job {res.job_id}): nothing was written; "
                    "a job must reserve at least what its accountant will spend"
                )
            return self._append(
                conn,
                kind=EventKind.COMMIT,
                key=res.key,
                epsilon=eps,
                delta=dlt,
                actor=actor,
                reservation_id=reservation_id,
                job_id=res.job_id,
                note=note,
            )

    def release(self, reservation_id: str, *, actor: str, reason: str) -> LedgerEvent:
        """Free a reservation whose job failed before touching data; OPEN -> RELEASED.

        Idempotent: releasing a RELEASED reservation returns the existing event. Releasing a
        COMMITTED reservation raises :class:`IntegrityError` (its data was used).
        """
        _name(actor, "actor", "name the service releasing the reservation")
        _name(reason, "reason", "say why the job did not run")
        with self._engine.begin() as conn:
            res, closing = self._lock_reservation(conn, reservation_id)
            if closing is not None and closing.kind is EventKind.RELEASE:
                return closing
            check_transition(res.state, ReservationState.RELEASED, reservation_id=reservation_id)
            return self._append(
                conn,
                kind=EventKind.RELEASE,
                key=res.key,
                epsilon=0.0,
                delta=0.0,
                actor=actor,
                reservation_id=reservation_id,
                job_id=res.job_id,
                note=reason,
            )

    # -- reads

    def balance(self, key: BudgetKey) -> Balance:
        """``key``'s balance, folded from its events (all zero for an unknown key)."""
        with self._reading() as conn:
            return fold_balance(key, self._select_events(conn, key))

    def balances(self, project: str) -> list[Balance]:
        """The balance of every key of ``project`` that has events, sorted by key."""
        with self._reading() as conn:
            events = self._select(conn, ledger_events.c.project == project)
        keys = sorted({ev.key for ev in events})
        return [fold_balance(key, events) for key in keys]

    def reservation(self, reservation_id: str) -> Reservation:
        """One reservation's current state; :class:`NotFoundError` if unknown."""
        with self._reading() as conn:
            events = self._select(conn, ledger_events.c.reservation_id == reservation_id)
        found = fold_reservations(events).get(reservation_id)
        if found is None:
            raise NotFoundError(_unknown_reservation(reservation_id))
        return found

    def open_reservations(self, key: BudgetKey | None = None) -> list[Reservation]:
        """Every OPEN reservation (of ``key``, if given), oldest first."""
        with self._reading() as conn:
            if key is None:
                events = self._select(conn, ledger_events.c.reservation_id.is_not(None))
            else:
                events = self._select_events(conn, key)
        return [r for r in fold_reservations(events).values() if r.state is ReservationState.OPEN]

    def events(self, key: BudgetKey | None = None) -> list[LedgerEvent]:
        """Every event (of ``key``, if given) in ``seq`` order."""
        with self._reading() as conn:
            if key is None:
                return self._select(conn, sa.true())
            return self._select_events(conn, key)

    # -- internals

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    def _select(self, conn: Connection, where: Any) -> list[LedgerEvent]:
        rows = conn.execute(
            sa.select(ledger_events).where(where).order_by(ledger_events.c.seq)
        ).all()
        return [_event_from_row(row._mapping) for row in rows]

    def _select_events(self, conn: Connection, key: BudgetKey) -> list[LedgerEvent]:
        return self._select(
            conn,
            sa.and_(
                ledger_events.c.project == key.project,
                ledger_events.c.dataset == key.dataset,
                ledger_events.c.site == key.site,
            ),
        )

    def _lock_reservation(
        self, conn: Connection, reservation_id: str
    ) -> tuple[Reservation, LedgerEvent | None]:
        """Take the reservation's key lock; return its state and closing event, if any."""
        if not isinstance(reservation_id, str) or not reservation_id:
            raise SpecError("reservation_id", "is empty", "pass the id reserve() returned")
        opening = conn.execute(
            sa.select(ledger_events).where(
                ledger_events.c.reservation_id == reservation_id,
                ledger_events.c.kind == EventKind.RESERVE.value,
            )
        ).first()
        if opening is None:
            raise NotFoundError(_unknown_reservation(reservation_id))
        lock_key(conn, str(_event_from_row(opening._mapping).key))
        # read again under the lock: a racing commit/release may have closed it meanwhile
        events = self._select(conn, ledger_events.c.reservation_id == reservation_id)
        res = fold_reservations(events)[reservation_id]
        closing = next((ev for ev in events if ev.kind in _CLOSES_TO), None)
        return res, closing

    def _append(
        self,
        conn: Connection,
        *,
        kind: EventKind,
        key: BudgetKey,
        epsilon: float,
        delta: float,
        actor: str,
        reservation_id: str | None = None,
        job_id: str | None = None,
        event_id: str | None = None,
        note: str = "",
    ) -> LedgerEvent:
        at = self._clock()
        if at.tzinfo is None:
            raise SpecError("Ledger.clock", "returned a naive datetime", "return UTC-aware times")
        at = at.astimezone(UTC)
        values = {
            "event_id": event_id or str(uuid.uuid4()),
            "kind": kind.value,
            "project": key.project,
            "dataset": key.dataset,
            "site": key.site,
            "epsilon": epsilon,
            "delta": delta,
            "reservation_id": reservation_id,
            "phase": _PHASE[kind],
            "job_id": job_id,
            "actor": actor,
            "at": at,
            "note": note,
        }
        try:
            result = conn.execute(sa.insert(ledger_events).values(**values))
        except sa.exc.IntegrityError as exc:
            # the locks make this unreachable; the constraints are the second line of defence
            raise IntegrityError(
                f"the ledger refused a duplicate {kind.value} event (reservation "
                f"{reservation_id}, event {values['event_id']}): another writer recorded it "
                "first; read the reservation or events before acting (never retry blindly)"
            ) from exc
        (seq,) = result.inserted_primary_key or (None,)
        if seq is None:
            raise IntegrityError("the ledger did not return the new event's seq; never retry")
        return _event_from_row({**values, "seq": seq})


def _event_from_row(row: Any) -> LedgerEvent:
    at: datetime = row["at"]
    # SQLite stores no offset (we only ever write UTC); PostgreSQL answers in its session zone
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return LedgerEvent(
        seq=int(row["seq"]),
        event_id=row["event_id"],
        kind=EventKind(row["kind"]),
        key=BudgetKey(row["project"], row["dataset"], row["site"]),
        epsilon=float(row["epsilon"]),
        delta=float(row["delta"]),
        reservation_id=row["reservation_id"],
        job_id=row["job_id"],
        actor=row["actor"],
        at=at,
        note=row["note"],
    )


def _refusal(
    key: BudgetKey,
    what: str,
    requested: float,
    remaining: float,
    bal: Balance,
    fix: str,
) -> str:
    granted = bal.granted_epsilon if what == "epsilon" else bal.granted_delta
    spent = bal.spent_epsilon if what == "epsilon" else bal.spent_delta
    reserved = bal.reserved_epsilon if what == "epsilon" else bal.reserved_delta
    if granted == 0:
        return (
            f"budget {key}: requested {what} {requested:g} but no {what} has been granted "
            f"on this key (remaining {what} 0); {fix}"
        )
    return (
        f"budget {key}: requested {what} {requested:g} but only {max(remaining, 0.0):g} "
        f"remains (granted {granted:g}, spent {spent:g}, reserved by open jobs "
        f"{reserved:g}); {fix}"
    )


def _unknown_reservation(reservation_id: str) -> str:
    return (
        f"reservation_id {reservation_id!r} is not in the ledger: "
        "pass the id that reserve() returned for this job"
    )
