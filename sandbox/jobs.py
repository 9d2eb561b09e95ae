"""The job lifecycle: states, allowed transitions, and the job table.

States (a job exists only once policy allowed it and the ledger reserved its epsilon)::

    QUEUED     reserved in the ledger, handed to the backend, not started
    RUNNING    a worker started it (it may or may not have opened data yet: ``data_opened``)
    SUCCEEDED  trained, evaluated, charged (ledger committed), artefacts ready for release
    FAILED     stopped; the ledger released the reservation if no data was opened, else
               committed it (a failure after touching data keeps its charge)

Transitions are data (``ALLOWED``) checked in one place; an invalid one raises.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)

from foundation.clock import utcnow
from foundation.errors import IntegrityError, NotFoundError


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


ALLOWED: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.QUEUED, JobState.RUNNING),
        (JobState.QUEUED, JobState.FAILED),
        (JobState.RUNNING, JobState.SUCCEEDED),
        (JobState.RUNNING, JobState.FAILED),
    }
)
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED})

#: how a dry run's id starts (``DryRunMechanism.id_prefix``): a dry run is marked as one
#: wherever it is listed, from admission on (it has no result until it ends)
DRY_RUN_PREFIX = "dry"


def check_transition(src: JobState, dst: JobState) -> None:
    if (src, dst) not in ALLOWED:
        raise IntegrityError(f"job cannot go from {src} to {dst}")


def moved_values(dst: JobState, **fields: Any) -> dict[str, Any]:
    """The columns a move to ``dst`` writes: the state, its timestamp, then ``fields``
    (``result`` as JSON)."""
    values: dict[str, Any] = {"state": dst.value}
    if dst is JobState.RUNNING:
        values["started_at"] = utcnow()
    if dst in TERMINAL:
        values["finished_at"] = utcnow()
    if "result" in fields:
        values["result_json"] = json.dumps(fields.pop("result"), sort_keys=True)
    values.update(fields)
    return values


metadata = MetaData()
jobs_table = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project", String(200), nullable=False),
    Column("dataset", String(200), nullable=False),
    Column("submitted_by", String(200), nullable=False),
    Column("spec_json", Text, nullable=False),
    Column("spec_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("reservation_id", String(64), nullable=True),
    Column("data_opened", Boolean, nullable=False, default=False),
    Column("progress_json", Text, nullable=True),
    Column("result_json", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # the dataset version the job reads, fixed at submission (None: jobs from before versions)
    Column("dataset_version", Integer, nullable=True),
)

#: a project's GPU quota, set by a steward (``sandbox.gpu_quotas``); no row: no quota
gpu_quotas_table = Table(
    "gpu_quotas",
    metadata,
    Column("project", String(200), primary_key=True),
    Column("gpus", Float, nullable=False),
    Column("set_by", String(200), nullable=False),
    Column("set_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class JobRecord:
    id: str
    project: str
    dataset: str
    submitted_by: str
    spec: dict[str, Any]
    spec_hash: str
    state: JobState
    reservation_id: str | None
    data_opened: bool
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    #: the dataset version the job reads, fixed when it was admitted (None: a job from before
    #: dataset versions, which read the only version there was)
    dataset_version: int | None = None

    @property
    def dry_run(self) -> bool:
        """A free run on dummy or released synthetic rows (nothing reserved or charged):
        known from its id from admission on, and from its result (a dry run made before
        dry runs had their own ids)."""
        return self.id.startswith(f"{DRY_RUN_PREFIX}-") or bool((self.result or {}).get("dry_run"))

    @property
    def kind(self) -> str:
        """What the job is: "dry-run", "dp-sgd", "federated" or "synthetic" (a queued job's
        from its spec, as ``sandbox.budget_view.mechanism_of`` reads it)."""
        if self.dry_run:
            return "dry-run"
        if self.result and self.result.get("kind"):
            return str(self.result["kind"])
        if "method" in self.spec:
            return "synthetic"
        return "federated" if self.spec.get("mode") == "federated" else "dp-sgd"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "dry_run": self.dry_run,
            "project": self.project,
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "submitted_by": self.submitted_by,
            "spec_hash": self.spec_hash,
            "state": str(self.state),
            "reservation_id": self.reservation_id,
            "data_opened": self.data_opened,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def _aware(dt: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def _row(r: Any) -> JobRecord:
    return JobRecord(
        id=r.id,
        project=r.project,
        dataset=r.dataset,
        submitted_by=r.submitted_by,
        spec=json.loads(r.spec_json),
        spec_hash=r.spec_hash,
        state=JobState(r.state),
        reservation_id=r.reservation_id,
        data_opened=bool(r.data_opened),
        progress=json.loads(r.progress_json) if r.progress_json else None,
        result=json.loads(r.result_json) if r.result_json else None,
        error=r.error,
        created_at=_aware(r.created_at),  # type: ignore[arg-type]
        started_at=_aware(r.started_at),
        finished_at=_aware(r.finished_at),
        dataset_version=r.dataset_version,
    )


class JobStore:
    """The jobs table. Every state change goes through ``move`` (checked transitions)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        metadata.create_all(self.engine)

    def create(
        self,
        *,
        project: str,
        dataset: str,
        user: str,
        spec: dict[str, Any],
        spec_hash: str,
        reservation_id: str | None,
        job_id: str | None = None,
        dataset_version: int | None = None,
    ) -> JobRecord:
        jid = job_id or new_job_id()
        with self.engine.begin() as conn:
            conn.execute(
                insert(jobs_table).values(
                    id=jid,
                    project=project,
                    dataset=dataset,
                    submitted_by=user,
                    spec_json=json.dumps(spec, sort_keys=True),
                    spec_hash=spec_hash,
                    state=JobState.QUEUED.value,
                    reservation_id=reservation_id,
                    data_opened=False,
                    created_at=utcnow(),
                    dataset_version=dataset_version,
                )
            )
        return self.get(jid)

    def get(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            r = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        if r is None:
            raise NotFoundError(f"job {job_id!r} not found; `sandbox jobs list` shows yours")
        return _row(r)

    def list(self, *, project: str | None = None, user: str | None = None) -> list[JobRecord]:
        q = select(jobs_table).order_by(jobs_table.c.created_at)
        if project:
            q = q.where(jobs_table.c.project == project)
        if user:
            q = q.where(jobs_table.c.submitted_by == user)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(q)]

    def move(self, job_id: str, dst: JobState, **fields: Any) -> JobRecord:
        with self.engine.begin() as conn:
            r = conn.execute(select(jobs_table.c.state).where(jobs_table.c.id == job_id)).first()
            if r is None:
                raise NotFoundError(f"job {job_id!r} not found")
            check_transition(JobState(r.state), dst)
            values = moved_values(dst, **fields)
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(**values))
        return self.get(job_id)

    def move_if(self, job_id: str, src: JobState, dst: JobState, **fields: Any) -> JobRecord | None:
        """Move the job from ``src`` to ``dst`` only if it is still in ``src`` (one conditional
        UPDATE: of two threads racing, e.g. a cancel and the runner's start, one wins); the
        moved record, or None when the job had already left ``src``."""
        check_transition(src, dst)
        values = moved_values(dst, **fields)
        with self.engine.begin() as conn:
            moved = conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == job_id, jobs_table.c.state == src.value)
                .values(**values)
            ).rowcount
        return self.get(job_id) if moved else None

    def update_result(self, job_id: str, result: dict[str, Any]) -> JobRecord:
        """Amend a finished job's result (a steward's release flags); the state is unchanged."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == job_id)
                .values(result_json=json.dumps(result, sort_keys=True))
            )
        return self.get(job_id)

    def mark_data_opened(self, job_id: str) -> None:
        """Durably record that the job touched real rows (before the first byte is read)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs_table).where(jobs_table.c.id == job_id).values(data_opened=True)
            )

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == job_id)
                .values(progress_json=json.dumps(progress))
            )


def new_job_id(prefix: str = "job") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
