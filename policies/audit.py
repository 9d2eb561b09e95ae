"""The append-only, hash-chained audit log.

Every event is one row of ``audit_events``, numbered ``seq`` = 1, 2, 3, ... with no gaps.
Each row stores the hash of the row before it (``prev_hash``; the first row points at
``GENESIS_HASH``) and its own ``hash``::

    hash = sha256(canonical_json({seq, at, actor, action, outcome, target, details, prev_hash}))

where canonical JSON is ``json.dumps(..., sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` encoded as UTF-8 and ``at`` is the UTC ISO-8601 time to
the microsecond (``2026-01-31T12:00:00.000000+00:00``). Anyone can recompute the chain from the
table alone with that rule.

Appending reads the last row and inserts the next inside one transaction that holds the
writers' lock (SQLite: ``BEGIN IMMEDIATE`` from ``foundation.sql.make_engine``; PostgreSQL:
``lock_key(conn, "audit")``), so concurrent writers never fork the chain; ``seq`` is the
primary key, so even a writer on an engine without that lock fails rather than forks.
``append_in(conn, ...)`` writes the event inside the caller's own transaction, so a change and
its audit line commit or roll back together.

``verify()`` walks the chain and names the first line that was **edited** (its content no
longer matches its hash, or it was re-hashed and the next line no longer links to it),
**dropped** (a gap in ``seq``, or a line whose ``prev_hash`` points at a line that is not
there) or **reordered** (a line linking to a line that exists but is not the one before it).

What a chain without an outside anchor cannot show: lines cut off the *end* of the log, or
the last line edited and re-hashed, or the whole log rewritten from some line on by someone
who can write the table. Record ``VerifyReport.head_hash`` outside the zone (a ticket, a
steward's notes) to catch those.

Audit details are names, counts and figures (job ids, epsilons, error kinds), never a value
from a sensitive dataset.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from sqlalchemy import Connection, Engine, Row, Text, select, type_coerce

from foundation.clock import utcnow
from foundation.errors import SpecError
from foundation.sql import lock_key
from policies.db import audit_events, create_schema

#: ``prev_hash`` of the first line
GENESIS_HASH = "0" * 64
#: the lock key writers serialise on (PostgreSQL advisory lock; SQLite holds the DB lock)
AUDIT_LOCK_KEY = "audit"
#: rows fetched at a time while verifying, so a long log never sits in memory at once
VERIFY_BATCH = 1000

Scalar = str | int | float | bool | None


class Outcome(StrEnum):
    OK = "ok"  # the call did what was asked
    DENIED = "denied"  # a role, grant, budget or spec check said no
    ERROR = "error"  # the zone's machinery failed


class ChainProblem(StrEnum):
    EDITED = "edited"
    DROPPED = "dropped"
    REORDERED = "reordered"


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _canonical(obj: Any) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def event_hash(
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    outcome: str,
    target: str,
    details: Mapping[str, Scalar],
    prev_hash: str,
) -> str:
    """The chain rule (see the module docstring), usable by an outside verifier."""
    body = {
        "seq": seq,
        "at": _iso(at),
        "actor": actor,
        "action": action,
        "outcome": str(outcome),
        "target": target,
        "details": dict(details),
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


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
            "at": _iso(self.at),
            "actor": self.actor,
            "action": self.action,
            "outcome": self.outcome.value,
            "target": self.target,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyReport:
    """``ok`` or the first bad line: its ``seq``, the ``problem`` and a sentence (``detail``).

    ``checked`` counts the lines verified good (all of them when ``ok``); ``head_hash`` is the
    hash of the last good line (``GENESIS_HASH`` for an empty log).
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: ChainProblem | None
    detail: str = ""
    head_hash: str = field(default=GENESIS_HASH)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem.value if self.problem else None,
            "detail": self.detail,
            "head_hash": self.head_hash,
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


def _stored_at(value: Any) -> datetime:
    """``at`` as the verifier reads it: raw (text on SQLite), so that a time edited into
    something unreadable makes its line bad instead of crashing ``verify`` (``ValueError``)."""
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(str(value))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: every column of the audit table, with ``at`` read raw (see ``_stored_at``)
_RAW_COLUMNS = tuple(
    type_coerce(c, Text).label(c.key) if c.key == "at" else c for c in audit_events.c
)


def _row_hash(row: Row[Any]) -> str | None:
    """Recompute a stored row's hash; ``None`` when the row cannot even be parsed."""
    try:
        details = json.loads(row.details_json)
        return event_hash(
            row.seq,
            _stored_at(row.at),
            row.actor,
            row.action,
            row.outcome,
            row.target,
            details,
            row.prev_hash,
        )
    except (ValueError, TypeError):
        return None


class AuditLog:
    """The audit log on ``engine`` (creates its table if missing)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = engine
        self._clock = clock
        create_schema(engine)

    def append(
        self,
        actor: str,
        action: str,
        outcome: str,
        target: str = "",
        details: Mapping[str, Scalar] | None = None,
    ) -> AuditEvent:
        """Append one event in its own transaction; returns it with its ``seq`` and ``hash``."""
        with self._engine.begin() as conn:
            return self.append_in(conn, actor, action, outcome, target, details)

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
        lock until it commits, so keep the rest of that transaction short.
        """
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
        digest = event_hash(seq, at, actor, action, result, target, clean, prev)
        conn.execute(
            audit_events.insert().values(
                seq=seq,
                at=at,
                actor=actor,
                action=action,
                outcome=result.value,
                target=target,
                details_json=_canonical(clean),
                prev_hash=prev,
                hash=digest,
            )
        )
        return AuditEvent(
            seq, at, actor, action, result, target, MappingProxyType(clean), prev, digest
        )

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
        """Walk the whole chain; report the first edited, dropped or reordered line."""
        checked = 0
        prev_hash, prev_seq = GENESIS_HASH, 0
        with self._engine.connect() as conn:
            result = conn.execution_options(yield_per=VERIFY_BATCH).execute(
                select(*_RAW_COLUMNS).order_by(audit_events.c.seq)
            )
            bad: Row[Any] | None = None
            for row in result:
                expected = checked + 1
                if row.prev_hash != prev_hash or row.seq != expected or _row_hash(row) != row.hash:
                    bad = row
                    break
                checked, prev_hash, prev_seq = expected, row.hash, row.seq
            result.close()
            if bad is None:
                return VerifyReport(True, checked, None, None, "", prev_hash)
            pointed = None
            if bad.prev_hash != prev_hash:
                pointed = conn.execute(
                    select(audit_events.c.seq).where(audit_events.c.hash == bad.prev_hash)
                ).scalar()

        expected = checked + 1

        def report(seq: int, problem: ChainProblem, detail: str) -> VerifyReport:
            return VerifyReport(False, checked, seq, problem, detail, prev_hash)

        if bad.prev_hash != prev_hash:
            if pointed is not None:
                return report(
                    bad.seq,
                    ChainProblem.REORDERED,
                    f"line {bad.seq} links to line {pointed}, not to the line before it"
                    f" ({prev_seq or 'the start'}): lines were moved",
                )
            if bad.seq > expected:
                gap = str(expected) if bad.seq == expected + 1 else f"{expected}-{bad.seq - 1}"
                return report(
                    expected,
                    ChainProblem.DROPPED,
                    f"line {gap} missing: line {bad.seq} links to a line that is not in the log",
                )
            if checked > 0 and _row_hash(bad) == bad.hash:
                return report(
                    prev_seq,
                    ChainProblem.EDITED,
                    f"line {prev_seq} was changed and re-hashed: line {bad.seq} no longer links to it",
                )
            return report(
                bad.seq,
                ChainProblem.EDITED,
                f"line {bad.seq}'s link to the line before it was changed (or a line before it"
                " was dropped and the later lines renumbered)",
            )
        if bad.seq != expected:
            return report(
                expected,
                ChainProblem.EDITED,
                f"line {expected} was renumbered to {bad.seq}",
            )
        return report(bad.seq, ChainProblem.EDITED, f"line {bad.seq} no longer matches its hash")
