"""Released DP query answers: written once, read back for free.

A DP query's answer is released when its epsilon is committed to the ledger. Asking the same
query again (the same canonical spec, ``QuerySpec.key``, in the same project) returns this
stored answer with no new charge and no new noise: a fresh draw would let an analyst average
the noise away, which is the attack the cache exists to stop
(``tests/attacks/test_query_averaging.py``). One project's released answer is not another's:
each project pays for its own.

The table is history like the ledger: the service inserts and reads, never updates or
deletes (``sandbox.db_roles.APPEND_ONLY``); the unique (project, query_key) pair makes two
racing first askers store one answer.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Float,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from foundation.clock import utcnow
from foundation.errors import SpecError

metadata = MetaData()
query_releases_table = Table(
    "query_releases",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project", String(200), nullable=False),
    Column("dataset", String(200), nullable=False),
    Column("query_key", String(64), nullable=False),
    Column("query_json", Text, nullable=False),
    Column("answer_json", Text, nullable=False),
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("asked_by", String(200), nullable=False),
    Column("released_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("project", "query_key", name="uq_query_releases_project_key"),
)


def new_query_id() -> str:
    return f"qry-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class QueryRelease:
    id: str
    project: str
    dataset: str
    query_key: str
    query: dict[str, Any]
    answer: dict[str, Any]
    epsilon: float
    delta: float
    asked_by: str
    released_at: datetime


def _row(r: Any) -> QueryRelease:
    at = r.released_at
    return QueryRelease(
        id=r.id,
        project=r.project,
        dataset=r.dataset,
        query_key=r.query_key,
        query=json.loads(r.query_json),
        answer=json.loads(r.answer_json),
        epsilon=float(r.epsilon),
        delta=float(r.delta),
        asked_by=r.asked_by,
        released_at=at if at.tzinfo else at.replace(tzinfo=utcnow().tzinfo),
    )


class QueryReleases:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._present: bool | None = None

    def create_schema(self) -> None:
        metadata.create_all(self.engine, checkfirst=True)

    def present(self) -> bool:
        if self._present is None:
            self._present = inspect(self.engine).has_table(query_releases_table.name)
        return self._present

    def require(self) -> None:
        """A zone made before DP queries has no table to keep their answers in."""
        if not self.present():
            raise SpecError(
                "query",
                "this zone was made before DP queries (no query_releases table)",
                "ask the operator to run `sandbox upgrade`",
            )

    def find(self, project: str, query_key: str) -> QueryRelease | None:
        if not self.present():
            return None
        t = query_releases_table
        with self.engine.connect() as conn:
            r = conn.execute(
                select(t).where(t.c.project == project, t.c.query_key == query_key)
            ).first()
        return None if r is None else _row(r)

    def add(self, release: QueryRelease) -> QueryRelease:
        """Store ``release``; when the same query was stored meanwhile (a race), the stored
        one is the release and is returned."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(query_releases_table).values(
                        id=release.id,
                        project=release.project,
                        dataset=release.dataset,
                        query_key=release.query_key,
                        query_json=json.dumps(release.query, sort_keys=True),
                        answer_json=json.dumps(release.answer, sort_keys=True),
                        epsilon=release.epsilon,
                        delta=release.delta,
                        asked_by=release.asked_by,
                        released_at=release.released_at,
                    )
                )
        except SqlIntegrityError:
            stored = self.find(release.project, release.query_key)
            if stored is None:
                raise
            return stored
        return release

    def list(self, project: str) -> list[QueryRelease]:
        if not self.present():
            return []
        t = query_releases_table
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t).where(t.c.project == project).order_by(t.c.released_at)
            ).all()
        return [_row(r) for r in rows]
