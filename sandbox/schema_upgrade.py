"""The state database's schema version, and upgrading a zone in place (Alembic).

``sandbox init`` creates the whole schema at once and stamps it with the newest revision. A
zone made by an older version is refused when it opens (``check_current``: the message says
which command upgrades it), and ``sandbox upgrade`` runs the missing migrations
(``sandbox/migrations/versions``) as the database's owner. Zones made before migrations
existed carry no ``alembic_version`` table: they are the first revision's schema, stamped so
before the upgrade runs.

With least privilege (PostgreSQL) the service's role cannot run DDL: the upgrade is given the
owner's URL and re-grants the service role its rights on the tables the migrations added.
"""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from foundation.errors import IntegrityError, SpecError

#: the folder Alembic reads (env.py and versions/)
SCRIPTS = Path(__file__).resolve().parent / "migrations"
#: the revision a zone made before migrations holds (its tables are that revision's)
BASELINE = "0001"
VERSION_TABLE = "alembic_version"


def _config(connection: object | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    """The newest revision (read from the migrations once per process: every open checks it)."""
    found = ScriptDirectory.from_config(_config()).get_current_head()
    assert found is not None, "no migrations"
    return found


def current(engine: Engine) -> str | None:
    """The database's revision; None when it holds no zone tables at all."""
    names = set(inspect(engine).get_table_names())
    if VERSION_TABLE not in names:
        return BASELINE if "zone_meta" in names else None
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
    return None if row is None else str(row[0])


def stamp_head(engine: Engine) -> None:
    """Mark a schema ``sandbox init`` just created whole as the newest revision."""
    with engine.begin() as conn:
        command.stamp(_config(conn), head())


def check_current(engine: Engine) -> None:
    """Refuse a database whose schema is older (or newer) than this version's."""
    have, want = current(engine), head()
    if have == want or have is None:
        return
    raise SpecError(
        "zone.toml db_url",
        f"the zone's database has schema revision {have}; this version needs {want}",
        "run `sandbox upgrade --zone ZONE` (with --db-url OWNER_URL where the service runs "
        "as a least-privilege role)"
        if have < want
        else "use the version of sandbox that made this zone",
    )


def upgrade(engine: Engine) -> tuple[str, str]:
    """Run the missing migrations; (revision before, revision after)."""
    before = current(engine)
    if before is None:
        raise SpecError("--zone", "its database holds no zone", "run `sandbox init` first")
    try:
        with engine.begin() as conn:
            cfg = _config(conn)
            if not inspect(conn).has_table(VERSION_TABLE):
                command.stamp(cfg, BASELINE)
            command.upgrade(cfg, "head")
    except SQLAlchemyError as exc:
        # one transaction: on PostgreSQL nothing of it stays; the database's own words
        # name tables and columns, never rows
        raise IntegrityError(
            f"the upgrade from {before} failed ({type(getattr(exc, 'orig', None) or exc).__name__}); the "
            f"database's schema is not what revision {before} should be: restore it from a "
            "backup or ask for help"
        ) from None
    return before, head()
