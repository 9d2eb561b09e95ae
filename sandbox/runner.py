"""The one job runner: every mechanism's job goes through the same admit, handle and settle.

``submit`` admits a job inside one guard (decide, plan, reserve, build: see
``sandbox.mechanisms.base``), writes its row (QUEUED) and hands it to ``handle_job``.
``handle_job`` matches on the job's *persisted* state and calls one small handler per
state until the job is final:

    QUEUED     start: the job becomes RUNNING and its work is handed to compute
    RUNNING    await: the mechanism runs it to an outcome, then ``settle``
    SUCCEEDED  done
    FAILED     done

``settle(job, outcome)`` is the one place a job ends, for every mechanism. Before it, a
successful run is charged by the mechanism from the *service's* plan (chokepoint 3; a result
that does not match the plan is a failure). A charged result SUCCEEDS; on failure every
reservation is committed if the job read rows and released if not, and the job FAILS with the
error's one-line message (one ``job.fail`` audit event).

Embedded mode drives a job in the submitting process (``submit`` returns the final record).
Served mode (``sandbox serve``) hands the job to the service's own executor and returns the
QUEUED record at once (``wait=False``); the client follows the persisted state. The work a
QUEUED job needs is held in memory until it starts, so a job the service did not finish
before it stopped cannot resume: ``reconcile`` (run when the service starts) ends every job
left QUEUED or RUNNING by a service that is gone, committing its reservations if its rows were
read and releasing them if not. Nothing stays ``running``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from foundation.errors import ComputeError, NotFoundError, SpecError, ZoneError
from policies.roles import Action, Actor, Role
from sandbox.context import ProgressFn, ZoneContext
from sandbox.gpu_quotas import job_gpus
from sandbox.jobs import JobRecord, JobState, new_job_id
from sandbox.mechanisms import mechanism as mechanism_of
from sandbox.mechanisms.base import (
    Admission,
    JobMechanism,
    close_reservations,
    reservations_of,
)
from sandbox.results import JobResult


@dataclass(frozen=True)
class Succeeded:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    error: ZoneError


Outcome = Succeeded | Failed

#: how often a job waiting for its project's GPU quota looks again (seconds)
QUOTA_POLL_S = 1.0

#: who ends a job that a stopped service left behind (the audit log's actor)
SERVICE_ACTOR = Actor("zone-service", Role.OPERATOR)

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, ctx: ZoneContext, executor: Executor | None = None) -> None:
        self.ctx = ctx
        #: runs admitted jobs in the background (served mode); None: in the caller (embedded)
        self.executor = executor
        #: job id -> (mechanism, actor, work) for admitted jobs not yet started
        self._pending: dict[str, tuple[JobMechanism, Actor, Any]] = {}
        #: job id -> mechanism, for jobs this process is running now
        self._running: dict[str, JobMechanism] = {}

    # -- admission ---------------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        actor: Actor,
        request: Any,
        *,
        action: Action = Action.JOB_SUBMIT,
        target: str = "",
        details: Mapping[str, Any] | None = None,
        on_progress: ProgressFn | None = None,
        wait: bool = True,
    ) -> JobRecord:
        """Admit ``request`` with mechanism ``kind`` and drive it to its end; with
        ``wait=False`` (served mode) hand it to the executor and return it QUEUED."""
        job_id = self.admit(kind, actor, request, action=action, target=target, details=details)
        if wait or self.executor is None:
            return self.handle_job(job_id, on_progress=on_progress)
        self.executor.submit(self._drive, job_id)
        return self.ctx.jobs.get(job_id)

    def _drive(self, job_id: str) -> None:
        """A background job to its end; its outcome lives in its record and the audit log."""
        try:
            self.handle_job(job_id)
        except ZoneError:
            pass  # settled: the record says FAILED with the error's one line
        except Exception:  # noqa: BLE001 - a bug must not kill the executor's thread
            log.exception("job %s: the runner failed", job_id)

    def reconcile(self) -> list[str]:
        """End every job a stopped service left QUEUED or RUNNING; the ids it ended.

        Called once when the service starts, before it takes requests. Such a job's work was
        in the old process's memory (and its worker in that process's Ray), so it cannot go
        on: it FAILS, its reservations committed if it read rows, released if not."""
        ended = []
        for job in self.ctx.jobs.list():
            if job.id in self._pending:
                continue
            if job.state in (JobState.SUCCEEDED, JobState.FAILED):
                self._close_stray(job)
                continue
            error = ComputeError(
                "the service stopped while the job was "
                f"{job.state}; submit it again (a retry may help)",
                retryable=True,
            )
            ledger = close_reservations(
                self.ctx, SERVICE_ACTOR, job, opened=job.data_opened, error=error
            )
            self.ctx.jobs.move(job.id, JobState.FAILED, error=str(error))
            self.ctx.audit.append(
                SERVICE_ACTOR.name,
                "job.fail",
                "error",
                job.id,
                {
                    "error": error.kind,
                    "ledger": ledger,
                    "data_opened": job.data_opened,
                    "reason": "service restart",
                },
            )
            ended.append(job.id)
        return ended

    def request_stop(self, job_id: str) -> bool:
        """Ask a job this process runs to stop; False when it cannot be stopped from here (it
        runs in another process, or its mechanism runs to its end)."""
        mechanism = self._running.get(job_id)
        if mechanism is None or not mechanism.stoppable or not self.ctx.backend.can_stop:
            return False
        self.ctx.stop_requests.add(job_id)
        return True

    def _close_stray(self, job: JobRecord) -> None:
        """A job that ended with a reservation still open (the service stopped between the
        job's final state and its ledger step): close it as its end says, once."""
        if not reservations_of(self.ctx, job):
            return
        error = ComputeError("the service stopped while the job was ending")
        ledger = close_reservations(
            self.ctx, SERVICE_ACTOR, job, opened=job.data_opened, error=error
        )
        self.ctx.audit.append(
            SERVICE_ACTOR.name,
            "job.settle",
            "ok",
            job.id,
            {"ledger": ledger, "data_opened": job.data_opened, "reason": "service restart"},
        )

    def admit(
        self,
        kind: str,
        actor: Actor,
        request: Any,
        *,
        action: Action = Action.JOB_SUBMIT,
        target: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> str:
        """Decide, plan, reserve and build inside one guard; the job is QUEUED after."""
        mechanism = mechanism_of(kind)
        job_id = new_job_id(mechanism.id_prefix)
        reserved: dict[str, str] = {}
        with self.ctx.act(actor, action, target, details) as extra:
            try:
                admission = mechanism.admit(self.ctx, actor, request, job_id, reserved)
                self._check_quota(admission)
                self._create(actor, job_id, admission)
            except Exception as exc:
                self._abandon(actor, job_id, reserved, exc)
                if isinstance(exc, ZoneError):
                    raise
                raise ComputeError(
                    f"the job could not be prepared ({type(exc).__name__}); nothing was charged",
                    retryable=True,
                ) from None
            extra.update(job=job_id, backend=self.ctx.backend.name, **admission.details)
        self._pending[job_id] = (mechanism, actor, admission.work)
        return job_id

    def _check_quota(self, admission: Admission) -> None:
        """A job asking more GPUs than its project's quota could never start: refused."""
        gpus = admission.resources.gpus
        quota = self.ctx.quotas.get(admission.project) if gpus > 0 else None
        if quota is not None and gpus > quota:
            raise SpecError(
                "resources.gpus",
                f"asks for {gpus:g} GPU(s) but project {admission.project}'s quota is {quota:g}",
                "ask for fewer, or ask a data steward to raise the quota",
            )

    def _create(self, actor: Actor, job_id: str, admission: Admission) -> None:
        # a job with one dataset-wide reservation names it; a federated job's are per site
        # and live in the ledger under the job's id
        single = admission.reservations.get("") if len(admission.reservations) == 1 else None
        self.ctx.jobs.create(
            project=admission.project,
            dataset=admission.dataset,
            user=actor.name,
            spec=dict(admission.spec),
            spec_hash=admission.spec_hash,
            reservation_id=single,
            job_id=job_id,
            dataset_version=admission.dataset_version,
        )

    def _abandon(
        self, actor: Actor, job_id: str, reserved: Mapping[str, str], exc: BaseException
    ) -> None:
        """Undo an admission that failed before compute had the job: no row was read."""
        kind = exc.kind if isinstance(exc, ZoneError) else type(exc).__name__
        for rid in reserved.values():
            self.ctx.ledger.release(rid, actor=actor.name, reason=f"submit failed ({kind})")
        try:
            rec = self.ctx.jobs.get(job_id)
        except NotFoundError:
            return
        message = str(exc) if isinstance(exc, ZoneError) else f"submit failed ({kind})"
        if rec.state is JobState.QUEUED:
            self.ctx.jobs.move(job_id, JobState.FAILED, error=message)
        self.ctx.audit.append(
            actor.name, "job.fail", "error", job_id, {"error": kind, "ledger": "released"}
        )

    # -- the loop ------------------------------------------------------------------------------

    def handle_job(self, job_id: str, *, on_progress: ProgressFn | None = None) -> JobRecord:
        """Drive the job from its persisted state to a final one; returns the final record."""
        while True:
            job = self.ctx.jobs.get(job_id)
            match job.state:
                case JobState.QUEUED:
                    self._start(job)
                case JobState.RUNNING:
                    self._await(job, on_progress)
                case JobState.SUCCEEDED | JobState.FAILED:
                    return job

    def _start(self, job: JobRecord) -> None:
        if job.id not in self._pending:
            # admitted by another process that is gone: its work was never handed out
            self.ctx.jobs.move_if(
                job.id, JobState.QUEUED, JobState.FAILED, error="the job's submitter stopped"
            )
            return
        gpus = job_gpus(job.spec)
        quota = self.ctx.quotas.get(job.project) if gpus > 0 else None
        if quota is None:
            started = self.ctx.jobs.move_if(job.id, JobState.QUEUED, JobState.RUNNING) is not None
        else:
            start = self.ctx.quotas.start_within_quota(job.id, job.project, gpus, quota)
            started = start.started
            if not started and self.ctx.jobs.get(job.id).state is JobState.QUEUED:
                # it waits, and says why (the follower shows it); it starts when a running
                # job of the project ends
                self.ctx.jobs.set_progress(
                    job.id,
                    {
                        "waiting": f"project {job.project} runs jobs holding {start.running:g} "
                        f"of its {quota:g} GPU(s); this job needs {gpus:g} and starts when "
                        "they are free"
                    },
                )
                time.sleep(QUOTA_POLL_S)
                return
        if not started:
            # cancelled between admission and start: the cancel closed its reservations
            self._pending.pop(job.id, None)

    def _await(self, job: JobRecord, on_progress: ProgressFn | None) -> None:
        pending = self._pending.pop(job.id, None)
        if pending is None:
            # running in another process (embedded mode: the submitting CLI waits on it)
            raise ComputeError(
                f"job {job.id} is running in another process; `sandbox jobs status` follows it",
                retryable=True,
            )
        mechanism, actor, work = pending
        outcome: Outcome
        self._running[job.id] = mechanism
        try:
            outcome = Succeeded(mechanism.execute(self.ctx, actor, job, work, on_progress))
        except ZoneError as exc:
            outcome = Failed(exc)
        except Exception as exc:  # noqa: BLE001 - translate, never show a raw message
            outcome = Failed(ComputeError(f"the job failed in the service ({type(exc).__name__})"))
        finally:
            self._running.pop(job.id, None)
            self.ctx.stop_requests.discard(job.id)
        if isinstance(outcome, Succeeded):
            try:
                # the charge comes from the service's plan; a result that does not match it
                # (or a charge the ledger refuses) fails the job like an error in the run
                outcome = Succeeded(mechanism.charge(self.ctx, actor, job, outcome.result))
            except ZoneError as exc:
                outcome = Failed(exc)
        self.settle(self.ctx.jobs.get(job.id), outcome, mechanism, actor)
        if isinstance(outcome, Failed):
            raise outcome.error

    # -- the end -------------------------------------------------------------------------------

    def settle(
        self, job: JobRecord, outcome: Outcome, mechanism: JobMechanism, actor: Actor
    ) -> JobRecord:
        """End ``job`` with ``outcome``: a charged result succeeds; a failure closes the job's
        reservations (committed if it read rows, released if not) and fails it."""
        if isinstance(outcome, Succeeded):
            return self.ctx.jobs.move(job.id, JobState.SUCCEEDED, result=outcome.result.to_dict())
        error = outcome.error
        ledger = mechanism.settle_failed(self.ctx, actor, job, error)
        if job.state not in (JobState.SUCCEEDED, JobState.FAILED):
            job = self.ctx.jobs.move(job.id, JobState.FAILED, error=str(error))
        self.ctx.audit.append(
            actor.name,
            "job.fail",
            "error",
            job.id,
            {"error": error.kind, "ledger": ledger, "data_opened": job.data_opened},
        )
        return job


__all__ = ["Failed", "JobRunner", "Outcome", "Succeeded", "close_reservations"]
