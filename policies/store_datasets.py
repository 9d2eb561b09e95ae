"""The store's datasets: register an ingested dataset, read one, list them, mark one deleted.

Versions: re-ingesting a live dataset's name adds a version (``add_dataset_version``). The
``datasets`` row always describes the latest; ``dataset_versions`` holds every version, the
latest included, so a job or grant pinned to an older one reads its own files and contract
(``get_dataset(name, version=N)``) until a steward deletes that version.

A dataset's row holds its schema contract, where ``connectors`` find it inside the zone, and
its counts (rows, persons, rows per site, persons at more than one site), taken at ingest.

A deleted dataset keeps its row (requests, grants, caps and the ledger name it, and its name
is never given to another dataset, so that history stays unambiguous) and gets a row in
``dataset_deletions``. Reads are of live datasets unless they ask for deleted ones too: a
lookup by name (and so every new request, grant, cap or job) is refused with
``NotFoundError``, and lists leave it out; only views of past jobs pass
``include_deleted=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Row, exists, select, update
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from foundation.errors import NotFoundError, SpecError
from policies.db import dataset_deletions, dataset_versions, datasets
from policies.store_base import StoreBase, check_count, check_name, check_text, known_names
from policies.store_records import (
    DatasetRecord,
    contract_columns,
    dataset_from_row,
    json_dumps,
    version_from_row,
)


def _deleted(conn: Connection, name: str) -> bool:
    return bool(conn.execute(select(exists().where(dataset_deletions.c.dataset == name))).scalar())


def dataset_row(conn: Connection, name: str, *, include_deleted: bool = False) -> Row[Any]:
    row = conn.execute(select(datasets).where(datasets.c.name == name)).first()
    if row is None:
        live = select(datasets.c.name).where(
            ~exists().where(dataset_deletions.c.dataset == datasets.c.name)
        )
        known = conn.execute(live).scalars().all()
        raise NotFoundError(f"unknown dataset {name!r}; known datasets: {known_names(known)}")
    if not include_deleted and _deleted(conn, name):
        raise NotFoundError(f"dataset {name!r} was deleted; its history stays")
    return row


def version_row(
    conn: Connection, name: str, version: object, *, include_deleted: bool = False
) -> Row[Any]:
    """A live version of a live dataset (``NotFoundError`` naming the versions there are;
    ``include_deleted``: a deleted dataset's or version's row too)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SpecError("dataset_version", "must be a whole number of at least 1", "e.g. 2")
    latest = int(dataset_row(conn, name, include_deleted=include_deleted).version or 1)
    row = conn.execute(
        select(dataset_versions).where(
            dataset_versions.c.dataset == name, dataset_versions.c.version == version
        )
    ).first()
    if row is None:
        raise NotFoundError(
            f"dataset {name!r} has no version {version}; its versions are 1 to {latest}"
        )
    if row.deleted_at is not None and not include_deleted:
        raise NotFoundError(f"version {version} of dataset {name!r} was deleted")
    return row


class DatasetsMixin(StoreBase):
    """``StateStore``'s dataset methods (the ``datasets`` table)."""

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
        check_name("name", name)
        values = _version_values(contract, path, rows, persons, sites, by, cross_site_persons)
        taken = SpecError("name", f"dataset {name!r} is already registered", "pick another name")
        try:
            with self.engine.begin() as conn:
                if conn.execute(select(exists().where(datasets.c.name == name))).scalar():
                    raise taken
                conn.execute(
                    datasets.insert().values(name=name, created_at=self._now(), version=1, **values)
                )
                row = dataset_row(conn, name)
                _insert_version(conn, row)
        except DBIntegrityError:
            raise taken from None
        return dataset_from_row(row)

    def add_dataset_version(
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
        """Record a re-ingest of a live dataset as its next version, which becomes the
        latest; the earlier versions stay as they were (readable until deleted)."""
        values = _version_values(contract, path, rows, persons, sites, by, cross_site_persons)
        raced = SpecError(
            "NAME",
            f"dataset {name!r} was re-ingested by someone else at the same time",
            "look at `sandbox dataset show` and ingest again if still needed",
        )
        try:
            with self.engine.begin() as conn:
                current = dataset_row(conn, name)
                version = int(current.version or 1) + 1
                conn.execute(
                    update(datasets)
                    .where(datasets.c.name == name, datasets.c.version == current.version)
                    .values(created_at=self._now(), version=version, **values)
                )
                row = dataset_row(conn, name)
                if int(row.version) != version:  # another ingest of the name won the race
                    raise raced  # (the transaction rolls back)
                _insert_version(conn, row)
        except DBIntegrityError:
            raise raced from None
        return dataset_from_row(row)

    def get_dataset(
        self, name: str, *, version: int | None = None, include_deleted: bool = False
    ) -> DatasetRecord:
        """A live dataset's latest version, or the ``version`` named (``include_deleted``:
        a deleted dataset or version too, for views of past jobs)."""
        with self.engine.connect() as conn:
            row = dataset_row(conn, name, include_deleted=include_deleted)
            latest = int(row.version or 1)
            if version is None or version == latest:
                return dataset_from_row(row)
            found = version_row(conn, name, version, include_deleted=include_deleted)
        return version_from_row(found, latest)

    def list_dataset_versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a live dataset, oldest first: number, when, by whom, deleted."""
        with self.engine.connect() as conn:
            row = dataset_row(conn, name)
            found = conn.execute(
                select(dataset_versions)
                .where(dataset_versions.c.dataset == name)
                .order_by(dataset_versions.c.version)
            ).all()
        latest = int(row.version or 1)
        return [
            {
                "version": int(v.version),
                "latest": int(v.version) == latest,
                "registered_by": v.registered_by,
                "created_at": v.created_at,
                "deleted": v.deleted_at is not None,
            }
            for v in found
        ]

    def mark_version_deleted(self, name: str, version: int, by: str) -> DatasetRecord:
        """Mark an old version of a live dataset deleted (its row stays). The latest version
        is not deleted this way: the dataset itself is."""
        check_text("by", by, "pass the deleting steward's name")
        record = self.get_dataset(name, version=version)
        if record.version == record.latest_version:
            raise SpecError(
                "--version",
                f"version {version} is the latest of dataset {name!r}",
                "delete an older version, or the whole dataset (without --version)",
            )
        with self.engine.begin() as conn:
            done = conn.execute(
                update(dataset_versions)
                .where(
                    dataset_versions.c.dataset == name,
                    dataset_versions.c.version == version,
                    dataset_versions.c.deleted_at.is_(None),
                )
                .values(deleted_by=by, deleted_at=self._now())
            ).rowcount
        if not done:
            raise NotFoundError(f"version {version} of dataset {name!r} was deleted")
        return record

    def list_datasets(self) -> list[DatasetRecord]:
        """The live datasets (a deleted one is left out)."""
        live = ~exists().where(dataset_deletions.c.dataset == datasets.c.name)
        with self.engine.connect() as conn:
            rows = conn.execute(select(datasets).where(live).order_by(datasets.c.name)).all()
        return [dataset_from_row(r) for r in rows]

    def is_dataset_deleted(self, name: str) -> bool:
        with self.engine.connect() as conn:
            return _deleted(conn, name)

    def mark_dataset_deleted(self, name: str, by: str) -> DatasetRecord:
        """Mark a live dataset deleted (its row stays); ``NotFoundError`` if it is not live."""
        check_text("by", by, "pass the deleting steward's name")
        try:
            with self.engine.begin() as conn:
                row = dataset_row(conn, name)
                conn.execute(
                    dataset_deletions.insert().values(
                        dataset=name, deleted_by=by, deleted_at=self._now()
                    )
                )
        except DBIntegrityError:
            # another steward's deletion committed first
            raise NotFoundError(f"dataset {name!r} was deleted; its history stays") from None
        return dataset_from_row(row)


def _insert_version(conn: Connection, row: Row[Any]) -> None:
    """The ``dataset_versions`` row of the version a ``datasets`` row now describes."""
    conn.execute(
        dataset_versions.insert().values(
            dataset=row.name,
            version=int(row.version or 1),
            contract_json=row.contract_json,
            path=row.path,
            rows=row.rows,
            persons=row.persons,
            sites_json=row.sites_json,
            cross_site_persons=row.cross_site_persons,
            registered_by=row.registered_by,
            created_at=row.created_at,
        )
    )


def _version_values(
    contract: Mapping[str, Any],
    path: str,
    rows: int,
    persons: int,
    sites: Mapping[str, int],
    by: str,
    cross_site_persons: int,
) -> dict[str, Any]:
    """One ingest's columns of a ``datasets`` row, checked (a new dataset or a version)."""
    contract_columns(contract)
    check_text("path", path, "pass the ingested dataset's folder")
    check_count("rows", rows)
    check_count("persons", persons)
    if persons > rows:
        raise SpecError("persons", "is more than rows", "count each person once")
    if not isinstance(sites, Mapping):
        raise SpecError("sites", "must map site names to row counts", "e.g. {'north': 1200}")
    for site, count in sites.items():
        if not isinstance(site, str) or not site:
            raise SpecError("sites", "has a site without a name", "name every site")
        check_count(f"sites.{site}", count)
    check_text("by", by, "pass the registering steward's name")
    try:
        contract_json = json_dumps(contract)
    except (TypeError, ValueError):
        raise SpecError("contract", "is not JSON-safe", "pass SchemaContract.to_dict()") from None
    return {
        "contract_json": contract_json,
        "path": path,
        "rows": rows,
        "persons": persons,
        "sites_json": json_dumps(dict(sites)),
        "cross_site_persons": check_count("cross_site_persons", cross_site_persons),
        "registered_by": by,
    }
