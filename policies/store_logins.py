"""The ``user_logins`` table: each user's token expiry and second factor (``policies.db``).

A zone made before this table existed is refused with what to do, never altered here: the
service runs no DDL when it opens a zone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from foundation.errors import SpecError
from policies.db import user_logins


@dataclass(frozen=True)
class Login:
    name: str
    token_expires_at: datetime | None
    totp_sealed: str | None
    totp_confirmed_at: datetime | None
    totp_last_step: int | None

    @property
    def totp_on(self) -> bool:
        return self.totp_sealed is not None and self.totp_confirmed_at is not None


def _missing_table() -> SpecError:
    return SpecError(
        "zone database",
        "has no table user_logins (the zone was made by an older version, before token "
        "expiry and second factors)",
        "serve it with the version that made it until `sandbox` can upgrade a zone's schema, "
        "or make a new zone with `sandbox init`",
    )


class LoginStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (OperationalError, ProgrammingError) as exc:
            if "user_logins" in str(exc.orig):
                raise _missing_table() from None
            raise

    def get(self, name: str) -> Login | None:
        with self._begin() as conn:
            row = conn.execute(select(user_logins).where(user_logins.c.name == name)).first()
        if row is None:
            return None
        return Login(
            row.name,
            row.token_expires_at,
            row.totp_sealed,
            row.totp_confirmed_at,
            row.totp_last_step,
        )

    def _upsert(self, conn: Connection, name: str, values: dict[str, Any]) -> None:
        done = conn.execute(user_logins.update().where(user_logins.c.name == name).values(values))
        if not done.rowcount:
            conn.execute(user_logins.insert().values(name=name, **values))

    def set_expiry(self, name: str, expires_at: datetime | None) -> None:
        with self._begin() as conn:
            self._upsert(conn, name, {"token_expires_at": expires_at})

    def start_totp(self, name: str, sealed: str) -> None:
        """A pending second factor (not asked for until it is confirmed)."""
        with self._begin() as conn:
            values = {"totp_sealed": sealed, "totp_confirmed_at": None, "totp_last_step": None}
            self._upsert(conn, name, values)

    def clear_totp(self, name: str) -> None:
        with self._begin() as conn:
            values = {"totp_sealed": None, "totp_confirmed_at": None, "totp_last_step": None}
            self._upsert(conn, name, values)

    def use_step(self, name: str, step: int, last: int | None, *, confirm_at: Any = None) -> bool:
        """Record ``step`` as used if the last used step is still ``last`` and below it (one
        conditional update: of two requests with one code, only one wins)."""
        c = user_logins.c
        unchanged = c.totp_last_step.is_(None) if last is None else c.totp_last_step == last
        values: dict[str, Any] = {"totp_last_step": step}
        if confirm_at is not None:
            values["totp_confirmed_at"] = confirm_at
        if last is not None and step <= last:
            return False
        with self._begin() as conn:
            done = conn.execute(
                user_logins.update().where(c.name == name, unchanged).values(values)
            )
        return bool(done.rowcount)
