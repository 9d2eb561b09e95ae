"""The policy store's tables (SQLAlchemy Core), on SQLite or PostgreSQL.

Open the engine with ``foundation.sql.make_engine`` and call ``create_schema(engine)`` (safe to
call again). Every timestamp column is ``UTCDateTime``: it refuses naive datetimes on the
way in and hands back timezone-aware UTC ones on the way out, on both databases.

Names (users, datasets, projects) are the keys people type, so they are the primary or
unique keys; requests and grants get short readable ids (``req-1a2b3c4d``).
JSON columns are text holding canonical JSON (``json.dumps(..., sort_keys=True)``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from foundation.errors import SpecError

#: names people type: users, datasets, projects
NAME_LEN = 64
#: readable ids: "req-1a2b3c4d", "grant-1a2b3c4d", "user-1a2b3c4d"
ID_LEN = 32
#: sha256 hex digests
HASH_LEN = 64


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise SpecError(
                "timestamp",
                f"{value.isoformat()} has no timezone",
                "pass an aware datetime, e.g. datetime(2026, 1, 31, tzinfo=UTC)",
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):  # pragma: no cover - drivers give datetimes
            value = datetime.fromisoformat(str(value))
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(ID_LEN), primary_key=True),
    Column("name", String(NAME_LEN), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("token_hash", String(HASH_LEN), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

#: how each user logs in beyond the token (``policies.store_logins``): when the token
#: expires, and their TOTP secret (sealed with a key from the zone's secret, never in clear),
#: confirmed or pending, with the last time step accepted (a code is never accepted twice).
#: No row: a user made before token expiry, whose token does not expire.
user_logins = Table(
    "user_logins",
    metadata,
    Column("name", String(NAME_LEN), ForeignKey("users.name"), primary_key=True),
    Column("token_expires_at", UTCDateTime, nullable=True),
    Column("totp_sealed", Text, nullable=True),
    Column("totp_confirmed_at", UTCDateTime, nullable=True),
    Column("totp_last_step", BigInteger, nullable=True),
)


def _ingest_columns() -> list[Column[Any]]:
    """What one ingest recorded (a dataset's latest version, and each version's own row):
    new Column objects per call, since a Column belongs to one table."""
    return [
        Column("contract_json", Text, nullable=False),
        Column("path", Text, nullable=False),
        Column("rows", BigInteger, nullable=False),
        Column("persons", BigInteger, nullable=False),
        Column("sites_json", Text, nullable=False),
        # persons with rows at more than one site (federated per-site budgets refuse them)
        Column("cross_site_persons", BigInteger, nullable=False, server_default="0"),
        Column("registered_by", String(NAME_LEN), nullable=False),
        Column("created_at", UTCDateTime, nullable=False),
    ]


datasets = Table(
    "datasets",
    metadata,
    Column("name", String(NAME_LEN), primary_key=True),
    *_ingest_columns(),
    # the latest version's number: the row above describes it (``dataset_versions`` holds all)
    Column("version", Integer, nullable=False, server_default="1"),
)

# Every version of a dataset, the latest included: re-ingesting a name adds one. An old
# version stays readable (jobs and grants pinned to it) until a steward deletes it, which
# fills ``deleted_by``/``deleted_at`` (its files and key go; its row stays, as history).
dataset_versions = Table(
    "dataset_versions",
    metadata,
    Column("dataset", String(NAME_LEN), ForeignKey("datasets.name"), primary_key=True),
    Column("version", Integer, primary_key=True),
    *_ingest_columns(),
    Column("deleted_by", String(NAME_LEN), nullable=True),
    Column("deleted_at", UTCDateTime, nullable=True),
)

# A deleted dataset keeps its ``datasets`` row (grants, requests, caps and the ledger name it)
# and gets one row here: every read of a live dataset skips it (``policies.store_datasets``).
dataset_deletions = Table(
    "dataset_deletions",
    metadata,
    Column("dataset", String(NAME_LEN), ForeignKey("datasets.name"), primary_key=True),
    Column("deleted_by", String(NAME_LEN), nullable=False),
    Column("deleted_at", UTCDateTime, nullable=False),
)

projects = Table(
    "projects",
    metadata,
    Column("name", String(NAME_LEN), primary_key=True),
    Column("purpose", Text, nullable=False),
    Column("owner", String(NAME_LEN), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

project_members = Table(
    "project_members",
    metadata,
    Column("project", String(NAME_LEN), ForeignKey("projects.name"), primary_key=True),
    Column("member", String(NAME_LEN), primary_key=True),
    Column("added_by", String(NAME_LEN), nullable=False),
    Column("added_at", UTCDateTime, nullable=False),
    Index("ix_project_members_member", "member"),
)

access_requests = Table(
    "access_requests",
    metadata,
    Column("id", String(ID_LEN), primary_key=True),
    Column("project", String(NAME_LEN), ForeignKey("projects.name"), nullable=False),
    Column("dataset", String(NAME_LEN), ForeignKey("datasets.name"), nullable=False),
    Column("columns_json", Text, nullable=False),
    Column("mechanisms_json", Text, nullable=False),
    Column("epsilon", Double, nullable=False),
    Column("delta", Double, nullable=False),
    Column("requested_by", String(NAME_LEN), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("decided_by", String(NAME_LEN), nullable=True),
    Column("decided_at", UTCDateTime, nullable=True),
    Column("quote_json", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # the dataset version asked for; None: whichever is the latest when a job runs
    Column("dataset_version", Integer, nullable=True),
    Index("ix_access_requests_state", "state"),
    Index("ix_access_requests_project", "project"),
)

grants = Table(
    "grants",
    metadata,
    Column("id", String(ID_LEN), primary_key=True),
    Column("request_id", String(ID_LEN), ForeignKey("access_requests.id"), nullable=False),
    Column("project", String(NAME_LEN), ForeignKey("projects.name"), nullable=False),
    Column("dataset", String(NAME_LEN), ForeignKey("datasets.name"), nullable=False),
    Column("columns_json", Text, nullable=False),
    Column("mechanisms_json", Text, nullable=False),
    Column("epsilon", Double, nullable=False),
    Column("delta", Double, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("granted_by", String(NAME_LEN), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    # the dataset version the grant is pinned to; None: it follows the latest
    Column("dataset_version", Integer, nullable=True),
    UniqueConstraint("request_id", name="uq_grants_request_id"),  # one grant per approval
    Index("ix_grants_project_dataset", "project", "dataset"),
)

#: every zone-wide cap a steward set on a dataset (one person's epsilon, and optionally delta,
#: summed over the live grants of every project); rows are only ever inserted and the latest
#: (highest ``seq``) is the dataset's cap
dataset_caps = Table(
    "dataset_caps",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("dataset", String(NAME_LEN), ForeignKey("datasets.name"), nullable=False),
    Column("epsilon", Double, nullable=False),
    Column("delta", Double, nullable=True),
    Column("set_by", String(NAME_LEN), nullable=False),
    Column("set_at", UTCDateTime, nullable=False),
    Index("ix_dataset_caps_dataset", "dataset"),
)

#: the hash-chained audit log (``policies.audit``); rows are only ever inserted
audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(NAME_LEN * 2), nullable=False),
    Column("action", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("target", Text, nullable=False),
    Column("details_json", Text, nullable=False),
    Column("prev_hash", String(HASH_LEN), nullable=False),
    Column("hash", String(HASH_LEN), nullable=False, unique=True),
    Index("ix_audit_events_actor", "actor"),
    Index("ix_audit_events_action", "action"),
)


def create_schema(engine: Engine) -> None:
    """Create every policy table that does not exist yet; safe to call any number of times."""
    metadata.create_all(engine, checkfirst=True)


#: which zone this database belongs to (``zone_id``, written at ``sandbox init``); a zone whose
#: zone.toml names another id refuses to open it (``sandbox.zone``)
zone_meta = Table(
    "zone_meta",
    metadata,
    Column("key", String(NAME_LEN), primary_key=True),
    Column("value", Text, nullable=False),
)
