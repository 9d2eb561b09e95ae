"""One way to open the zone's state database, shared by the ledger and the policy store.

SQLite is the embedded default; PostgreSQL follows by URL. The ledger and the audit log need
writers to serialise (a reservation reads the balance, then appends): on SQLite that means
``BEGIN IMMEDIATE`` (a write lock taken at the start of the transaction, across threads and
processes), which pysqlite will not emit by itself, so we take over its transaction handling.
On PostgreSQL callers lock explicitly (``lock_key``) inside their transaction.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import Connection, Engine, create_engine, event, text

#: seconds a writer waits for SQLite's lock; 64 racing submitters must all get through
SQLITE_BUSY_TIMEOUT_S = 60


def make_engine(url: str) -> Engine:
    """Open the state database at ``url`` (``sqlite:///path`` or ``postgresql+...://``)."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):
            # autocommit at the driver level: we emit BEGIN ourselves (below)
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):
            # take the write lock up front so read-then-append is atomic
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def lock_key(conn: Connection, key: str) -> None:
    """Serialise writers on ``key`` for the rest of the transaction.

    SQLite already holds the database write lock (BEGIN IMMEDIATE); PostgreSQL takes a
    transaction-scoped advisory lock on a stable 63-bit hash of the key.
    """
    if conn.dialect.name == "postgresql":
        digest = hashlib.sha256(key.encode()).digest()
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:k)"),
            {"k": int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF},
        )
