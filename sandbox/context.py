"""What every part of the service works with: the zone's stores, its backend, its clock.

``ZoneContext`` is built once by ``Service`` and handed to the job runner and to each
mechanism, so none of them reaches into the ``Service`` object (and nothing here imports
it). It also holds the three checks every call shares: the role check with its audit event
(``act``), project membership (``check_member``) and the view a caller may have of a job
(``job_view``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from foundation.errors import PolicyDenied, UserError, ZoneError
from policies.audit import AuditLog
from policies.roles import Action, Actor, require
from policies.store import StateStore
from policies.store_records import DatasetRecord
from privacy.ledger import Ledger
from sandbox.backend import JobBackend
from sandbox.disclosure import job_view, sees_everything
from sandbox.gpu_quotas import GpuQuotas
from sandbox.jobs import JobRecord, JobStore
from sandbox.zone import Zone

#: what a progress callback receives: the job's progress record (never a data value)
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ZoneContext:
    zone: Zone
    store: StateStore
    ledger: Ledger
    audit: AuditLog
    jobs: JobStore
    backend: JobBackend
    clock: Callable[[], datetime]
    #: ids of running jobs whose submitter asked to stop them (served mode: the cancel call
    #: and the thread that waits on the worker share this service's memory)
    stop_requests: set[str] = field(default_factory=set)

    @contextmanager
    def act(
        self,
        actor: Actor,
        action: Action,
        target: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Check the role, run the body, write one audit event whatever happens."""
        extra: dict[str, Any] = dict(details or {})
        try:
            require(actor.role, action)
            yield extra
        except UserError as exc:
            extra["error"] = exc.kind
            self.audit.append(actor.name, str(action), "denied", target, extra)
            raise
        except ZoneError as exc:
            extra["error"] = exc.kind
            self.audit.append(actor.name, str(action), "error", target, extra)
            raise
        else:
            self.audit.append(actor.name, str(action), "ok", target, extra)

    @cached_property
    def quotas(self) -> GpuQuotas:
        """The zone's GPU quotas (one per context: it remembers whether its table exists)."""
        return GpuQuotas(self.jobs.engine)

    def check_member(self, actor: Actor, project: str) -> None:
        """Stewards and operators see every project; everyone else only their own."""
        if sees_everything(actor.role):
            return
        if actor.name not in self.store.project_view(project).members:
            raise PolicyDenied(
                f"{actor.name} is not a member of project {project}",
                missing=("project membership",),
                grantor="project owner",
            )

    def job_dataset(self, job: JobRecord, *, include_deleted: bool = False) -> DatasetRecord:
        """The dataset version a job reads: the one fixed when it was admitted (the latest,
        for a job from before dataset versions)."""
        return self.store.get_dataset(
            job.dataset, version=job.dataset_version, include_deleted=include_deleted
        )

    def dataset_path(self, dataset: DatasetRecord) -> Path:
        """The governed folder of ``dataset``'s version in this zone (``Zone.version_dir``)."""
        return self.zone.version_dir(dataset.name, dataset.version)

    def dataset_version_for(self, project: str, dataset: str, mechanism: str) -> DatasetRecord:
        """The version a new job of ``project`` reads: the one its live grant for
        ``mechanism`` is pinned to (the most recent such grant), else the latest."""
        pinned = [
            g
            for g in self.store.list_grants(project=project, dataset=dataset)
            if g.revoked_at is None
            and g.dataset_version is not None
            and mechanism in {m.value for m in g.mechanisms}
        ]
        version = pinned[-1].dataset_version if pinned else None
        return self.store.get_dataset(dataset, version=version)

    def job_view(self, actor: Actor, rec: JobRecord) -> JobRecord:
        """The job as ``actor`` may see it (``sandbox.disclosure``)."""
        # a past job's dataset may since have been deleted: its view stays
        dataset = self.job_dataset(rec, include_deleted=True)
        return job_view(rec, role=actor.role, counts_public=dataset.counts_public)
