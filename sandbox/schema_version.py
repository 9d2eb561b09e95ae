"""The state database's schema revision, checked each time a zone opens.

``sandbox init`` stamps a new zone with :data:`HEAD`; a zone whose database holds another
revision is refused (``check_current``: the message says which command upgrades it).
Upgrading is Alembic's work (``sandbox.schema_upgrade``); this check needs only SQLAlchemy,
so that a CLI command, which opens the zone once, does not import Alembic (about 0.1 s of
every call). ``tests/sandbox/test_schema_upgrade.py`` checks that :data:`HEAD` is the newest
revision in ``sandbox/migrations/versions``.
"""

from __future__ import annotations

from sqlalchemy import Engine, inspect, text

from foundation.errors import SpecError

#: the newest revision (a new migration moves it: the test above fails until it does)
HEAD = "0005"
#: the revision a zone made before migrations holds (its tables are that revision's)
BASELINE = "0001"
VERSION_TABLE = "alembic_version"


def current(engine: Engine) -> str | None:
    """The database's revision; None when it holds no zone tables at all."""
    names = set(inspect(engine).get_table_names())
    if VERSION_TABLE not in names:
        return BASELINE if "zone_meta" in names else None
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
    return None if row is None else str(row[0])


def check_current(engine: Engine) -> None:
    """Refuse a database whose schema is older (or newer) than this version's."""
    have = current(engine)
    if have == HEAD or have is None:
        return
    raise SpecError(
        "zone.toml db_url",
        f"the zone's database has schema revision {have}; this version needs {HEAD}",
        "run `sandbox upgrade --zone ZONE` (with --db-url OWNER_URL where the service runs "
        "as a least-privilege role)"
        if have < HEAD
        else "use the version of sandbox that made this zone",
    )
