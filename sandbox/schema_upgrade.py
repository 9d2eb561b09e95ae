"""Upgrading a zone in place (Alembic).

``sandbox init`` creates the whole schema at once and stamps it with the newest revision
(``stamp_head``). A zone made by an older version is refused when it opens
(``sandbox.schema_version.check_current``), and ``sandbox upgrade`` runs the missing
migrations (``sandbox/migrations/versions``) as the database's owner. Zones made before
migrations existed carry no ``alembic_version`` table: they are the first revision's schema,
stamped so before the upgrade runs.

With least privilege (PostgreSQL) the service's role cannot run DDL: the upgrade is given the
owner's URL and re-grants the service role its rights on the tables the migrations added.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from foundation.errors import IntegrityError, SpecError
from sandbox.schema_version import BASELINE, HEAD, VERSION_TABLE, current

#: the folder Alembic reads (env.py and versions/)
SCRIPTS = Path(__file__).resolve().parent / "migrations"


def _config(connection: object | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def script_head() -> str | None:
    """The newest revision as Alembic reads it from the migrations (``HEAD`` must match)."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def stamp_head(engine: Engine) -> None:
    """Mark a schema ``sandbox init`` just created whole as the newest revision."""
    with engine.begin() as conn:
        command.stamp(_config(conn), HEAD)


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
    return before, HEAD
