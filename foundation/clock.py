"""The zone's one clock: timezone-aware UTC, so stored times compare across hosts."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
