"""The store's datasets: register an ingested dataset, read one, list them, mark one deleted.

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

from sqlalchemy import Connection, Row, exists, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from foundation.errors import NotFoundError, SpecError
from policies.db import dataset_deletions, datasets
from policies.store_base import StoreBase, check_count, check_name, check_text, known_names
from policies.store_records import DatasetRecord, contract_columns, dataset_from_row, json_dumps


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
                        sites_json=json_dumps(dict(sites)),
                        cross_site_persons=check_count("cross_site_persons", cross_site_persons),
                        registered_by=by,
                        created_at=self._now(),
                    )
                )
                row = dataset_row(conn, name)
        except DBIntegrityError:
            raise taken from None
        return dataset_from_row(row)

    def get_dataset(self, name: str, *, include_deleted: bool = False) -> DatasetRecord:
        """A live dataset (``include_deleted``: or a deleted one, for views of past jobs)."""
        with self.engine.connect() as conn:
            return dataset_from_row(dataset_row(conn, name, include_deleted=include_deleted))

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
