"""A zone on disk: its state database, its data folder, its pseudonymisation secret.

Layout::

    ZONE/zone.toml        the zone's settings: its zone id and its state database URL
    ZONE/state.db         SQLite state (users, grants, ledger, audit, jobs) unless a URL says otherwise
    ZONE/secret.key       the HMAC key for pseudonyms (0600; never leaves the zone)
    ZONE/audit.key        the HMAC key of the audit chain (0600; never in the database)
    ZONE/data.key         wraps each dataset's own data key (0600; ``connectors.dataset_key``)
    ZONE/audit.head       the audit log's last line and MAC, signed with audit.key (0600),
                          and audit.head.lock, its writers' lock (``policies.audit``)
    ZONE/data/NAME/       governed Parquet, one folder per dataset (only connectors reads it)
    ZONE/jobs/ID/         a job's artefacts, released only through the release gate
    ZONE/engines/         Ray / Flower / SDV scratch, so the engines write nowhere else

A zone is one zone. ``zone.toml`` reads::

    zone_id = "zone-0123abcd..."      # random, drawn at `sandbox init`
    db_url = "sqlite:///state.db"     # a relative SQLite path is relative to the zone folder

* Paths in zone.toml are relative to the zone: the default database is written as
  ``sqlite:///state.db`` and opened as ``ZONE/state.db`` wherever the folder now is, so a
  zone moved with ``mv`` still works and a zone copied with ``cp -r`` opens its own copy of
  the database (a real copy, with its own audit chain). Datasets are found the same way:
  readers take a version's folder from the zone's layout (``Zone.version_dir``), not from
  the absolute path recorded at ingest. A ``--db-url`` given at ``init`` is
  written as given, except that a SQLite file inside the zone folder is written relative to
  it (and a relative SQLite path there is relative to the zone). A PostgreSQL URL stays a URL:
  that database is not in the folder, so a copy of the folder is the same zone on the same
  database.
* The zone id is stored both in zone.toml and in the state database (table ``zone_meta``,
  written at ``init``; ``policies.db.zone_meta``). ``Service`` checks them when it opens the
  database (``Zone.check_database``): a database that holds another zone's id, or no id, is
  refused with a ``SpecError`` on ``zone.toml db_url`` saying what would fix it. A zone.toml
  edited to point at another zone's database is therefore refused. A SQLite database named
  in zone.toml that does not exist is refused too, before it could be created empty.
* ``init`` refuses a database that already holds a zone id: one database, one zone.
* Zones made before zone ids (zone.toml has no ``zone_id``, the database no ``zone_meta``
  row) are adopted on first open, when the database is plainly this zone's: it is the
  ``state.db`` in this folder, or its ``zone.init`` audit event names this folder (a
  PostgreSQL or outside-the-folder SQLite zone that was not moved). Adopting writes a new id
  into the database and into zone.toml, and rewrites the default database path as a relative
  one. Any other old zone is refused with the fix to apply (a copied or moved old zone still
  points at the original's database by absolute path: set ``db_url = "sqlite:///state.db"``
  to use the folder's own copy, which is then adopted). An old PostgreSQL zone that was moved
  before its first open under this version is adopted by opening it once at its old path.
* ``audit.key`` is made at ``init``, never later: a key made afterwards could vouch for lines
  it never saw, so a zone without one is refused (``IntegrityError``) until it is restored.
  Whoever can read the zone folder holds the key and can rewrite the audit log and its head;
  that is why only the zone's service account may read the folder.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine, insert, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as SQLIntegrityError

from foundation.errors import IntegrityError, NotFoundError, SpecError

ZONE_FILE = "zone.toml"
DB_FILE = "state.db"
#: the default state database, relative to the zone folder
DEFAULT_DB_URL = f"sqlite:///{DB_FILE}"
SECRET_BYTES = 32
SECRET_FILE = "secret.key"
AUDIT_KEY_FILE = "audit.key"
AUDIT_HEAD_FILE = "audit.head"
DATA_KEY_FILE = "data.key"
#: the ``zone_meta`` key holding the zone id
ZONE_ID_KEY = "zone_id"
#: the field named by errors about the zone's database
DB_FIELD = f"{ZONE_FILE} db_url"
_OWN_DB_FIX = f'"{DEFAULT_DB_URL}" is the {DB_FILE} in this zone folder'


def new_zone_id() -> str:
    """A fresh random zone id (128 bits)."""
    return f"zone-{secrets.token_hex(16)}"


def _sqlite_file(url: str, field: str = DB_FIELD) -> str | None:
    """The file path of a file-backed SQLite URL, as written (maybe relative); else None."""
    try:
        u = make_url(url)
    except ArgumentError:
        raise SpecError(
            field,
            "is not a database URL",
            f'e.g. "{DEFAULT_DB_URL}" or "postgresql+psycopg://user@host/db"',
        ) from None
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return db


def resolve_db_url(setting: str, root: Path) -> str:
    """The URL to open: a relative SQLite path in zone.toml is relative to the zone ``root``."""
    path = _sqlite_file(setting)
    if path is None or Path(path).is_absolute():
        return setting
    return make_url(setting).set(database=str(root / path)).render_as_string(hide_password=False)


def stored_db_url(url: str, root: Path, field: str = DB_FIELD) -> str:
    """The URL to write to zone.toml: a SQLite file inside the zone becomes zone-relative."""
    path = _sqlite_file(url, field)
    if path is None or not Path(path).is_absolute():
        return url
    try:
        rel = Path(path).resolve().relative_to(root)
    except ValueError:
        return url  # outside the zone: stays absolute
    return make_url(url).set(database=rel.as_posix()).render_as_string(hide_password=False)


def shown_url(url: str) -> str:
    """A URL fit for a message (no password)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _toml_str(s: str) -> str:
    """A TOML basic string (quotes, backslashes and control characters escaped)."""
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _write_config(root: Path, zone_id: str, db_setting: str) -> None:
    """Write zone.toml whole (a temporary file, then an atomic rename)."""
    text = (
        "# this zone's identity; its state database holds the same id (table zone_meta)\n"
        f"zone_id = {_toml_str(zone_id)}\n"
        "# a relative SQLite path is relative to this folder\n"
        f"db_url = {_toml_str(db_setting)}\n"
    )
    tmp = root / f".{ZONE_FILE}.{secrets.token_hex(4)}.tmp"
    tmp.write_text(text)
    os.replace(tmp, root / ZONE_FILE)


def _write_new_key(path: Path) -> None:
    """Draw a fresh key into ``path``: mode 0600 from the start, never over an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(SECRET_BYTES))


def _ensure_meta_table(engine: Engine) -> None:
    from policies.db import zone_meta

    try:
        zone_meta.create(engine, checkfirst=True)
    except SQLAlchemyError:
        # another process created it between the check and the CREATE
        if not inspect(engine).has_table(zone_meta.name):
            raise


def db_zone_id(engine: Engine) -> str | None:
    """The zone id the database holds, or None (no ``zone_meta`` table, or no id in it)."""
    from policies.db import zone_meta

    if not inspect(engine).has_table(zone_meta.name):
        return None
    with engine.connect() as conn:
        row = conn.execute(select(zone_meta.c.value).where(zone_meta.c.key == ZONE_ID_KEY)).first()
    return None if row is None else str(row[0])


def claim_database(engine: Engine, zone_id: str) -> str:
    """Write ``zone_id`` into the database unless it holds one; returns the id it holds."""
    from policies.db import zone_meta

    _ensure_meta_table(engine)
    try:
        with engine.begin() as conn:
            row = conn.execute(
                select(zone_meta.c.value).where(zone_meta.c.key == ZONE_ID_KEY)
            ).first()
            if row is not None:
                return str(row[0])
            conn.execute(insert(zone_meta).values(key=ZONE_ID_KEY, value=zone_id))
            return zone_id
    except SQLIntegrityError:
        # a concurrent claim won the race: the database holds its id
        held = db_zone_id(engine)
        if held is None:  # pragma: no cover - the winner's row cannot vanish
            raise
        return held


def _init_target(engine: Engine) -> str | None:
    """The folder named by the database's ``zone.init`` audit event, if it has one."""
    from policies.db import audit_events

    try:
        if not inspect(engine).has_table(audit_events.name):
            return None
        with engine.connect() as conn:
            row = conn.execute(
                select(audit_events.c.target)
                .where(audit_events.c.action == "zone.init")
                .order_by(audit_events.c.seq)
                .limit(1)
            ).first()
    except SQLAlchemyError:
        return None
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class Zone:
    root: Path
    #: the URL to open (a zone-relative SQLite path already resolved against ``root``)
    db_url: str
    #: the id in zone.toml; "" for a zone made before zone ids, until it is adopted
    zone_id: str = ""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def dataset_dir(self, name: str) -> Path:
        return self.data_dir / name

    def version_dir(self, name: str, version: int) -> Path:
        """Where a dataset version's governed file and data key live: ``data/NAME`` for the
        first, ``data/NAME.vN`` after. Readers take it from here, not from the path stored
        at ingest, so a zone moved with ``mv`` still finds its data."""
        return self.dataset_dir(name if version == 1 else f"{name}.v{version}")

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def secret(self) -> bytes:
        return (self.root / SECRET_FILE).read_bytes()

    def audit_key(self) -> bytes:
        """The audit chain's HMAC key (``ZONE/audit.key``, made at ``init``)."""
        path = self.root / AUDIT_KEY_FILE
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"{path}: the audit key is missing, so the audit log can be neither verified "
                "nor extended; restore the file from this zone's backup (a new key cannot "
                "vouch for the lines already written)"
            ) from None
        if len(key) != SECRET_BYTES:
            raise IntegrityError(
                f"{path}: the audit key is {len(key)} bytes, not {SECRET_BYTES}; restore the "
                "file from this zone's backup"
            )
        return key

    def data_key_file(self) -> Path:
        """The file of the key that wraps every dataset's data key (encryption at rest).

        Made at ``init``; a zone made before encryption at rest gets it at its first ingest
        (unlike ``audit.key``, a key drawn late vouches for nothing: it wraps only the data
        keys drawn after it, and older datasets stay plain Parquet).
        """
        path = self.root / DATA_KEY_FILE
        try:
            _write_new_key(path)
        except FileExistsError:
            pass  # the usual case; O_EXCL also settles two first ingests racing
        return path

    @property
    def audit_head_path(self) -> Path:
        """The audit log's head file (``policies.audit_head``)."""
        return self.root / AUDIT_HEAD_FILE

    @property
    def own_db_path(self) -> Path:
        """The zone's default database file, ``ZONE/state.db``."""
        return self.root / DB_FILE

    def _is_own_db(self) -> bool:
        path = _sqlite_file(self.db_url)
        return path is not None and Path(path).resolve() == self.own_db_path

    def _fix(self) -> str:
        if not self._is_own_db() and self.own_db_path.exists():
            return (
                "if this zone was copied or moved, point db_url at its own database: " + _OWN_DB_FIX
            )
        return "point db_url at this zone's own database"

    @classmethod
    def open(cls, root: Path) -> Zone:
        root = root.resolve()
        cfg = root / ZONE_FILE
        if not cfg.exists():
            raise NotFoundError(f"no zone at {root}; run `sandbox init --zone {root}` first")
        try:
            data = tomllib.loads(cfg.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(ZONE_FILE, f"is not valid TOML ({exc})", "fix or restore it") from None
        setting = data.get("db_url")
        if not isinstance(setting, str) or not setting:
            raise SpecError(DB_FIELD, "is missing", f'add db_url = "{DEFAULT_DB_URL}"')
        zone_id = data.get("zone_id", "")
        if not isinstance(zone_id, str):
            raise SpecError(f"{ZONE_FILE} zone_id", "must be a string", "restore it")
        zone = cls(root=root, db_url=resolve_db_url(setting, root), zone_id=zone_id)
        path = _sqlite_file(zone.db_url)
        if path is not None and not Path(path).exists():
            # opening it would create an empty database there (maybe in another zone)
            raise SpecError(DB_FIELD, f"the database {path} does not exist", zone._fix())
        return zone

    @classmethod
    def create(cls, root: Path, db_url: str | None = None) -> Zone:
        """Make the zone's folders, keys and zone.toml, and write its id into its database."""
        from foundation.sql import make_engine

        root = root.resolve()
        if (root / ZONE_FILE).exists():
            raise SpecError("--zone", f"a zone already exists at {root}", "pick another folder")
        setting = stored_db_url(db_url or DEFAULT_DB_URL, root, field="--db-url")
        zone = cls(root=root, db_url=resolve_db_url(setting, root), zone_id=new_zone_id())
        for sub in ("data", "jobs", "engines"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        engine = make_engine(zone.db_url)
        try:
            held = claim_database(engine, zone.zone_id)
        finally:
            engine.dispose()
        if held != zone.zone_id:
            raise SpecError(
                "--db-url",
                f"the database {shown_url(zone.db_url)} already belongs to zone {held}",
                "one database holds one zone: pick another database or folder",
            )
        _write_new_key(root / SECRET_FILE)
        _write_new_key(root / AUDIT_KEY_FILE)
        _write_new_key(root / DATA_KEY_FILE)
        _write_config(root, zone.zone_id, setting)
        return zone

    def use_db_url(self, url: str) -> Zone:
        """The zone, opened from now on with ``url`` (written to zone.toml)."""
        setting = stored_db_url(url, self.root, field="--service-db-url")
        _write_config(self.root, self.zone_id, setting)
        return replace(self, db_url=resolve_db_url(setting, self.root))

    def check_database(self, engine: Engine) -> Zone:
        """Refuse a database that is not this zone's; returns the zone (adopted if it was old).

        ``engine`` is open on ``self.db_url``. See the module docstring for the rules.
        """
        held = db_zone_id(engine)
        shown = shown_url(self.db_url)
        if self.zone_id:
            if held == self.zone_id:
                return self
            if held is None:
                problem = f"the database {shown} holds no zone id, so it is not zone {self.zone_id}"
            else:
                problem = f"the database {shown} belongs to zone {held}, not to zone {self.zone_id}"
            raise SpecError(DB_FIELD, problem, self._fix())
        # a zone made before zone ids: its zone.toml names none
        if held is not None:
            raise SpecError(
                DB_FIELD,
                f"the database {shown} belongs to zone {held} but {ZONE_FILE} names no zone_id",
                self._fix(),
            )
        if not (self._is_own_db() or _init_target(engine) == str(self.root)):
            raise SpecError(
                DB_FIELD,
                f"the database {shown} was not made for this zone ({self.root}) and holds no "
                "zone id",
                self._fix(),
            )
        zone_id = claim_database(engine, new_zone_id())
        setting = DEFAULT_DB_URL if self._is_own_db() else stored_db_url(self.db_url, self.root)
        _write_config(self.root, zone_id, setting)
        return replace(self, zone_id=zone_id)
