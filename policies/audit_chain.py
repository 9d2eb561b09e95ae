"""The audit chain's rule and its verifier (``policies.audit`` documents both).

``event_mac`` is the chain rule; ``verify_chain`` walks a log and checks its end against the
head file (``policies.audit_head``). Kept apart from ``AuditLog`` so each module stays small.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Row, Text, select, type_coerce

from policies.audit_head import Head, HeadError, read_head
from policies.db import audit_events

#: ``prev_hash`` of the first line
GENESIS_HASH = "0" * 64
#: rows fetched at a time while verifying, so a long log never sits in memory at once
VERIFY_BATCH = 1000

Scalar = str | int | float | bool | None


class ChainProblem(StrEnum):
    EDITED = "edited"
    DROPPED = "dropped"
    REORDERED = "reordered"
    #: hashed with plain SHA-256, not the audit key: forged or re-hashed without the key
    UNKEYED = "unkeyed"
    #: the head file names a line past the log's end: lines were cut off the end
    TRUNCATED = "truncated"
    #: the line at the head's seq is not the one recorded, or the head file is not valid
    HEAD_MISMATCH = "head_mismatch"
    #: the log has lines but there is no head file to vouch for its end
    HEAD_MISSING = "head_missing"


def iso_utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def canonical_json(obj: Any) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _body(
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    outcome: str,
    target: str,
    details: Mapping[str, Scalar],
    prev_hash: str,
) -> bytes:
    body = {
        "seq": seq,
        "at": iso_utc(at),
        "actor": actor,
        "action": action,
        "outcome": str(outcome),
        "target": target,
        "details": dict(details),
        "prev_hash": prev_hash,
    }
    return canonical_json(body).encode("utf-8")


def event_mac(
    key: bytes,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    outcome: str,
    target: str,
    details: Mapping[str, Scalar],
    prev_hash: str,
) -> str:
    """The chain rule (see the module docstring), usable by an outside verifier with the key."""
    body = _body(seq, at, actor, action, outcome, target, details, prev_hash)
    return hmac.new(key, body, hashlib.sha256).hexdigest()


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
    """The old, unkeyed rule (plain SHA-256 of the same body): what anyone can compute.

    Not the chain rule any more; ``verify`` uses it only to name a line hashed this way
    ``unkeyed``."""
    body = _body(seq, at, actor, action, outcome, target, details, prev_hash)
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class VerifyReport:
    """``ok`` or the first bad line: its ``seq``, the ``problem`` and a sentence (``detail``).

    ``checked`` counts the lines verified good (all of them when ``ok``); ``head_hash`` is the
    MAC of the last good line (``GENESIS_HASH`` for an empty log). A problem with the end of
    the log (``truncated``, ``head_mismatch``, ``head_missing``) names the first line missing
    or not vouched for.
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


def _row_mac(key: bytes, row: Row[Any], keyed: bool = True) -> str | None:
    """Recompute a stored row's MAC (or, ``keyed=False``, its plain SHA-256); ``None`` when
    the row cannot even be parsed."""
    try:
        args = (
            row.seq,
            _stored_at(row.at),
            row.actor,
            row.action,
            row.outcome,
            row.target,
            json.loads(row.details_json),
            row.prev_hash,
        )
        return event_mac(key, *args) if keyed else event_hash(*args)
    except (ValueError, TypeError):
        return None


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def verify_chain(engine: Engine, key: bytes, head_path: Path | None) -> VerifyReport:
    """Walk the whole chain on ``engine``, then check its end against the head file at
    ``head_path`` (``None``: no head check); report the first bad line."""
    # the head first: lines committed after this read only make the log longer than it
    head: Head | None = None
    head_error = ""
    if head_path is not None:
        try:
            head = read_head(head_path, key)
        except HeadError as exc:
            head_error = str(exc)
    at_head: dict[int, str] = {}  # the MACs at the head's line and the one before it
    checked = 0
    prev_hash, prev_seq = GENESIS_HASH, 0
    with engine.connect() as conn:
        result = conn.execution_options(yield_per=VERIFY_BATCH).execute(
            select(*_RAW_COLUMNS).order_by(audit_events.c.seq)
        )
        bad: Row[Any] | None = None
        for row in result:
            expected = checked + 1
            if row.prev_hash != prev_hash or row.seq != expected or _row_mac(key, row) != row.hash:
                bad = row
                break
            if head is not None and row.seq in (head.seq - 1, head.seq):
                at_head[row.seq] = row.hash
            checked, prev_hash, prev_seq = expected, row.hash, row.seq
        result.close()
        if bad is None:
            if head_path is None:
                return VerifyReport(True, checked, None, None, "", prev_hash)
            return _check_end(checked, prev_hash, head_path, head, head_error, at_head)
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
            return report(
                expected,
                ChainProblem.DROPPED,
                f"line {_span(expected, bad.seq - 1)} missing: line {bad.seq} links to a line"
                " that is not in the log",
            )
        if checked > 0 and _row_mac(key, bad) == bad.hash:
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
        return report(expected, ChainProblem.EDITED, f"line {expected} was renumbered to {bad.seq}")
    if _row_mac(key, bad, keyed=False) == bad.hash:
        return report(
            bad.seq,
            ChainProblem.UNKEYED,
            f"line {bad.seq} was hashed with plain SHA-256, not the audit key: it was forged"
            " or re-hashed by someone without the key",
        )
    return report(
        bad.seq,
        ChainProblem.EDITED,
        f"line {bad.seq} no longer matches its MAC (edited, or re-hashed without the audit key)",
    )


def _check_end(
    last: int,
    last_mac: str,
    path: Path,
    head: Head | None,
    head_error: str,
    macs: dict[int, str],
) -> VerifyReport:
    """The verdict on a log whose lines 1..``last`` are all good, given the head at ``path``
    (``macs``: the good MACs at the head's line and the one before it)."""

    def report(seq: int, good: int, problem: ChainProblem, detail: str) -> VerifyReport:
        mac = last_mac if good == last else macs.get(good, GENESIS_HASH)
        return VerifyReport(False, good, seq, problem, detail, mac)

    if head_error:
        return report(
            last + 1,
            last,
            ChainProblem.HEAD_MISMATCH,
            f"{head_error}: cannot tell whether lines after line {last} were cut off",
        )
    if head is None:
        if last == 0:
            return VerifyReport(True, 0, None, None, "", last_mac)
        return report(
            last + 1,
            last,
            ChainProblem.HEAD_MISSING,
            f"the head file {path} is missing: cannot tell whether lines after line {last}"
            " were cut off",
        )
    if head.seq > last:
        return report(
            last + 1,
            last,
            ChainProblem.TRUNCATED,
            f"line {_span(last + 1, head.seq)} cut off the end: the log ends at line {last}"
            f" but the head file {path} records line {head.seq}",
        )
    if macs.get(head.seq) != head.mac:
        return report(
            head.seq,
            head.seq - 1,
            ChainProblem.HEAD_MISMATCH,
            f"line {head.seq} is not the line the head file {path} records: the end of the log"
            " was cut off and new lines appended, or the log was rewritten with the key",
        )
    # a head behind the log is fine: see policies.audit's docstring
    return VerifyReport(True, last, None, None, "", last_mac)
