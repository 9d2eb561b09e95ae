"""The contract every job mechanism implements: DP-SGD, federated, synthetic data, dry runs.

The job runner (``sandbox.runner``) calls, in this order:

1. ``admit`` (inside the runner's one guard, before anything runs): decide access (chokepoint
   1), plan (everything a spec can be refused for), reserve the ledger (chokepoint 2) and
   build the work. It returns an ``Admission``; the runner writes the job row (QUEUED). If
   anything raises after a reservation was taken, the runner releases every reservation and
   fails the job: nothing stays reserved or queued.
2. ``execute`` (the job is RUNNING): hand the work to compute and wait for the typed result,
   then ``check_report``: the worker's report of what it ran against the service's plan
   (``sandbox.mechanisms.plans``; a mismatch raises ``ReportMismatch``). It may raise a
   ZoneError; the worker records ``data_opened`` before the first row, and the service
   records it too once a worker returned (a worker that returns has read its rows, whatever
   it recorded).
3. ``charge`` (success) commits the ledger from the service's own plan, never from a figure
   the worker reported, and writes the card (chokepoint 3: nothing is released before
   this); ``settle_failed`` (failure) commits every reservation of a job that read rows (or
   whose worker's report did not match the plan) and releases the others.

A mechanism never moves a job between states: the runner does, in one place.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from foundation.errors import IntegrityError, SpecError, ZoneError
from policies.roles import Actor
from sandbox.backend import Resources, WorkerFn
from sandbox.context import ProgressFn, ZoneContext
from sandbox.jobs import JobRecord
from sandbox.mechanisms.plans import ReportMismatch
from sandbox.results import ChargeRecord, JobResult

#: the label of a dataset-wide reservation (federated ones are labelled by site)
WHOLE_DATASET = ""


@dataclass(frozen=True)
class Admission:
    """What ``admit`` hands the runner: the job row's fields and the work to run."""

    project: str
    dataset: str
    spec: dict[str, Any]
    spec_hash: str
    #: reservation ids by label (``WHOLE_DATASET`` or a site name); empty = charges nothing
    reservations: Mapping[str, str]
    #: what ``execute`` runs (a worker payload, or a federated payload path)
    work: Any
    resources: Resources = field(default_factory=lambda: Resources(cpus=1, gpus=0))
    #: shown in the audit event of the submit
    details: Mapping[str, Any] = field(default_factory=dict)
    #: the dataset version the job reads (its grant's pinned one, else the latest)
    dataset_version: int | None = None


class JobMechanism(ABC):
    #: the audit and result name of the mechanism
    kind: str = "abstract"
    #: whether a running job can be stopped (its worker killed; settled as a failure)
    stoppable: bool = False
    #: how the mechanism's job ids start (``dry`` marks a dry run wherever its id is listed)
    id_prefix: str = "job"

    @abstractmethod
    def admit(
        self, ctx: ZoneContext, actor: Actor, request: Any, job_id: str, reserved: dict[str, str]
    ) -> Admission:
        """Decide, plan, reserve (recording each reservation in ``reserved`` as it is taken,
        so the runner can release them if a later step fails) and build the work."""

    @abstractmethod
    def execute(
        self,
        ctx: ZoneContext,
        actor: Actor,
        job: JobRecord,
        work: Any,
        on_progress: ProgressFn | None,
    ) -> JobResult:
        """Run the work to its end; the job is RUNNING."""

    @abstractmethod
    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        """Commit the ledger for a succeeded job from the service's plan (never from the
        worker's figures) and write its card; the charged result."""

    @abstractmethod
    def check_report(self, ctx: ZoneContext, job: JobRecord, work: Any, result: Any) -> JobResult:
        """Compare what the worker reports it ran (``result``) with the service's plan (made
        again from what the service persisted, or the one in ``work``, the payload the
        service built); raise ``ReportMismatch`` naming the first figure that differs, else
        return the result with the service's figures. Abstract: no mechanism takes a
        worker's result unchecked."""

    def settle_failed(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, error: ZoneError
    ) -> str:
        """Close every reservation of a failed job: committed whole if it read rows (we
        cannot prove it released less) or if its worker's report did not match the plan (it
        read rows before reporting), released if not. Returns what the ledger did."""
        opened = job.data_opened or isinstance(error, ReportMismatch)
        return close_reservations(ctx, actor, job, opened=opened, error=error)


def reservations_of(ctx: ZoneContext, job: JobRecord) -> list[str]:
    """The job's open reservation ids (the ledger is the record, not the job row)."""
    return [r.reservation_id for r in ctx.ledger.open_reservations() if r.job_id == job.id]


def close_reservations(
    ctx: ZoneContext, actor: Actor, job: JobRecord, *, opened: bool, error: ZoneError
) -> str:
    rids = reservations_of(ctx, job)
    for rid in rids:
        if opened:
            r = ctx.ledger.reservation(rid)
            ctx.ledger.commit(rid, r.epsilon, r.delta, actor=actor.name)
        else:
            ctx.ledger.release(rid, actor=actor.name, reason=f"failed before data ({error.kind})")
    if not rids:
        return "none"
    return "committed" if opened else "released"


def run_on_backend(
    ctx: ZoneContext,
    job: JobRecord,
    fn: Any,
    payload: dict[str, Any],
    resources: Resources,
    on_progress: ProgressFn | None,
) -> Any:
    """Hand ``fn(payload)`` to the backend and wait, relaying the job's progress record."""
    last: dict[str, Any] = {}

    def poll() -> None:
        if on_progress is None:
            return
        rec = ctx.jobs.get(job.id)
        if rec.progress and rec.progress != last:
            last.clear()
            last.update(rec.progress)
            on_progress(dict(rec.progress))

    stopped: list[bool] = []

    def poll_or_stop() -> None:
        if job.id in ctx.stop_requests and not stopped:
            ctx.stop_requests.discard(job.id)
            stopped.append(ctx.backend.stop(handle))
        poll()

    # each project's jobs run in that project's own Ray namespace
    placed = dataclasses.replace(resources, namespace=job.project)
    handle = ctx.backend.submit(fn, payload, placed)
    try:
        return ctx.backend.wait(handle, poll=poll_or_stop)
    except ZoneError:
        if any(stopped):
            # settled like any failure: committed if the worker had opened its rows
            raise SpecError("JOB", "cancelled by its submitter while it ran") from None
        raise


class BackendMechanism(JobMechanism):
    """A mechanism whose work is one worker function run on the job backend."""

    #: a running job of this mechanism can be stopped by its submitter (served mode)
    stoppable = True

    #: what runs on the worker (a module-level function: it is pickled to Ray)
    worker: WorkerFn

    def resources(self, job: JobRecord) -> Resources:
        """What the worker asks of the cluster: the spec's resources when it has them."""
        asked = job.spec.get("resources") or {}
        return Resources(cpus=float(asked.get("cpus", 1)), gpus=float(asked.get("gpus", 0)))

    def execute(
        self,
        ctx: ZoneContext,
        actor: Actor,
        job: JobRecord,
        work: Any,
        on_progress: ProgressFn | None,
    ) -> JobResult:
        result = run_on_backend(ctx, job, type(self).worker, work, self.resources(job), on_progress)
        # a worker that returned has read its rows, whether or not it recorded so itself
        ctx.jobs.mark_data_opened(job.id)
        return self.check_report(ctx, job, work, result)


def commit_charge(
    ctx: ZoneContext, actor: Actor, job: JobRecord, epsilon: float, delta: float
) -> ChargeRecord:
    """Chokepoint 3 for a job with one dataset-wide reservation: commit ``epsilon`` and
    ``delta`` to the ledger, then the audit event that records it."""
    if job.reservation_id is None:
        raise IntegrityError(f"job {job.id} has no reservation to charge")
    event = ctx.ledger.commit(job.reservation_id, epsilon, delta, actor=actor.name)
    details = {"epsilon": epsilon, "delta": delta, "ledger_event": event.event_id}
    return record_charge(ctx, actor, job, details, event.event_id)


def record_charge(
    ctx: ZoneContext, actor: Actor, job: JobRecord, details: Mapping[str, Any], event: str | None
) -> ChargeRecord:
    """The audit event of a charge, and the record a card and a release point to."""
    audit = ctx.audit.append(actor.name, "job.charge", "ok", job.id, dict(details))
    return ChargeRecord(ledger_event=event, audit_seq=audit.seq, audit_hash=audit.hash)


def is_charged(ctx: ZoneContext, job: JobRecord) -> bool:
    """Every reservation of the job is closed and at least one was committed."""
    if job.reservation_id is not None:
        return ctx.ledger.reservation(job.reservation_id).state.value == "committed"
    if reservations_of(ctx, job):
        return False
    return any(e.kind.value == "commit" and e.job_id == job.id for e in ctx.ledger.events())
