"""The zone's one privacy ledger: an append-only log of immutable budget events.

``Ledger`` is the whole contract between the zone and the privacy budget. Nothing else
writes to ``ledger_events`` (``privacy.ledger_schema``); nothing anywhere stores a running
total. What a budget key, an event and a reservation are, the allowed reservation moves, and
how events fold into balances (the basic composition across jobs) are in
``privacy.budget_events``; the argument checks and refusal messages in
``privacy.ledger_checks``.

Atomicity
    ``reserve`` reads the balance and appends inside ONE transaction that holds the key's
    write lock (SQLite: ``BEGIN IMMEDIATE`` emitted by :func:`foundation.sql.make_engine`'s
    engine; PostgreSQL: :func:`foundation.sql.lock_key`), so racing jobs on any number of
    threads or processes can never together reserve more than was granted. ``commit`` and
    ``release`` take the same lock, and a unique constraint allows at most one closing event
    per reservation, so a reservation is never charged twice.

Floating point
    Sums use :func:`math.fsum`. A request fits when it exceeds the remainder by at most
    ``REL_TOLERANCE`` (``privacy.ledger_checks``) of the scale of the figures (the grant for
    ``reserve``, the reservation for ``commit``; at least 1.0 for epsilon), so that e.g.
    0.1 + 0.2 fits a grant of 0.3. A key therefore never goes over its grant by more than
    1e-12 of it per commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from foundation.clock import utcnow
from foundation.errors import (
    IntegrityError,
    NotFoundError,
    SpecError,
)
from foundation.sql import lock_key
from privacy.budget_events import (
    CLOSES_TO,
    MAX_ID,
    Balance,
    BudgetKey,
    EventKind,
    LedgerEvent,
    Reservation,
    ReservationState,
    check_transition,
    fold_balance,
    fold_reservations,
)
from privacy.ledger_checks import (
    check_amount,
    check_fits,
    check_name,
    check_spent,
    fits,
    unknown_reservation,
)
from privacy.ledger_schema import PHASE, event_from_row, ledger_events, metadata

__all__ = ["Ledger"]


class Ledger:
    """The privacy ledger on a SQLAlchemy engine (from :func:`foundation.sql.make_engine`).

    Every method is one transaction. Writers serialise per key (see the module docstring),
    so the same ledger may be used from many threads, and many processes may open their
    own ``Ledger`` on the same database.
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
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
        eps = check_amount(epsilon, "grant.epsilon", positive=False, below_one=False)
        dlt = check_amount(delta, "grant.delta", positive=False, below_one=True)
        if eps == 0 and dlt == 0:
            raise SpecError("grant.epsilon", "and grant.delta are both 0", "grant something")
        check_name(actor, "grant.actor", "name the steward making the grant")
        check_name(
            grant_id, "grant.grant_id", "give the grant a unique id (a ticket)", limit=MAX_ID
        )
        with self._engine.begin() as conn:
            lock_key(conn, f"ledger-grant:{grant_id}")
            lock_key(conn, str(key))
            row = conn.execute(
                sa.select(ledger_events).where(ledger_events.c.event_id == grant_id)
            ).first()
            if row is not None:
                existing = event_from_row(row._mapping)
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
        eps = check_amount(epsilon, "privacy.epsilon", positive=True, below_one=False)
        dlt = check_amount(delta, "privacy.delta", positive=False, below_one=True)
        check_name(job_id, "job_id", "pass the id of the job that will spend the budget")
        check_name(actor, "actor", "name the user or service submitting the job")
        with self._engine.begin() as conn:
            lock_key(conn, str(key))
            check_fits(key, fold_balance(key, self._select_events(conn, key)), eps, dlt)
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
        eps = check_spent(epsilon_spent, "epsilon_spent", reservation_id)
        dlt = check_spent(delta_spent, "delta_spent", reservation_id)
        check_name(actor, "actor", "name the service committing the spend")
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
            if not fits(eps, res.epsilon, max(res.epsilon, 1.0)):
                raise IntegrityError(
                    f"epsilon_spent {eps:g} exceeds the {res.epsilon:g} reserved by "
                    f"reservation {reservation_id} (job {res.job_id}): nothing was written; "
                    "a job must reserve at least what its accountant will spend"
                )
            if not fits(dlt, res.delta, res.delta):
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
        check_name(actor, "actor", "name the service releasing the reservation")
        check_name(reason, "reason", "say why the job did not run")
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
        events = self.project_events(project)
        keys = sorted({ev.key for ev in events})
        return [fold_balance(key, events) for key in keys]

    def project_events(self, project: str) -> list[LedgerEvent]:
        """Every event of ``project``'s keys, in ``seq`` order (one read)."""
        with self._reading() as conn:
            return self._select(conn, ledger_events.c.project == project)

    def reservation(self, reservation_id: str) -> Reservation:
        """One reservation's current state; :class:`NotFoundError` if unknown."""
        with self._reading() as conn:
            events = self._select(conn, ledger_events.c.reservation_id == reservation_id)
        found = fold_reservations(events).get(reservation_id)
        if found is None:
            raise NotFoundError(unknown_reservation(reservation_id))
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
        return [event_from_row(row._mapping) for row in rows]

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
            raise NotFoundError(unknown_reservation(reservation_id))
        lock_key(conn, str(event_from_row(opening._mapping).key))
        # read again under the lock: a racing commit/release may have closed it meanwhile
        events = self._select(conn, ledger_events.c.reservation_id == reservation_id)
        res = fold_reservations(events)[reservation_id]
        closing = next((ev for ev in events if ev.kind in CLOSES_TO), None)
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
            "phase": PHASE[kind],
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
        return event_from_row({**values, "seq": seq})
