"""The policy state store: users, datasets, projects, access requests and grants.

``StateStore(engine)`` persists the zone's governance state in the tables of ``policies.db``
(SQLite by default, PostgreSQL by URL; open the engine with ``privacy.sql.make_engine``).
Every call is one transaction; every record it returns is a frozen dataclass with a JSON-safe
``to_dict()`` (never a token hash, never a dataset's storage path).

The store keeps state consistent; it does not decide who may call it. The service checks the
caller's role (``policies.roles.require``) first; the store then enforces what the data
itself requires:

- names are unique (``SpecError`` naming ``name``); unknown names are ``NotFoundError``
  listing the known ones;
- people named as owners, members, requesters and deciders are active users;
- a new access request passes ``decisions.decide_access_request`` (the requester is a member
  of the active project, the columns are in the dataset's contract, the budget is sane);
- access requests move only along ``decisions.REQUEST_TRANSITIONS`` (pending -> approved or
  denied, once, checked inside the transaction, so two stewards cannot both decide);
- nobody approves their own request (separation of duties).

Auditing is the caller's: the service writes one audit event per call, allowed or not. A
caller that wants its change and its audit line in one transaction uses
``AuditLog.append_in``. Budgets live in the privacy ledger; a grant's epsilon and delta are
what the steward approved for it.

Time comes from ``clock`` (a callable returning an aware UTC datetime), so tests pass a
frozen one. Whether a grant has expired is decided by ``decide_job_access(now=...)``, not
here.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Connection, Engine, Row, exists, inspect, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from connectors.errors import AuthError, NotFoundError, PolicyDenied, SpecError
from policies.db import (
    access_requests,
    create_schema,
    dataset_caps,
    datasets,
    grants,
    project_members,
    projects,
    users,
)
from policies.decisions import (
    STEWARD,
    CapDecision,
    DatasetCap,
    GrantView,
    KeySpend,
    Mechanism,
    NewAccessRequest,
    NewGrant,
    ProjectStatus,
    ProjectView,
    RequestState,
    WorstCase,
    check_budget,
    check_project_transition,
    check_request_transition,
    decide_access_request,
    decide_dataset_cap,
    key_spends,
    parse_mechanisms,
    person_worst_case,
)
from policies.identity import hash_token, looks_like_token, new_token, token_matches
from policies.roles import ROLE_GRANTOR, Role
from privacy.ledger import BudgetKey, EventKind, LedgerEvent, ledger_events
from privacy.sql import lock_key

AUTH_FAILED = "unknown or revoked token; ask an operator for a new one"
#: names people type (users, datasets, projects): safe in ids, paths and URLs
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
#: how many known names a NotFoundError lists before "..."
KNOWN_NAMES_SHOWN = 20


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise SpecError(
            field,
            "must be 1-64 letters, digits, '_', '.', '@' or '-', starting with a letter or digit",
            "e.g. cohort-2026",
        )
    return value


def _check_text(field: str, value: object, fix: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(field, "is empty", fix)
    return value.strip()


def _check_count(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(field, "must be a whole number of at least 0", f"pass the {field} count")
    return value


def _check_aware(field: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise SpecError(
            field, "must be a timezone-aware datetime", "e.g. datetime(2026, 6, 30, tzinfo=UTC)"
        )
    return value.astimezone(UTC)


def _known(names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return "(none yet)"
    shown = ", ".join(names[:KNOWN_NAMES_SHOWN])
    return shown + (", ..." if len(names) > KNOWN_NAMES_SHOWN else "")


def contract_columns(contract: Mapping[str, Any]) -> frozenset[str]:
    """Column names of a schema contract dict (``SchemaContract.to_dict()``).

    Accepts ``{"columns": {name: {...}}}`` (the contract's own form) and
    ``{"columns": [{"name": ...}, ...]}``.
    """
    cols = contract.get("columns") if isinstance(contract, Mapping) else None
    if isinstance(cols, Mapping):
        names = list(cols.keys())
    elif isinstance(cols, list | tuple):
        names = [c.get("name") if isinstance(c, Mapping) else None for c in cols]
    else:
        raise SpecError("contract", "has no columns", "pass SchemaContract.to_dict()")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise SpecError("contract", "has a column without a name", "name every column")
    if len(set(names)) != len(names):
        raise SpecError("contract", "names a column twice", "keep one entry per column")
    return frozenset(names)


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    """An identity. The token is shown once at creation; only its hash is stored, never here."""

    id: str
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role.value,
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at),
            "active": self.active,
        }


@dataclass(frozen=True)
class DatasetRecord:
    """A registered dataset. ``path`` is for ``connectors`` inside the zone only: it is never
    in ``to_dict``. ``rows``, ``persons`` and ``sites`` are counts taken from real rows: the
    steward's view (``to_dict``); researchers and analysts get ``to_public_dict``."""

    name: str
    contract: dict[str, Any]
    path: str
    rows: int
    persons: int
    sites: dict[str, int]
    registered_by: str
    created_at: datetime
    #: persons with rows at more than one site (ingest counts them; never who)
    cross_site_persons: int = 0

    @property
    def columns(self) -> frozenset[str]:
        return contract_columns(self.contract)

    @property
    def counts_public(self) -> bool:
        """The contract declares the exact sizes public (``[dataset] counts = "public"``)."""
        dataset = self.contract.get("dataset") or {}
        return isinstance(dataset, Mapping) and dataset.get("counts") == "public"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "contract": json.loads(_dumps(self.contract)),
            "rows": self.rows,
            "persons": self.persons,
            "sites": dict(self.sites),
            "cross_site_persons": self.cross_site_persons,
            "registered_by": self.registered_by,
            "created_at": _iso(self.created_at),
        }

    def to_public_dict(self) -> dict[str, Any]:
        """What researchers and analysts see: the contract and the site names; the exact
        counts only when the contract declares them public (``counts = "public"``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "contract": json.loads(_dumps(self.contract)),
            "site_names": sorted(self.sites),
            "counts": "public" if self.counts_public else "private",
        }
        if self.counts_public:
            out.update(rows=self.rows, persons=self.persons, sites=dict(self.sites))
        return out


@dataclass(frozen=True)
class ProjectRecord:
    name: str
    purpose: str
    owner: str
    status: ProjectStatus
    members: tuple[str, ...]
    created_at: datetime

    def view(self) -> ProjectView:
        return ProjectView(self.name, self.owner, frozenset(self.members), self.status)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "purpose": self.purpose,
            "owner": self.owner,
            "status": self.status.value,
            "members": list(self.members),
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True)
class AccessRequestRecord:
    """A project's request for access; ``grant_id`` is set once it is approved."""

    id: str
    project: str
    dataset: str
    columns: frozenset[str]
    mechanisms: frozenset[Mechanism]
    epsilon: float
    delta: float
    requested_by: str
    state: RequestState
    reason: str
    decided_by: str | None
    decided_at: datetime | None
    quote: dict[str, Any] | None
    created_at: datetime
    grant_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "dataset": self.dataset,
            "columns": sorted(self.columns),
            "mechanisms": sorted(m.value for m in self.mechanisms),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "requested_by": self.requested_by,
            "state": self.state.value,
            "reason": self.reason,
            "decided_by": self.decided_by,
            "decided_at": _iso(self.decided_at),
            "quote": None if self.quote is None else json.loads(_dumps(self.quote)),
            "created_at": _iso(self.created_at),
            "grant_id": self.grant_id,
        }


@dataclass(frozen=True)
class GrantRecord:
    """What a steward approved: columns, mechanisms, budget and expiry for one project and
    dataset. The budget itself is tracked by the privacy ledger."""

    id: str
    request_id: str
    project: str
    dataset: str
    columns: frozenset[str]
    mechanisms: frozenset[Mechanism]
    epsilon: float
    delta: float
    expires_at: datetime | None
    granted_by: str
    created_at: datetime
    revoked_at: datetime | None

    def view(self) -> GrantView:
        return GrantView(
            grant_id=self.id,
            project=self.project,
            dataset=self.dataset,
            columns=self.columns,
            mechanisms=self.mechanisms,
            epsilon=self.epsilon,
            delta=self.delta,
            expires_at=self.expires_at,
            revoked=self.revoked_at is not None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "project": self.project,
            "dataset": self.dataset,
            "columns": sorted(self.columns),
            "mechanisms": sorted(m.value for m in self.mechanisms),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "expires_at": _iso(self.expires_at),
            "granted_by": self.granted_by,
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at),
        }


def _user(row: Row[Any]) -> User:
    return User(row.id, row.name, Role(row.role), row.created_at, row.revoked_at)


def _dataset(row: Row[Any]) -> DatasetRecord:
    return DatasetRecord(
        name=row.name,
        contract=json.loads(row.contract_json),
        path=row.path,
        rows=row.rows,
        persons=row.persons,
        sites=json.loads(row.sites_json),
        registered_by=row.registered_by,
        created_at=row.created_at,
        cross_site_persons=int(row.cross_site_persons or 0),
    )


def _request(row: Row[Any], grant_id: str | None) -> AccessRequestRecord:
    return AccessRequestRecord(
        id=row.id,
        project=row.project,
        dataset=row.dataset,
        columns=frozenset(json.loads(row.columns_json)),
        mechanisms=frozenset(Mechanism(m) for m in json.loads(row.mechanisms_json)),
        epsilon=row.epsilon,
        delta=row.delta,
        requested_by=row.requested_by,
        state=RequestState(row.state),
        reason=row.reason,
        decided_by=row.decided_by,
        decided_at=row.decided_at,
        quote=None if row.quote_json is None else json.loads(row.quote_json),
        created_at=row.created_at,
        grant_id=grant_id,
    )


def _grant(row: Row[Any]) -> GrantRecord:
    return GrantRecord(
        id=row.id,
        request_id=row.request_id,
        project=row.project,
        dataset=row.dataset,
        columns=frozenset(json.loads(row.columns_json)),
        mechanisms=frozenset(Mechanism(m) for m in json.loads(row.mechanisms_json)),
        epsilon=row.epsilon,
        delta=row.delta,
        expires_at=row.expires_at,
        granted_by=row.granted_by,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _dataset_cap(row: Row[Any]) -> DatasetCap:
    return DatasetCap(row.dataset, row.epsilon, row.delta, row.set_by, row.set_at)


def _cap_lock(dataset: str) -> str:
    """The lock key serialising cap settings and approvals on ``dataset`` (PostgreSQL)."""
    return f"dataset-cap:{dataset}"


_REQUEST_WITH_GRANT = select(access_requests, grants.c.id.label("grant_id")).outerjoin(
    grants, grants.c.request_id == access_requests.c.id
)


class StateStore:
    """The policy state on ``engine``; creates its tables if they are missing."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = _utcnow) -> None:
        self.engine = engine
        self._clock = clock
        create_schema(engine)

    def create_schema(self) -> None:
        """Create the policy tables (idempotent; the constructor already did)."""
        create_schema(self.engine)

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise SpecError("clock", "returned a naive datetime", "return datetime.now(UTC)")
        return now.astimezone(UTC)

    @staticmethod
    def _new_id(conn: Connection, prefix: str, column: Column[Any]) -> str:
        """A short readable id (``req-1a2b3c4d``) not yet used in ``column``."""
        while True:
            candidate = f"{prefix}-{secrets.token_hex(4)}"
            if not conn.execute(select(exists().where(column == candidate))).scalar():
                return candidate

    # -- users --------------------------------------------------------------------------------

    def _user_row(self, conn: Connection, name: str) -> Row[Any] | None:
        return conn.execute(select(users).where(users.c.name == name)).first()

    def _one_user(self, conn: Connection, name: str) -> Row[Any]:
        row = self._user_row(conn, name)
        if row is None:
            raise NotFoundError(f"unknown user {name!r}; see the user list")
        return row

    def _active_user(self, conn: Connection, name: str, field: str) -> Row[Any]:
        row = self._user_row(conn, name) if isinstance(name, str) else None
        if row is None:
            raise NotFoundError(f"{field}: unknown user {name!r}; an operator adds users")
        if row.revoked_at is not None:
            raise PolicyDenied(
                f"{field}: user {name} is revoked",
                missing=(f"active account for {name}",),
                grantor=ROLE_GRANTOR,
            )
        return row

    def add_user(self, name: str, role: Role | str) -> tuple[User, str]:
        """Add a user; returns the user and their token (shown once, only its hash is kept)."""
        _check_name("name", name)
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
                if self._user_row(conn, name) is not None:
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
                row = self._one_user(conn, name)
        except DBIntegrityError:  # a concurrent add of the same name won the race
            raise taken from None
        return _user(row), token

    def authenticate(self, token: str) -> User:
        """The active user holding ``token``; ``AuthError`` for anything else."""
        if not looks_like_token(token):
            raise AuthError(AUTH_FAILED)
        digest = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.token_hash == digest)).first()
        if row is None or row.revoked_at is not None or not token_matches(token, row.token_hash):
            raise AuthError(AUTH_FAILED)
        return _user(row)

    def revoke_user(self, name: str) -> User:
        """Revoke ``name``'s token (idempotent: revoking twice keeps the first time)."""
        with self.engine.begin() as conn:
            if self._one_user(conn, name).revoked_at is None:
                conn.execute(
                    users.update().where(users.c.name == name).values(revoked_at=self._now())
                )
            return _user(self._one_user(conn, name))

    def reissue_token(self, name: str) -> tuple[User, str]:
        """A new token for ``name`` (the old one stops working; a revoked user is active again)."""
        token, token_hash = new_token()
        with self.engine.begin() as conn:
            self._one_user(conn, name)
            conn.execute(
                users.update()
                .where(users.c.name == name)
                .values(token_hash=token_hash, revoked_at=None)
            )
            return _user(self._one_user(conn, name)), token

    def get_user(self, name: str) -> User:
        with self.engine.connect() as conn:
            return _user(self._one_user(conn, name))

    def list_users(self) -> list[User]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.name)).all()
        return [_user(r) for r in rows]

    # -- datasets -----------------------------------------------------------------------------

    def _dataset_row(self, conn: Connection, name: str) -> Row[Any]:
        row = conn.execute(select(datasets).where(datasets.c.name == name)).first()
        if row is None:
            known = conn.execute(select(datasets.c.name)).scalars().all()
            raise NotFoundError(f"unknown dataset {name!r}; known datasets: {_known(known)}")
        return row

    def register_dataset(
        self,
        name: str,
        contract: Mapping[str, Any],
        path: str,
        rows: int,
        persons: int,
        sites: Mapping[str, int],
        by: str,
        cross_site_persons: int = 0,
    ) -> DatasetRecord:
        """Record an ingested dataset: its contract, where connectors find it, its counts."""
        _check_name("name", name)
        contract_columns(contract)
        _check_text("path", path, "pass the ingested dataset's folder")
        _check_count("rows", rows)
        _check_count("persons", persons)
        if persons > rows:
            raise SpecError("persons", "is more than rows", "count each person once")
        if not isinstance(sites, Mapping):
            raise SpecError("sites", "must map site names to row counts", "e.g. {'north': 1200}")
        for site, count in sites.items():
            if not isinstance(site, str) or not site:
                raise SpecError("sites", "has a site without a name", "name every site")
            _check_count(f"sites.{site}", count)
        _check_text("by", by, "pass the registering steward's name")
        try:
            contract_json = _dumps(contract)
        except (TypeError, ValueError):
            raise SpecError(
                "contract", "is not JSON-safe", "pass SchemaContract.to_dict()"
            ) from None
        taken = SpecError("name", f"dataset {name!r} is already registered", "pick another name")
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(exists().where(datasets.c.name == name))).scalar():
                    raise taken
                conn.execute(
                    datasets.insert().values(
                        name=name,
                        contract_json=contract_json,
                        path=path,
                        rows=rows,
                        persons=persons,
                        sites_json=_dumps(dict(sites)),
                        cross_site_persons=_check_count("cross_site_persons", cross_site_persons),
                        registered_by=by,
                        created_at=self._now(),
                    )
                )
                row = self._dataset_row(conn, name)
        except DBIntegrityError:
            raise taken from None
        return _dataset(row)

    def get_dataset(self, name: str) -> DatasetRecord:
        with self.engine.connect() as conn:
            return _dataset(self._dataset_row(conn, name))

    def list_datasets(self) -> list[DatasetRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(datasets).order_by(datasets.c.name)).all()
        return [_dataset(r) for r in rows]

    # -- projects -----------------------------------------------------------------------------

    def _project(self, conn: Connection, name: str) -> ProjectRecord:
        row = conn.execute(select(projects).where(projects.c.name == name)).first()
        if row is None:
            known = conn.execute(select(projects.c.name)).scalars().all()
            raise NotFoundError(f"unknown project {name!r}; known projects: {_known(known)}")
        members = (
            conn.execute(
                select(project_members.c.member)
                .where(project_members.c.project == name)
                .order_by(project_members.c.member)
            )
            .scalars()
            .all()
        )
        return ProjectRecord(
            row.name,
            row.purpose,
            row.owner,
            ProjectStatus(row.status),
            tuple(members),
            row.created_at,
        )

    def create_project(self, name: str, purpose: str, owner: str) -> ProjectRecord:
        """Create an active project; ``owner`` (an active user) becomes its first member."""
        _check_name("name", name)
        purpose = _check_text("purpose", purpose, "say in a sentence what the project is for")
        taken = SpecError("name", f"project {name!r} already exists", "pick another name")
        try:
            with self.engine.begin() as conn:
                self._active_user(conn, owner, "owner")
                if conn.execute(select(exists().where(projects.c.name == name))).scalar():
                    raise taken
                now = self._now()
                conn.execute(
                    projects.insert().values(
                        name=name,
                        purpose=purpose,
                        owner=owner,
                        status=ProjectStatus.ACTIVE.value,
                        created_at=now,
                    )
                )
                conn.execute(
                    project_members.insert().values(
                        project=name, member=owner, added_by=owner, added_at=now
                    )
                )
                return self._project(conn, name)
        except DBIntegrityError:
            raise taken from None

    def add_member(self, project: str, user: str, by: str) -> ProjectRecord:
        """Add an active user to an active project (adding a member twice changes nothing)."""
        with self.engine.begin() as conn:
            rec = self._project(conn, project)
            if rec.status != ProjectStatus.ACTIVE:
                raise PolicyDenied(
                    f"project {project} is {rec.status.value}; it takes no new members"
                )
            self._active_user(conn, user, "user")
            if user not in rec.members:
                conn.execute(
                    project_members.insert().values(
                        project=project, member=user, added_by=by, added_at=self._now()
                    )
                )
            return self._project(conn, project)

    def close_project(self, name: str) -> ProjectRecord:
        """Close an active project: it keeps its history and can run nothing more."""
        with self.engine.begin() as conn:
            rec = self._project(conn, name)
            check_project_transition(name, rec.status, ProjectStatus.CLOSED)
            conn.execute(
                projects.update()
                .where(projects.c.name == name)
                .values(status=ProjectStatus.CLOSED.value)
            )
            return self._project(conn, name)

    def get_project(self, name: str) -> ProjectRecord:
        with self.engine.connect() as conn:
            return self._project(conn, name)

    def list_projects(self, user: str | None = None) -> list[ProjectRecord]:
        """All projects, or those ``user`` is a member of."""
        query = select(projects.c.name).order_by(projects.c.name)
        if user is not None:
            query = query.where(
                projects.c.name.in_(
                    select(project_members.c.project).where(project_members.c.member == user)
                )
            )
        with self.engine.connect() as conn:
            names = conn.execute(query).scalars().all()
            return [self._project(conn, n) for n in names]

    def project_view(self, name: str) -> ProjectView:
        return self.get_project(name).view()

    # -- access requests and grants -------------------------------------------------------------

    def _request(self, conn: Connection, request_id: str) -> AccessRequestRecord:
        row = conn.execute(_REQUEST_WITH_GRANT.where(access_requests.c.id == request_id)).first()
        if row is None:
            raise NotFoundError(
                f"unknown access request {request_id!r}; list requests with `sandbox access list`"
            )
        return _request(row, row.grant_id)

    def request_access(
        self,
        project: str,
        dataset: str,
        columns: Iterable[str],
        mechanisms: Iterable[Mechanism | str],
        epsilon: float,
        delta: float,
        by: str,
        quote: Mapping[str, Any] | None = None,
    ) -> AccessRequestRecord:
        """File a pending request; ``decide_access_request`` must allow it first.

        ``quote`` is an optional JSON-safe estimate attached for the steward (e.g. what the
        planned jobs would spend by the accountant).
        """
        if isinstance(columns, str):
            raise SpecError("columns", "is a single string", "pass a list of column names")
        if isinstance(mechanisms, str):
            raise SpecError("mechanisms", "is a single string", "pass a list of mechanisms")
        cols = frozenset(columns)
        if not all(isinstance(c, str) for c in cols):
            raise SpecError("columns", "must be column names", "pass a list of strings")
        mechs = parse_mechanisms(mechanisms)
        quote_json = None
        if quote is not None:
            try:
                quote_json = _dumps(dict(quote))
            except (TypeError, ValueError):
                raise SpecError(
                    "quote", "is not JSON-safe", "use strings, numbers and lists"
                ) from None
        with self.engine.begin() as conn:
            view = self._project(conn, project).view()
            known = contract_columns(json.loads(self._dataset_row(conn, dataset).contract_json))
            requester = self._active_user(conn, by, "by")
            decision = decide_access_request(
                NewAccessRequest(
                    user=by,
                    role=Role(requester.role),
                    project=project,
                    dataset=dataset,
                    columns=cols,
                    mechanisms=mechs,
                    epsilon=epsilon,
                    delta=delta,
                ),
                view,
                known,
            )
            decision.raise_if_denied()
            request_id = self._new_id(conn, "req", access_requests.c.id)
            conn.execute(
                access_requests.insert().values(
                    id=request_id,
                    project=project,
                    dataset=dataset,
                    columns_json=_dumps(sorted(cols)),
                    mechanisms_json=_dumps(sorted(m.value for m in mechs)),
                    epsilon=float(epsilon),
                    delta=float(delta),
                    requested_by=by,
                    state=RequestState.PENDING.value,
                    reason="",
                    decided_by=None,
                    decided_at=None,
                    quote_json=quote_json,
                    created_at=self._now(),
                )
            )
            return self._request(conn, request_id)

    def get_request(self, request_id: str) -> AccessRequestRecord:
        with self.engine.connect() as conn:
            return self._request(conn, request_id)

    def list_requests(
        self, pending_only: bool = False, project: str | None = None
    ) -> list[AccessRequestRecord]:
        """Requests, oldest first; only pending ones, or one project's, if asked."""
        query = _REQUEST_WITH_GRANT.order_by(access_requests.c.created_at, access_requests.c.id)
        if pending_only:
            query = query.where(access_requests.c.state == RequestState.PENDING.value)
        if project is not None:
            query = query.where(access_requests.c.project == project)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_request(r, r.grant_id) for r in rows]

    def _decide(
        self, conn: Connection, request_id: str, target: RequestState, by: str, reason: str
    ) -> None:
        """Move a request to ``target`` (checked against the transition table, race-safe)."""
        current = self._request(conn, request_id)
        check_request_transition(request_id, current.state, target)
        done = conn.execute(
            access_requests.update()
            .where(access_requests.c.id == request_id)
            .where(access_requests.c.state == current.state.value)
            .values(state=target.value, decided_by=by, decided_at=self._now(), reason=reason)
        )
        if done.rowcount != 1:  # someone else decided it between our read and our write
            check_request_transition(request_id, self._request(conn, request_id).state, target)
            raise PolicyDenied(
                f"access request {request_id} changed while being decided; look again"
            )

    def approve(
        self,
        request_id: str,
        by: str,
        epsilon: float | None = None,
        delta: float | None = None,
        expires_at: datetime | None = None,
    ) -> GrantRecord:
        """Approve a pending request and create its grant.

        ``epsilon`` and ``delta`` default to what was requested; a different figure is what
        the grant gets, and the request's ``reason`` records both. ``expires_at`` (aware) ends
        the grant; ``None`` never expires (a past ``expires_at`` is stored as given: such a
        grant is never live; the service refuses it against its own clock). Nobody approves
        their own request. The grant must fit its dataset's zone-wide cap
        (``decide_dataset_cap`` over every grant on the dataset and the ledger's budgets on
        it, read in the transaction that writes the grant, so two approvals on one dataset
        cannot both squeeze under it): ``PolicyDenied`` otherwise.
        """
        expires = _check_aware("expires_at", expires_at)
        with self.engine.begin() as conn:
            self._active_user(conn, by, "by")
            req = self._request(conn, request_id)
            check_request_transition(request_id, req.state, RequestState.APPROVED)
            if by == req.requested_by:
                raise PolicyDenied(
                    f"{by} filed access request {request_id} and cannot also approve it",
                    missing=("approval by another data steward",),
                    grantor=STEWARD,
                )
            eps = req.epsilon if epsilon is None else epsilon
            dlt = req.delta if delta is None else delta
            problems = check_budget(eps, dlt)
            if problems:
                raise problems[0].to_error()
            changed = [
                f"{name} {got:g} (requested {asked:g})"
                for name, got, asked in (("epsilon", eps, req.epsilon), ("delta", dlt, req.delta))
                if float(got) != asked
            ]
            reason = "approved with " + ", ".join(changed) if changed else "approved as requested"
            # the dataset's zone-wide cap, checked in the transaction that writes the grant
            lock_key(conn, _cap_lock(req.dataset))
            self._cap_decision(conn, req, eps, dlt, self._now()).raise_if_denied()
            self._decide(conn, request_id, RequestState.APPROVED, by, reason)
            grant_id = self._new_id(conn, "grant", grants.c.id)
            conn.execute(
                grants.insert().values(
                    id=grant_id,
                    request_id=request_id,
                    project=req.project,
                    dataset=req.dataset,
                    columns_json=_dumps(sorted(req.columns)),
                    mechanisms_json=_dumps(sorted(m.value for m in req.mechanisms)),
                    epsilon=float(eps),
                    delta=float(dlt),
                    expires_at=expires,
                    granted_by=by,
                    created_at=self._now(),
                    revoked_at=None,
                )
            )
            return self._grant(conn, grant_id)

    def deny(self, request_id: str, by: str, reason: str) -> AccessRequestRecord:
        """Deny a pending request; ``reason`` tells the researcher what would be approved."""
        reason = _check_text("reason", reason, "say why, so the researcher can fix the request")
        with self.engine.begin() as conn:
            self._active_user(conn, by, "by")
            self._decide(conn, request_id, RequestState.DENIED, by, reason)
            return self._request(conn, request_id)

    def _grant(self, conn: Connection, grant_id: str) -> GrantRecord:
        row = conn.execute(select(grants).where(grants.c.id == grant_id)).first()
        if row is None:
            raise NotFoundError(
                f"unknown grant {grant_id!r}; list grants with `sandbox access list`"
            )
        return _grant(row)

    def get_grant(self, grant_id: str) -> GrantRecord:
        with self.engine.connect() as conn:
            return self._grant(conn, grant_id)

    def list_grants(
        self, project: str | None = None, dataset: str | None = None
    ) -> list[GrantRecord]:
        query = select(grants).order_by(grants.c.created_at, grants.c.id)
        if project is not None:
            query = query.where(grants.c.project == project)
        if dataset is not None:
            query = query.where(grants.c.dataset == dataset)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_grant(r) for r in rows]

    def revoke_grant(self, grant_id: str, by: str) -> GrantRecord:
        """Revoke a grant now (idempotent: revoking twice keeps the first time)."""
        with self.engine.begin() as conn:
            self._active_user(conn, by, "by")
            rec = self._grant(conn, grant_id)
            if rec.revoked_at is None:
                conn.execute(
                    grants.update().where(grants.c.id == grant_id).values(revoked_at=self._now())
                )
            return self._grant(conn, grant_id)

    def grants_for(self, project: str, dataset: str) -> list[GrantView]:
        """Every grant for ``project`` on ``dataset`` (expired and revoked ones included: the
        decision says which are live at its ``now``)."""
        return [g.view() for g in self.list_grants(project, dataset)]

    # -- zone-wide caps per dataset -------------------------------------------------------------

    def set_dataset_cap(
        self, dataset: str, epsilon: float, delta: float | None = None, *, by: str
    ) -> DatasetCap:
        """Set ``dataset``'s zone-wide cap: the most one person may be charged across every
        grant on it in every project (``worst_case``: live grants in full, expired and revoked
        ones by what the ledger shows they released). ``delta`` ``None`` caps epsilon only.
        The latest setting wins; earlier ones stay in ``dataset_cap_history``.

        A cap below the worst case already is accepted, not refused: the grants and their
        ledger budgets stay (taking them back is a revocation, a separate decision; spent
        loss cannot be taken back), and every new grant on the dataset is refused until the
        worst case is back under the cap. The caller reports the overshoot (``worst_case``).
        """
        if isinstance(epsilon, bool) or not (
            isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0
        ):
            raise SpecError("epsilon", "must be a finite number above 0", "e.g. --epsilon 5")
        if delta is not None and (
            isinstance(delta, bool)
            or not (isinstance(delta, int | float) and math.isfinite(delta) and 0 < delta < 1)
        ):
            raise SpecError(
                "delta", "must be above 0 and below 1", "e.g. --delta 1e-5, or leave it out"
            )
        with self.engine.begin() as conn:
            self._dataset_row(conn, dataset)
            self._active_user(conn, by, "by")
            lock_key(conn, _cap_lock(dataset))
            cap = DatasetCap(
                dataset, float(epsilon), None if delta is None else float(delta), by, self._now()
            )
            conn.execute(
                dataset_caps.insert().values(
                    dataset=cap.dataset,
                    epsilon=cap.epsilon,
                    delta=cap.delta,
                    set_by=cap.set_by,
                    set_at=cap.set_at,
                )
            )
        return cap

    def _cap(self, conn: Connection, dataset: str) -> DatasetCap | None:
        row = conn.execute(
            select(dataset_caps)
            .where(dataset_caps.c.dataset == dataset)
            .order_by(dataset_caps.c.seq.desc())
            .limit(1)
        ).first()
        return None if row is None else _dataset_cap(row)

    def dataset_cap(self, dataset: str) -> DatasetCap | None:
        """``dataset``'s current cap (the latest set), or ``None`` if none was ever set."""
        with self.engine.connect() as conn:
            self._dataset_row(conn, dataset)
            return self._cap(conn, dataset)

    def dataset_cap_history(self, dataset: str) -> list[DatasetCap]:
        """Every cap set on ``dataset``, oldest first (the last one is in force)."""
        with self.engine.connect() as conn:
            self._dataset_row(conn, dataset)
            rows = conn.execute(
                select(dataset_caps)
                .where(dataset_caps.c.dataset == dataset)
                .order_by(dataset_caps.c.seq)
            ).all()
        return [_dataset_cap(r) for r in rows]

    def dataset_grants(self, dataset: str) -> list[GrantView]:
        """Every grant on ``dataset`` in every project (expired and revoked ones included:
        ``decisions.person_worst_case`` says which are live at its ``now``)."""
        return [g.view() for g in self.list_grants(dataset=dataset)]

    @staticmethod
    def _dataset_ledger(conn: Connection, dataset: str) -> tuple[KeySpend, ...]:
        """The privacy ledger's budgets on ``dataset`` (every project and site), read in
        ``conn``: the ledger lives in this database (``Service`` opens both on one engine).
        A database without a ledger (a bare store) has spent nothing: no keys."""
        if not inspect(conn).has_table(ledger_events.name):
            return ()
        rows = conn.execute(
            select(ledger_events)
            .where(ledger_events.c.dataset == dataset)
            .order_by(ledger_events.c.seq)
        ).all()
        events = [
            LedgerEvent(
                seq=int(r.seq),
                event_id=r.event_id,
                kind=EventKind(r.kind),
                key=BudgetKey(r.project, r.dataset, r.site),
                epsilon=float(r.epsilon),
                delta=float(r.delta),
                reservation_id=r.reservation_id,
                job_id=r.job_id,
                actor=r.actor,
                at=r.at,
                note=r.note,
            )
            for r in rows
        ]
        return key_spends(events, dataset)

    def _dataset_charges(
        self, conn: Connection, dataset: str
    ) -> tuple[list[GrantView], tuple[KeySpend, ...]]:
        """Every grant ever made on ``dataset`` and the ledger's budgets on it."""
        rows = conn.execute(select(grants).where(grants.c.dataset == dataset)).all()
        return [_grant(r).view() for r in rows], self._dataset_ledger(conn, dataset)

    def worst_case(self, dataset: str, now: datetime | None = None) -> WorstCase:
        """One person of ``dataset``'s worst case at ``now`` (default: the store's clock)
        across every grant on it and the ledger's budgets (``decisions.person_worst_case``)."""
        checked = _check_aware("now", now)
        when = self._now() if checked is None else checked
        with self.engine.connect() as conn:
            self._dataset_row(conn, dataset)
            views, ledger = self._dataset_charges(conn, dataset)
        return person_worst_case(views, dataset, when, ledger)

    def _cap_decision(
        self,
        conn: Connection,
        req: AccessRequestRecord,
        epsilon: float,
        delta: float,
        now: datetime,
    ) -> CapDecision:
        views, ledger = self._dataset_charges(conn, req.dataset)
        return decide_dataset_cap(
            self._cap(conn, req.dataset),
            views,
            NewGrant(req.project, req.dataset, req.mechanisms, float(epsilon), float(delta)),
            now,
            ledger,
        )

    def cap_decision(
        self,
        request_id: str,
        epsilon: float | None = None,
        delta: float | None = None,
        now: datetime | None = None,
    ) -> CapDecision:
        """Would approving ``request_id`` (with these overrides, as ``approve`` takes them) fit
        its dataset's cap at ``now`` (default: the store's clock)? Reads only; ``approve``
        checks again in its own transaction. A request that is not pending, or overrides that
        are no budget, raise as ``approve`` would."""
        checked = _check_aware("now", now)
        when = self._now() if checked is None else checked
        with self.engine.connect() as conn:
            req = self._request(conn, request_id)
            check_request_transition(request_id, req.state, RequestState.APPROVED)
            eps = req.epsilon if epsilon is None else epsilon
            dlt = req.delta if delta is None else delta
            problems = check_budget(eps, dlt)
            if problems:
                raise problems[0].to_error()
            return self._cap_decision(conn, req, eps, dlt, when)
