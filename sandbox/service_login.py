"""Logging in beyond the bearer token: its expiry and a second factor (TOTP).

``Logins.check`` runs inside ``Service.authenticate`` after the token is found: an expired
token is refused, and a user with a confirmed second factor must send a current code that
was never used before. A user whose role the zone's ``[login] require_totp`` names and who has
not enrolled yet may make only the calls that enrol them (``Call.login``).

A code is good once, but one CLI command makes several requests (``whoami``, the call, a
``--follow`` loop): the first request that carries a good code gets a *session* back (the
``X-Sandbox-Session`` header), which the client sends instead of the code until it exits.
A session lives in the service's memory only, for ``SESSION_HOURS``, tied to the token it was
opened with (a reissued or revoked token ends it; so does a restart of the service).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from datetime import datetime, timedelta
from typing import Any

from foundation.errors import AuthError, SpecError
from policies.identity import hash_token
from policies.roles import Action, Actor
from policies.store_logins import Login, LoginStore
from policies.store_records import User
from policies.totp import matching_step, new_secret, provisioning_uri, seal, sealing_key, unseal
from sandbox.context import ZoneContext
from sandbox.login_policy import LoginPolicy, check_days

SESSION_HOURS = 12
OTP_HELP = "give the code your authenticator shows now with SANDBOX_OTP or --otp"


class Logins:
    def __init__(self, ctx: ZoneContext, store: LoginStore, policy: LoginPolicy) -> None:
        self.ctx = ctx
        self.store = store
        self.policy = policy
        self._sessions: dict[str, tuple[str, str, datetime]] = {}
        self._lock = threading.Lock()

    def _key(self) -> bytes:
        return sealing_key(self.ctx.zone.secret())

    def expiry(self, days: int | None, field: str = "--expires-in") -> datetime:
        """When a token made now expires: ``days`` from now, else the zone's default."""
        if days is None:
            days = self.policy.token_days
        return self.ctx.clock() + timedelta(days=check_days(field, days))

    # -- every request ----------------------------------------------------------------------

    def _deny(self, name: str, reason: str, message: str) -> AuthError:
        self.ctx.audit.append(name, "auth", "denied", "", {"reason": reason})
        return AuthError(message)

    def check(
        self,
        user: User,
        token: str,
        otp: str | None,
        session: str | None,
        *,
        enrolling: bool = False,
    ) -> str | None:
        """Refuse an expired token or a missing, wrong or used code; a new session when a
        code was used (else None)."""
        now = self.ctx.clock()
        login = self.store.get(user.name)
        if login and login.token_expires_at is not None and login.token_expires_at <= now:
            raise self._deny(
                user.name,
                "expired",
                f"your token expired on {login.token_expires_at:%Y-%m-%d %H:%M} UTC; ask an "
                "operator for a new one (`sandbox user reissue NAME`)",
            )
        if login is None or not login.totp_on:
            if user.role in self.policy.require_totp and not enrolling:
                raise self._deny(
                    user.name,
                    "second factor not enrolled",
                    f"the zone requires a second factor for {user.role.value}s: enrol with "
                    "`sandbox user totp-enrol`, then give its codes with SANDBOX_OTP or --otp",
                )
            return None
        if session and self._session_ok(session, user.name, token, now):
            return None
        if not otp:
            raise self._deny(user.name, "no code", f"{user.name} needs a one-time code: {OTP_HELP}")
        step = self._fresh_step(login, otp, now)
        if step is None:
            raise self._deny(
                user.name, "wrong code", f"that one-time code is wrong or too old: {OTP_HELP}"
            )
        if not self.store.use_step(user.name, step, login.totp_last_step):
            raise self._deny(
                user.name,
                "code replayed",
                "that one-time code was used already; wait for the next one and give it",
            )
        return self._open_session(user.name, token, now)

    def _fresh_step(self, login: Login, otp: str, now: datetime) -> int | None:
        assert login.totp_sealed is not None
        step = matching_step(unseal(self._key(), login.name, login.totp_sealed), otp, now)
        if step is not None and login.totp_last_step is not None and step <= login.totp_last_step:
            return login.totp_last_step  # a used code: refused as a replay by use_step
        return step

    def _open_session(self, name: str, token: str, now: datetime) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v[2] > now}
            self._sessions[_digest(session)] = (
                name,
                hash_token(token),
                now + timedelta(hours=SESSION_HOURS),
            )
        return session

    def _session_ok(self, session: str, name: str, token: str, now: datetime) -> bool:
        with self._lock:
            held = self._sessions.get(_digest(session))
        return held is not None and held[:2] == (name, hash_token(token)) and held[2] > now

    # -- enrolment (the caller, for themself) --------------------------------------------------

    def enrol(self, actor: Actor) -> dict[str, Any]:
        with self.ctx.act(actor, Action.USER_TOTP_ENROL, actor.name):
            login = self.store.get(actor.name)
            if login is not None and login.totp_on:
                raise SpecError(
                    "totp-enrol",
                    f"{actor.name} already has a second factor",
                    "to replace it, an operator reissues your token (`sandbox user reissue`) "
                    "and you enrol again",
                )
            secret = new_secret()
            self.store.start_totp(actor.name, seal(self._key(), actor.name, secret))
            uri = provisioning_uri(secret, actor.name, self.ctx.zone.zone_id)
            return {"user": actor.name, "secret": secret, "uri": uri, "confirmed": False}

    def confirm(self, actor: Actor, code: str) -> dict[str, Any]:
        with self.ctx.act(actor, Action.USER_TOTP_CONFIRM, actor.name):
            login = self.store.get(actor.name)
            if login is None or login.totp_sealed is None or login.totp_on:
                raise SpecError(
                    "totp-confirm",
                    f"{actor.name} has no enrolment waiting to be confirmed",
                    "run `sandbox user totp-enrol` first",
                )
            now = self.ctx.clock()
            step = matching_step(unseal(self._key(), actor.name, login.totp_sealed), code, now)
            if step is None or not self.store.use_step(actor.name, step, None, confirm_at=now):
                raise SpecError(
                    "CODE",
                    "is not the current code of the secret just enrolled",
                    "type the 6 digits your authenticator shows now (its clock must be right)",
                )
            return {"user": actor.name, "confirmed": True}


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode("utf-8")).hexdigest()
