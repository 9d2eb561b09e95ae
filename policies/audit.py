"""The append-only, keyed, hash-chained audit log, with its head kept outside the database.

Every event is one row of ``audit_events``, numbered ``seq`` = 1, 2, 3, ... with no gaps.
Each row stores the MAC of the row before it (``prev_hash``; the first row points at
``GENESIS_HASH``) and its own MAC (``hash``)::

    hash = HMAC-SHA256(audit key, canonical_json({seq, at, actor, action, outcome, target,
                                                  details, prev_hash}))

where canonical JSON is ``json.dumps(..., sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` encoded as UTF-8 and ``at`` is the UTC ISO-8601 time to
the microsecond (``2026-01-31T12:00:00.000000+00:00``). ``event_mac`` is that rule.

**The audit key** is 32 random bytes in the zone folder (``ZONE/audit.key``, mode 0600, made
at ``sandbox init``; ``sandbox.zone.Zone.audit_key``), never in the database. Someone who can
write the database but not read the zone folder (a PostgreSQL account or its administrator,
someone who swaps in an edited copy of ``state.db``) cannot compute a line's MAC, so cannot
edit a line and re-hash it, nor drop lines and re-hash the rest, nor re-hash the whole log:
``verify`` names the first line whose MAC is wrong. A line hashed with plain SHA-256 (the rule
before the key, ``event_hash``) is named ``unkeyed``.

**The head** (``ZONE/audit.head``; ``policies.audit_head``) is the last line's ``seq`` and MAC,
signed with the key. It catches what a valid chain cannot show about itself: lines cut off
the *end* (the head names a line the log no longer has: ``truncated``), or the end cut off
and new lines appended by the service afterwards (the line at the head's ``seq`` is not the
one recorded: ``head_mismatch``). A missing head file while the log has lines is
``head_missing``. The head is written after each append commits (see ``AuditLog.append`` and
``append_in``), from the last committed row, under a file lock, and only ever forward along
the chain: it never moves back, and it does not move past a line that no longer matches it,
so that evidence stays for ``verify``. A head *behind* the log is accepted when the line it
names is still in the log unchanged: the lines after it carry valid MACs (only a key holder
makes those), and a writer that committed but died before updating the head leaves exactly
that. ``verify`` reads the head before walking the log for the same reason: appends that
land between the two only make the log longer than the head.

What still needs an outside anchor: whoever holds the key file (the zone's service account,
or anyone who can read the zone folder) can rewrite the log *and* the head. That is why only
the service account may read the zone folder. To catch a rewrite by a key holder, record
``VerifyReport.head_hash`` (with ``checked``) outside the zone (a ticket, a steward's notes)
and compare later.

Appending reads the last row and inserts the next inside one transaction that holds the
writers' lock (SQLite: ``BEGIN IMMEDIATE`` from ``foundation.sql.make_engine``; PostgreSQL:
``lock_key(conn, "audit")``), so concurrent writers never fork the chain; ``seq`` is the
primary key, so even a writer on an engine without that lock fails rather than forks.
``append_in(conn, ...)`` writes the event inside the caller's own transaction, so a change and
its audit line commit or roll back together.

``verify()`` walks the chain and names the first line that was **edited** (its content no
longer matches its MAC, or it was re-hashed and the next line no longer links to it),
**unkeyed** (hashed without the key), **dropped** (a gap in ``seq``, or a line whose
``prev_hash`` points at a line that is not there) or **reordered** (a line linking to a line
that exists but is not the one before it); then it checks the end against the head.

The chain rule and the verifier are in ``policies.audit_chain``, the head file in
``policies.audit_head``; everything is imported from here.

Audit details are names, counts and figures (job ids, epsilons, error kinds), never a value
from a sensitive dataset.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sqlalchemy import Connection, Engine, Row, event, select
from sqlalchemy.pool import ConnectionPoolEntry

from foundation.clock import utcnow
from foundation.errors import IntegrityError, SpecError
from foundation.sql import lock_key
from policies.audit_chain import (
    GENESIS_HASH,
    VERIFY_BATCH,
    ChainProblem,
    Scalar,
    VerifyReport,
    canonical_json,
    event_hash,
    event_mac,
    iso_utc,
    verify_chain,
)
from policies.audit_head import Head, HeadError, head_lock, read_head, write_head
from policies.db import audit_events, create_schema

# the chain rule and the verifier live in policies.audit_chain; callers import them from here
__all__ = [
    "AUDIT_LOCK_KEY",
    "GENESIS_HASH",
    "MIN_KEY_BYTES",
    "VERIFY_BATCH",
    "AuditEvent",
    "AuditLog",
    "ChainProblem",
    "Outcome",
    "Scalar",
    "VerifyReport",
    "event_hash",
    "event_mac",
]

log = logging.getLogger(__name__)

#: the lock key writers serialise on (PostgreSQL advisory lock; SQLite holds the DB lock)
AUDIT_LOCK_KEY = "audit"
#: the shortest audit key accepted (the zone draws 32 bytes)
MIN_KEY_BYTES = 16
#: ``Connection.info`` entry: the logs whose head is due when the connection is returned
_HEAD_DUE = "policies.audit.head_due"


class Outcome(StrEnum):
    OK = "ok"  # the call did what was asked
    DENIED = "denied"  # a role, grant, budget or spec check said no
    ERROR = "error"  # the zone's machinery failed


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    at: datetime
    actor: str
    action: str
    outcome: Outcome
    target: str
    details: Mapping[str, Scalar]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": iso_utc(self.at),
            "actor": self.actor,
            "action": self.action,
            "outcome": self.outcome.value,
            "target": self.target,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def _check_details(details: Mapping[str, Any] | None) -> dict[str, Scalar]:
    out: dict[str, Scalar] = {}
    for key, value in (details or {}).items():
        if not isinstance(key, str):
            raise SpecError("details", f"key {key!r} is not a string", "use string keys")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise SpecError(
                "details",
                f"value for {key!r} is a {type(value).__name__}",
                "use str, int, float, bool or None (convert ids and paths with str())",
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(
                "details", f"value for {key!r} is not finite", "record a finite number or a string"
            )
        out[key] = value
    return out


def _text(field_name: str, value: Any, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value.strip()):
        raise SpecError(
            field_name, "must be a non-empty string", f"pass the audit event's {field_name}"
        )
    return value


def _event(row: Row[Any]) -> AuditEvent:
    return AuditEvent(
        seq=row.seq,
        at=row.at,
        actor=row.actor,
        action=row.action,
        outcome=Outcome(row.outcome),
        target=row.target,
        details=MappingProxyType(json.loads(row.details_json)),
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class AuditLog:
    """The audit log on ``engine`` (creates its table if missing), keyed with ``key``.

    ``head_path`` is the head file (``Zone.audit_head_path``); ``None`` skips writing and
    checking it (bare logs in unit tests; the service always passes one).
    """

    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], datetime] = utcnow,
        *,
        key: bytes,
        head_path: Path | None,
    ) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
            raise SpecError(
                "key",
                f"must be at least {MIN_KEY_BYTES} bytes",
                "pass the zone's audit key (Zone.audit_key())",
            )
        self._engine = engine
        self._clock = clock
        self._key = key
        self._head_path = head_path
        create_schema(engine)
        if head_path is not None:
            # append_in's head is written when the caller's connection goes back to the pool:
            # SQLAlchemy Core has no after-commit hook (its "commit" event fires before)
            event.listen(engine, "checkin", self._on_checkin)

    def append(
        self,
        actor: str,
        action: str,
        outcome: str,
        target: str = "",
        details: Mapping[str, Scalar] | None = None,
    ) -> AuditEvent:
        """Append one event in its own transaction; returns it with its ``seq`` and ``hash``.

        The head file is brought up to date after the commit, before this returns; if it
        cannot be written the event stays recorded and this raises ``IntegrityError``.
        """
        with self._engine.begin() as conn:
            written = self._insert(conn, actor, action, outcome, target, details)
        if self._head_path is not None:
            try:
                self._sync_head()
            except OSError as exc:
                raise IntegrityError(
                    f"{self._head_path}: the audit head could not be written ({exc}); line "
                    f"{written.seq} is recorded but not anchored: free space or fix the zone "
                    "folder's permissions, then any later append writes it"
                ) from exc
        return written

    def append_in(
        self,
        conn: Connection,
        actor: str,
        action: str,
        outcome: str,
        target: str = "",
        details: Mapping[str, Scalar] | None = None,
    ) -> AuditEvent:
        """Append one event inside the caller's open transaction on ``conn``.

        The event commits or rolls back with the caller's change. The caller holds the audit
        lock until it commits, so keep the rest of that transaction short. The head file is
        brought up to date when ``conn`` is closed (returned to the pool), from the rows then
        committed: an event rolled back never reaches it.
        """
        written = self._insert(conn, actor, action, outcome, target, details)
        if self._head_path is not None:
            conn.info.setdefault(_HEAD_DUE, set()).add(self)
        return written

    def _insert(
        self,
        conn: Connection,
        actor: str,
        action: str,
        outcome: str,
        target: str,
        details: Mapping[str, Scalar] | None,
    ) -> AuditEvent:
        actor = _text("actor", actor)
        action = _text("action", action)
        target = _text("target", target, empty_ok=True)
        try:
            result = Outcome(outcome)
        except ValueError:
            raise SpecError(
                "outcome", f"{outcome!r} is not an outcome", "use ok, denied or error"
            ) from None
        clean = _check_details(details)
        at = self._clock()
        if at.tzinfo is None:
            raise SpecError("clock", "returned a naive datetime", "return datetime.now(UTC)")
        at = at.astimezone(UTC)

        lock_key(conn, AUDIT_LOCK_KEY)
        last = conn.execute(
            select(audit_events.c.seq, audit_events.c.hash)
            .order_by(audit_events.c.seq.desc())
            .limit(1)
        ).first()
        seq = 1 if last is None else last.seq + 1
        prev = GENESIS_HASH if last is None else last.hash
        digest = event_mac(self._key, seq, at, actor, action, result, target, clean, prev)
        conn.execute(
            audit_events.insert().values(
                seq=seq,
                at=at,
                actor=actor,
                action=action,
                outcome=result.value,
                target=target,
                details_json=canonical_json(clean),
                prev_hash=prev,
                hash=digest,
            )
        )
        return AuditEvent(
            seq, at, actor, action, result, target, MappingProxyType(clean), prev, digest
        )

    def _sync_head(self) -> None:
        """Move the head file forward to the last committed line.

        Re-reading the last row under the head lock (not writing the event just appended)
        keeps concurrent appenders right: whoever writes last wrote the newest line. The head
        only moves forward along the chain (see the module docstring).
        """
        path = self._head_path
        assert path is not None
        with head_lock(path):
            try:
                current = read_head(path, self._key)
            except HeadError as exc:
                log.warning("audit head not moved: %s; run `sandbox audit verify`", exc)
                return
            with self._engine.connect() as conn:
                last = conn.execute(
                    select(audit_events.c.seq, audit_events.c.hash)
                    .order_by(audit_events.c.seq.desc())
                    .limit(1)
                ).first()
                anchored = None
                if current is not None:
                    anchored = conn.execute(
                        select(audit_events.c.hash).where(audit_events.c.seq == current.seq)
                    ).scalar()
            if last is None:
                return
            if current is not None:
                if anchored != current.mac:
                    log.warning(
                        "audit head not moved: line %s is not the line %s records; run "
                        "`sandbox audit verify`",
                        current.seq,
                        path,
                    )
                    return
                if last.seq <= current.seq:
                    return  # another writer already recorded this line or a later one
            write_head(path, self._key, Head(last.seq, last.hash))

    def _on_checkin(self, _dbapi_conn: Any, record: ConnectionPoolEntry | None) -> None:
        due = None if record is None else record.info.get(_HEAD_DUE)
        if not due or self not in due:
            return
        due.discard(self)
        try:
            self._sync_head()
        except Exception:
            # raising here would break the caller's close; the head stays behind (which
            # verify accepts) until the next append moves it on
            log.warning("audit head not written after append_in", exc_info=True)

    def list(
        self,
        limit: int = 100,
        actor: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
    ) -> builtins.list[AuditEvent]:
        """The latest ``limit`` events matching the filters, oldest first."""
        if not isinstance(limit, int) or limit < 1:
            raise SpecError("limit", "must be a whole number of at least 1", "e.g. --limit 100")
        query = select(audit_events).order_by(audit_events.c.seq.desc()).limit(limit)
        if actor is not None:
            query = query.where(audit_events.c.actor == actor)
        if action is not None:
            query = query.where(audit_events.c.action == action)
        if outcome is not None:
            query = query.where(audit_events.c.outcome == outcome)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_event(r) for r in reversed(rows)]

    def head(self) -> AuditEvent | None:
        """The last event, or ``None`` for an empty log."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(audit_events).order_by(audit_events.c.seq.desc()).limit(1)
            ).first()
        return None if row is None else _event(row)

    def verify(self) -> VerifyReport:
        """Walk the whole chain, then check its end against the head file; report the first
        bad line (see the module docstring)."""
        return verify_chain(self._engine, self._key, self._head_path)
