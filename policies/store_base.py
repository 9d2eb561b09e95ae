"""What every part of the policy state store shares: the engine and clock, new ids, and the
checks on the names, texts, counts and times that callers pass.

``StoreBase`` is the base of the store's table-group mixins (``policies.store_users``,
``store_datasets``, ``store_projects``, ``store_access``, ``store_caps``), which
``policies.store.StateStore`` combines; it holds no method of its own beyond the clock and
ids. The checks raise ``SpecError`` naming the field and the fix.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Connection, Engine, exists, select

from foundation.errors import SpecError

#: names people type (users, datasets, projects): safe in ids, paths and URLs
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: how many known names a NotFoundError lists before "..."
KNOWN_NAMES_SHOWN = 20


def check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise SpecError(
            field,
            "must be 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit",
            "e.g. cohort-2026",
        )
    return value


def check_text(field: str, value: object, fix: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(field, "is empty", fix)
    return value.strip()


def check_count(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(field, "must be a whole number of at least 0", f"pass the {field} count")
    return value


def check_aware(field: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise SpecError(
            field, "must be a timezone-aware datetime", "e.g. datetime(2026, 6, 30, tzinfo=UTC)"
        )
    return value.astimezone(UTC)


def known_names(names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return "(none yet)"
    shown = ", ".join(names[:KNOWN_NAMES_SHOWN])
    return shown + (", ..." if len(names) > KNOWN_NAMES_SHOWN else "")


class StoreBase:
    """The engine and clock the store's table groups share (``StateStore`` sets them)."""

    engine: Engine
    _clock: Callable[[], datetime]

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise SpecError("clock", "returned a naive datetime", "return datetime.now(UTC)")
        return now.astimezone(UTC)

    @staticmethod
    def _new_id(conn: Connection, prefix: str, column: Column[Any]) -> str:
        """A short readable id (``req-1a2b3c4d``) not yet used in ``column``."""
        while True:
            candidate = f"{prefix}-{secrets.token_hex(4)}"
            if not conn.execute(select(exists().where(column == candidate))).scalar():
                return candidate
