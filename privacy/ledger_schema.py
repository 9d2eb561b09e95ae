"""The ledger's one table, ``ledger_events``: append-only, enforced by the database itself.

Rows are inserted, never updated or deleted: triggers (SQLite and PostgreSQL) refuse both, so a
bypass of ``privacy.ledger.Ledger`` fails too. A unique constraint on (reservation, phase)
allows at most one RESERVE and one closing event per reservation. ``event_from_row`` reads a
row back as a ``privacy.budget_events.LedgerEvent``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from privacy.budget_events import MAX_ID, MAX_NAME, BudgetKey, EventKind, LedgerEvent

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

PHASE: dict[EventKind, str | None] = {
    EventKind.GRANT: None,
    EventKind.RESERVE: "open",
    EventKind.COMMIT: "close",
    EventKind.RELEASE: "close",
}

# Refuse UPDATE and DELETE in the database itself, so that a bypass of ``privacy.ledger``
# fails too.
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


def event_from_row(row: Any) -> LedgerEvent:
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
