"""The zone's login rules, from the ``[login]`` table of ``zone.toml`` (the service account
edits it; ``sandbox serve`` reads it when it starts)::

    [login]
    token_days = 90                         # a new or reissued token's life (default 90)
    require_totp = ["steward", "operator"]  # roles that must use a second factor (default none)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from foundation.errors import SpecError
from policies.roles import Role

DEFAULT_TOKEN_DAYS = 90
#: the longest life a token may be given (ten years)
MAX_TOKEN_DAYS = 3650


def check_days(field: str, days: object) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_TOKEN_DAYS:
        raise SpecError(
            field, f"must be a whole number of days from 1 to {MAX_TOKEN_DAYS}", "e.g. 90"
        )
    return days


@dataclass(frozen=True)
class LoginPolicy:
    token_days: int = DEFAULT_TOKEN_DAYS
    require_totp: frozenset[Role] = frozenset()

    @classmethod
    def of_zone(cls, root: Path) -> LoginPolicy:
        try:
            data = tomllib.loads((root / "zone.toml").read_text())
        except (OSError, tomllib.TOMLDecodeError):
            return cls()  # Zone.open has already said what is wrong with zone.toml
        login = data.get("login", {})
        if not isinstance(login, dict):
            raise SpecError("zone.toml [login]", "must be a table", "write it as [login]")
        days = check_days(
            "zone.toml [login] token_days", login.get("token_days", DEFAULT_TOKEN_DAYS)
        )
        roles = login.get("require_totp", [])
        field = "zone.toml [login] require_totp"
        if not isinstance(roles, list):
            raise SpecError(field, "must be a list of roles", 'e.g. ["steward", "operator"]')
        try:
            required = frozenset(Role(r) for r in roles)
        except ValueError:
            raise SpecError(
                field,
                f"{roles!r} names a role that does not exist",
                f"use {[r.value for r in Role]}",
            ) from None
        return cls(days, required)
