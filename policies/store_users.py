"""The store's users: add, authenticate, revoke and reissue tokens; who is an active user.

Only a token's hash is stored (``policies.identity``); the token is shown once, at creation
or reissue. ``active_user`` is what every other table group checks people against (owners,
members, requesters, deciders).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from foundation.errors import AuthError, NotFoundError, PolicyDenied, SpecError
from policies.db import users
from policies.identity import hash_token, looks_like_token, new_token, token_matches
from policies.roles import ROLE_GRANTOR, Role
from policies.store_base import StoreBase, check_name
from policies.store_records import User, user_from_row

AUTH_FAILED = "unknown or revoked token; ask an operator for a new one"


def user_row(conn: Connection, name: str) -> Row[Any] | None:
    return conn.execute(select(users).where(users.c.name == name)).first()


def one_user(conn: Connection, name: str) -> Row[Any]:
    row = user_row(conn, name)
    if row is None:
        raise NotFoundError(f"unknown user {name!r}; see the user list")
    return row


def active_user(conn: Connection, name: str, field: str) -> Row[Any]:
    row = user_row(conn, name) if isinstance(name, str) else None
    if row is None:
        raise NotFoundError(f"{field}: unknown user {name!r}; an operator adds users")
    if row.revoked_at is not None:
        raise PolicyDenied(
            f"{field}: user {name} is revoked",
            missing=(f"active account for {name}",),
            grantor=ROLE_GRANTOR,
        )
    return row


class UsersMixin(StoreBase):
    """``StateStore``'s user methods (the ``users`` table)."""

    def add_user(self, name: str, role: Role | str) -> tuple[User, str]:
        """Add a user; returns the user and their token (shown once, only its hash is kept)."""
        check_name("name", name)
        try:
            role = Role(role)
        except ValueError:
            raise SpecError(
                "role", f"{role!r} is not a role", f"use one of {', '.join(r.value for r in Role)}"
            ) from None
        token, token_hash = new_token()
        taken = SpecError("name", f"user {name!r} already exists", "pick another name")
        try:
            with self.engine.begin() as conn:
                if user_row(conn, name) is not None:
                    raise taken
                uid = self._new_id(conn, "user", users.c.id)
                conn.execute(
                    users.insert().values(
                        id=uid,
                        name=name,
                        role=role.value,
                        token_hash=token_hash,
                        created_at=self._now(),
                        revoked_at=None,
                    )
                )
                row = one_user(conn, name)
        except DBIntegrityError:  # a concurrent add of the same name won the race
            raise taken from None
        return user_from_row(row), token

    def authenticate(self, token: str) -> User:
        """The active user holding ``token``; ``AuthError`` for anything else."""
        if not looks_like_token(token):
            raise AuthError(AUTH_FAILED)
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.token_hash == digest)).first()
        if row is None or row.revoked_at is not None or not token_matches(token, row.token_hash):
            raise AuthError(AUTH_FAILED)
        return user_from_row(row)

    def revoke_user(self, name: str) -> User:
        """Revoke ``name``'s token (idempotent: revoking twice keeps the first time)."""
        with self.engine.begin() as conn:
            if one_user(conn, name).revoked_at is None:
                conn.execute(
                    users.update().where(users.c.name == name).values(revoked_at=self._now())
                )
            return user_from_row(one_user(conn, name))

    def reissue_token(self, name: str) -> tuple[User, str]:
        """A new token for ``name`` (the old one stops working; a revoked user is active again)."""
        token, token_hash = new_token()
        with self.engine.begin() as conn:
            one_user(conn, name)
            conn.execute(
                users.update()
                .where(users.c.name == name)
                .values(token_hash=token_hash, revoked_at=None)
            )
            return user_from_row(one_user(conn, name)), token

    def get_user(self, name: str) -> User:
        with self.engine.connect() as conn:
            return user_from_row(one_user(conn, name))

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.name)).all()
        return [user_from_row(r) for r in rows]
