"""Least privilege in the state database (PostgreSQL).

Two database roles: the **owner**, who creates the schema (``sandbox init --db-url OWNER``) and
alone may change it, and the **service** role the zone runs as (``--service-db-url``, written to
zone.toml). The service may SELECT and INSERT the ledger and the audit log and nothing more on
them: no UPDATE, DELETE or TRUNCATE (history cannot be altered even by the service's own
account, whatever code runs under it), no DDL anywhere (it owns nothing, and PostgreSQL 15 gives
PUBLIC no CREATE on the public schema). The zone's id is read-only to it. The other tables
(users, grants, jobs, ...) change as the zone works: those it may also UPDATE and DELETE.

``service_grants`` is a pure function (the statements, for a test or an operator to read);
``grant_service_role`` runs them as the owner.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import make_url

from foundation.errors import SpecError

#: history (the ledger, the audit log, released DP query answers): the service appends and
#: reads, never rewrites
APPEND_ONLY = frozenset({"ledger_events", "audit_events", "query_releases"})
#: written once by the owner at init
READ_ONLY = frozenset({"zone_meta"})

_ROLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _role(name: str, field: str) -> str:
    if not _ROLE.match(name or ""):
        raise SpecError(
            field,
            "names a database role that is not a plain lower-case identifier",
            "use letters, digits and _ (e.g. sz_service)",
        )
    return f'"{name}"'


def privileges_for(table: str) -> str:
    if table in APPEND_ONLY:
        return "SELECT, INSERT"
    if table in READ_ONLY:
        return "SELECT"
    return "SELECT, INSERT, UPDATE, DELETE"


def service_grants(tables: Iterable[str], role: str, *, field: str = "role") -> list[str]:
    """The statements that give ``role`` exactly the service's rights on ``tables``."""
    q = _role(role, field)
    out = [
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {q}",
        f"REVOKE CREATE ON SCHEMA public FROM {q}",
        f"GRANT USAGE ON SCHEMA public TO {q}",
    ]
    for table in sorted(tables):
        if not _ROLE.match(table):
            raise SpecError("table", f"unexpected table name {table!r}", "check the schema")
        out.append(f'GRANT {privileges_for(table)} ON TABLE "{table}" TO {q}')
    # identity columns draw from sequences: inserting needs them
    out.append(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {q}")
    return out


def service_role_of(service_url: str, field: str = "--service-db-url") -> str:
    """The role a service URL logs in as."""
    try:
        url = make_url(service_url)
    except Exception:  # noqa: BLE001 - any parse failure is the same user error
        raise SpecError(field, "is not a database URL", "e.g. postgresql+psycopg://...") from None
    if url.get_backend_name() != "postgresql":
        raise SpecError(
            field,
            "least privilege needs PostgreSQL (SQLite has no roles)",
            "drop --service-db-url, or use a postgresql+psycopg:// URL for both",
        )
    if not url.username:
        raise SpecError(field, "names no user", "write postgresql+psycopg://ROLE:PASSWORD@host/db")
    _role(url.username, field)
    return url.username


def grant_service_role(owner: Engine, role: str, *, field: str = "--service-db-url") -> list[str]:
    """As the schema's owner, give ``role`` the service's rights; the statements run."""
    if owner.dialect.name != "postgresql":
        raise SpecError(
            "--db-url",
            "least privilege needs PostgreSQL (SQLite has no roles)",
            "use a postgresql+psycopg:// URL",
        )
    statements = service_grants(inspect(owner).get_table_names(), role, field=field)
    with owner.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))
    return statements
