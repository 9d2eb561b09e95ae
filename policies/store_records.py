"""The policy store's records: frozen dataclasses with a JSON-safe ``to_dict()``, and how each
is read from its table row.

``User``, ``DatasetRecord``, ``ProjectRecord``, ``AccessRequestRecord`` and ``GrantRecord`` are
what ``policies.store.StateStore`` returns (a dataset cap is ``policies.caps.DatasetCap``).
None of them carries a token hash; a dataset's storage path is never in its ``to_dict``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row

from foundation.errors import SpecError
from policies.caps import DatasetCap
from policies.decisions import GrantView, Mechanism, ProjectStatus, ProjectView, RequestState
from policies.roles import Role


def iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def json_dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


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
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
            "active": self.active,
        }


@dataclass(frozen=True)
class DatasetRecord:
    """A registered dataset. ``path`` is where ingest wrote it, for the record only (readers
    find the files from the zone's layout, ``Zone.version_dir``): it is never in
    ``to_dict``. ``rows``, ``persons`` and ``sites`` are counts taken from real rows: the
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
    #: which version of the dataset this is (re-ingesting a name adds one)
    version: int = 1
    #: the latest version's number (this record's, unless it is an older one)
    latest_version: int = 1

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
            "contract": json.loads(json_dumps(self.contract)),
            "rows": self.rows,
            "persons": self.persons,
            "sites": dict(self.sites),
            "cross_site_persons": self.cross_site_persons,
            "registered_by": self.registered_by,
            "created_at": iso(self.created_at),
            "version": self.version,
            "latest_version": self.latest_version,
        }

    def to_public_dict(self) -> dict[str, Any]:
        """What researchers and analysts see: the contract and the site names; the exact
        counts only when the contract declares them public (``counts = "public"``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "contract": json.loads(json_dumps(self.contract)),
            "site_names": sorted(self.sites),
            "counts": "public" if self.counts_public else "private",
            "version": self.version,
            "latest_version": self.latest_version,
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
            "created_at": iso(self.created_at),
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
    #: the dataset version asked for; None: the latest, whichever it is when a job runs
    dataset_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "columns": sorted(self.columns),
            "mechanisms": sorted(m.value for m in self.mechanisms),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "requested_by": self.requested_by,
            "state": self.state.value,
            "reason": self.reason,
            "decided_by": self.decided_by,
            "decided_at": iso(self.decided_at),
            "quote": None if self.quote is None else json.loads(json_dumps(self.quote)),
            "created_at": iso(self.created_at),
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
    #: the dataset version the grant is pinned to; None: it follows the latest
    dataset_version: int | None = None

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
            "dataset_version": self.dataset_version,
            "columns": sorted(self.columns),
            "mechanisms": sorted(m.value for m in self.mechanisms),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "expires_at": iso(self.expires_at),
            "granted_by": self.granted_by,
            "created_at": iso(self.created_at),
            "revoked_at": iso(self.revoked_at),
        }


def user_from_row(row: Row[Any]) -> User:
    return User(row.id, row.name, Role(row.role), row.created_at, row.revoked_at)


def dataset_from_row(row: Row[Any]) -> DatasetRecord:
    """A ``datasets`` row: the latest version's record."""
    return _dataset(row, row.name, int(row.version or 1), int(row.version or 1))


def version_from_row(row: Row[Any], latest: int) -> DatasetRecord:
    """One row of ``dataset_versions`` as the record of that version."""
    return _dataset(row, row.dataset, int(row.version), latest)


def _dataset(row: Row[Any], name: str, version: int, latest: int) -> DatasetRecord:
    return DatasetRecord(
        name=name,
        contract=json.loads(row.contract_json),
        path=row.path,
        rows=row.rows,
        persons=row.persons,
        sites=json.loads(row.sites_json),
        registered_by=row.registered_by,
        created_at=row.created_at,
        cross_site_persons=int(row.cross_site_persons or 0),
        version=version,
        latest_version=latest,
    )


def request_from_row(row: Row[Any], grant_id: str | None) -> AccessRequestRecord:
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
        dataset_version=row.dataset_version,
    )


def grant_from_row(row: Row[Any]) -> GrantRecord:
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
        dataset_version=row.dataset_version,
    )


def cap_from_row(row: Row[Any]) -> DatasetCap:
    return DatasetCap(row.dataset, row.epsilon, row.delta, row.set_by, row.set_at)
