"""The store's zone-wide caps per dataset, and what the cap is checked against.

A dataset's cap is the latest row of ``dataset_caps`` for it (earlier ones are its history).
The charges a cap is checked against are every grant ever made on the dataset and the privacy
ledger's budgets on it, read in the caller's transaction (``dataset_charges``): the ledger lives
in the same database. ``cap_decision_in`` is the check ``StateStore.approve`` runs in the
transaction that writes the grant, under ``cap_lock``; the decision itself is the pure
``policies.caps.decide_dataset_cap``.
"""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import Connection, inspect, select

from foundation.errors import SpecError
from foundation.sql import lock_key
from policies.caps import CapDecision, DatasetCap, decide_dataset_cap
from policies.db import dataset_caps, grants
from policies.decisions import GrantView
from policies.store_base import StoreBase, check_aware
from policies.store_datasets import dataset_row
from policies.store_records import AccessRequestRecord, cap_from_row, grant_from_row
from policies.store_users import active_user
from policies.worst_case import KeySpend, NewGrant, WorstCase, key_spends, person_worst_case
from privacy.budget_events import BudgetKey, EventKind, LedgerEvent
from privacy.ledger_schema import ledger_events


def cap_lock(dataset: str) -> str:
    """The lock key serialising cap settings and approvals on ``dataset`` (PostgreSQL)."""
    return f"dataset-cap:{dataset}"


def current_cap(conn: Connection, dataset: str) -> DatasetCap | None:
    row = conn.execute(
        select(dataset_caps)
        .where(dataset_caps.c.dataset == dataset)
        .order_by(dataset_caps.c.seq.desc())
        .limit(1)
    ).first()
    return None if row is None else cap_from_row(row)


def dataset_ledger(conn: Connection, dataset: str) -> tuple[KeySpend, ...]:
    """The privacy ledger's budgets on ``dataset`` (every project and site), read in
    ``conn``: the ledger lives in this database (``Service`` opens both on one engine).
    A database without a ledger (a bare store) has spent nothing: no keys."""
    if not inspect(conn).has_table(ledger_events.name):
        return ()
    rows = conn.execute(
        select(ledger_events)
        .where(ledger_events.c.dataset == dataset)
        .order_by(ledger_events.c.seq)
    ).all()
    events = [
        LedgerEvent(
            seq=int(r.seq),
            event_id=r.event_id,
            kind=EventKind(r.kind),
            key=BudgetKey(r.project, r.dataset, r.site),
            epsilon=float(r.epsilon),
            delta=float(r.delta),
            reservation_id=r.reservation_id,
            job_id=r.job_id,
            actor=r.actor,
            at=r.at,
            note=r.note,
        )
        for r in rows
    ]
    return key_spends(events, dataset)


def dataset_charges(conn: Connection, dataset: str) -> tuple[list[GrantView], tuple[KeySpend, ...]]:
    """Every grant ever made on ``dataset`` and the ledger's budgets on it."""
    rows = conn.execute(select(grants).where(grants.c.dataset == dataset)).all()
    return [grant_from_row(r).view() for r in rows], dataset_ledger(conn, dataset)


def cap_decision_in(
    conn: Connection,
    req: AccessRequestRecord,
    epsilon: float,
    delta: float,
    now: datetime,
) -> CapDecision:
    views, ledger = dataset_charges(conn, req.dataset)
    return decide_dataset_cap(
        current_cap(conn, req.dataset),
        views,
        NewGrant(req.project, req.dataset, req.mechanisms, float(epsilon), float(delta)),
        now,
        ledger,
    )


class CapsMixin(StoreBase):
    """``StateStore``'s cap methods (the ``dataset_caps`` table; grants and ledger read only)."""

    def set_dataset_cap(
        self, dataset: str, epsilon: float, delta: float | None = None, *, by: str
    ) -> DatasetCap:
        """Set ``dataset``'s zone-wide cap: the most one person may be charged across every
        grant on it in every project (``worst_case``: live grants in full, expired and revoked
        ones by what the ledger shows they released). ``delta`` ``None`` caps epsilon only.
        The latest setting wins; earlier ones stay in ``dataset_cap_history``.

        A cap below the worst case already is accepted, not refused: the grants and their
        ledger budgets stay (taking them back is a revocation, a separate decision; spent
        loss cannot be taken back), and every new grant on the dataset is refused until the
        worst case is back under the cap. The caller reports the overshoot (``worst_case``).
        """
        if isinstance(epsilon, bool) or not (
            isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0
        ):
            raise SpecError("epsilon", "must be a finite number above 0", "e.g. --epsilon 5")
        if delta is not None and (
            isinstance(delta, bool)
            or not (isinstance(delta, int | float) and math.isfinite(delta) and 0 < delta < 1)
        ):
            raise SpecError(
                "delta", "must be above 0 and below 1", "e.g. --delta 1e-5, or leave it out"
            )
        with self.engine.begin() as conn:
            dataset_row(conn, dataset)
            active_user(conn, by, "by")
            lock_key(conn, cap_lock(dataset))
            cap = DatasetCap(
                dataset, float(epsilon), None if delta is None else float(delta), by, self._now()
            )
            conn.execute(
                dataset_caps.insert().values(
                    dataset=cap.dataset,
                    epsilon=cap.epsilon,
                    delta=cap.delta,
                    set_by=cap.set_by,
                    set_at=cap.set_at,
                )
            )
        return cap

    def dataset_cap(self, dataset: str) -> DatasetCap | None:
        """``dataset``'s current cap (the latest set), or ``None`` if none was ever set."""
        with self.engine.connect() as conn:
            dataset_row(conn, dataset)
            return current_cap(conn, dataset)

    def dataset_cap_history(self, dataset: str) -> list[DatasetCap]:
        """Every cap set on ``dataset``, oldest first (the last one is in force)."""
        with self.engine.connect() as conn:
            dataset_row(conn, dataset)
            rows = conn.execute(
                select(dataset_caps)
                .where(dataset_caps.c.dataset == dataset)
                .order_by(dataset_caps.c.seq)
            ).all()
        return [cap_from_row(r) for r in rows]

    def worst_case(self, dataset: str, now: datetime | None = None) -> WorstCase:
        """One person of ``dataset``'s worst case at ``now`` (default: the store's clock)
        across every grant on it and the ledger's budgets (``worst_case.person_worst_case``)."""
        checked = check_aware("now", now)
        when = self._now() if checked is None else checked
        with self.engine.connect() as conn:
            dataset_row(conn, dataset)
            views, ledger = dataset_charges(conn, dataset)
        return person_worst_case(views, dataset, when, ledger)
