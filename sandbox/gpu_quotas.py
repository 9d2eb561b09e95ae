"""Per-project GPU quotas: a steward caps the GPUs a project's running jobs hold at once.

A job that asks more GPUs than its project's quota is refused at submit (it could never run).
One that fits the quota but not beside the project's running jobs **waits** in the queue: the
runner starts it only inside one transaction that sums the GPUs of the project's running jobs
under a lock (``start_within_quota``), so two jobs starting at once never oversubscribe it, and
the waiting job's progress record says why it waits. Nothing starves silently: the job starts as
soon as a running one ends. A project with no quota is limited only by the cluster (Ray queues a
task whose GPUs are busy).

The GPUs a job holds are its spec's ``resources.gpus`` (a dry run records 0: it runs on CPUs).
A zone made before quotas has no ``gpu_quotas`` table: its projects have no quota, and setting
one says the zone needs an upgrade.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, insert, inspect, select, update

from foundation.clock import utcnow
from foundation.errors import SpecError
from foundation.sql import lock_key
from sandbox.jobs import JobState, gpu_quotas_table, jobs_table, moved_values


def job_gpus(spec: Mapping[str, Any]) -> float:
    """The GPUs a job holds while it runs (its spec's ``resources.gpus``)."""
    try:
        return float((spec.get("resources") or {}).get("gpus", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def fits(running: float, asked: float, quota: float) -> bool:
    """Pure: may a job asking ``asked`` GPUs start beside ``running`` under ``quota``?"""
    return running + asked <= quota + 1e-9


@dataclass(frozen=True)
class Start:
    started: bool
    #: GPUs the project's running jobs held when the start was decided
    running: float


class GpuQuotas:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._present: bool | None = None

    def _has_table(self) -> bool:
        if self._present is None:
            self._present = inspect(self.engine).has_table(gpu_quotas_table.name)
        return self._present

    def get(self, project: str) -> float | None:
        if not self._has_table():
            return None
        with self.engine.connect() as conn:
            row = conn.execute(
                select(gpu_quotas_table.c.gpus).where(gpu_quotas_table.c.project == project)
            ).first()
        return None if row is None else float(row[0])

    def set(self, project: str, gpus: float | None, *, by: str) -> None:
        """Set (or with None, lift) ``project``'s quota."""
        if not self._has_table():
            raise SpecError(
                "--gpus",
                "this zone was made before GPU quotas (no gpu_quotas table)",
                "upgrade the zone's database, or make a new zone",
            )
        with self.engine.begin() as conn:
            lock_key(conn, f"gpu-quota:{project}")
            conn.execute(delete(gpu_quotas_table).where(gpu_quotas_table.c.project == project))
            if gpus is not None:
                conn.execute(
                    insert(gpu_quotas_table).values(
                        project=project, gpus=float(gpus), set_by=by, set_at=utcnow()
                    )
                )

    def start_within_quota(self, job_id: str, project: str, gpus: float, quota: float) -> Start:
        """Move the QUEUED job to RUNNING if it fits beside the project's running jobs; one
        transaction under the project's lock, so concurrent starts are decided one by one."""
        with self.engine.begin() as conn:
            lock_key(conn, f"gpu-quota:{project}")
            rows = conn.execute(
                select(jobs_table.c.spec_json).where(
                    jobs_table.c.project == project,
                    jobs_table.c.state == JobState.RUNNING.value,
                )
            ).all()
            running = sum(job_gpus(json.loads(r[0])) for r in rows)
            if not fits(running, gpus, quota):
                return Start(False, running)
            moved = conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == job_id, jobs_table.c.state == JobState.QUEUED.value)
                .values(**moved_values(JobState.RUNNING))
            ).rowcount
        return Start(bool(moved), running)
