"""The one job runner: every mechanism's job goes through the same admit, handle and settle.

``submit`` admits a job inside one guard (decide, plan, reserve, build: see
``sandbox.mechanisms.base``), writes its row (QUEUED) and hands it to ``handle_job``.
``handle_job`` matches on the job's *persisted* state and calls one small handler per
state until the job is final:

    QUEUED     start: the job becomes RUNNING and its work is handed to compute
    RUNNING    await: the mechanism runs it to an outcome, then ``settle``
    SUCCEEDED  done
    FAILED     done

``settle(job, outcome)`` is the one place a job ends, for every mechanism: on success the
mechanism charges the ledger from the result (chokepoint 3) and the job SUCCEEDS with the
charged result; on failure every reservation is committed if the job read rows and released
if not, and the job FAILS with the error's one-line message. Either way one audit event.

Today the runner drives a job in the submitting process (embedded mode: ``submit`` returns
the final record); the work a QUEUED job needs is held in memory until it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from foundation.errors import ComputeError, NotFoundError, ZoneError
from policies.roles import Action, Actor
from sandbox.context import ProgressFn, ZoneContext
from sandbox.jobs import JobRecord, JobState, new_job_id
from sandbox.mechanisms import MECHANISMS
from sandbox.mechanisms.base import Admission, JobMechanism, close_reservations
from sandbox.results import JobResult


@dataclass(frozen=True)
class Succeeded:
    result: JobResult


@dataclass(frozen=True)
class Failed:
    error: ZoneError


Outcome = Succeeded | Failed


class JobRunner:
    def __init__(self, ctx: ZoneContext) -> None:
        self.ctx = ctx
        #: job id -> (mechanism, actor, work) for admitted jobs not yet started
        self._pending: dict[str, tuple[JobMechanism, Actor, Any]] = {}

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
    ) -> JobRecord:
        """Admit ``request`` with mechanism ``kind`` and drive it to its end."""
        job_id = self.admit(kind, actor, request, action=action, target=target, details=details)
        return self.handle_job(job_id, on_progress=on_progress)

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
        mechanism = MECHANISMS[kind]
        job_id = new_job_id()
        reserved: dict[str, str] = {}
        with self.ctx.act(actor, action, target, details) as extra:
            try:
                admission = mechanism.admit(self.ctx, actor, request, job_id, reserved)
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
            self.ctx.jobs.move(job.id, JobState.FAILED, error="the job's submitter stopped")
            return
        self.ctx.jobs.move(job.id, JobState.RUNNING)

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
        try:
            outcome = Succeeded(mechanism.execute(self.ctx, actor, job, work, on_progress))
        except ZoneError as exc:
            outcome = Failed(exc)
        except Exception as exc:  # noqa: BLE001 - translate, never show a raw message
            outcome = Failed(ComputeError(f"the job failed in the service ({type(exc).__name__})"))
        self.settle(self.ctx.jobs.get(job.id), outcome, mechanism, actor)
        if isinstance(outcome, Failed):
            raise outcome.error

    # -- the end -------------------------------------------------------------------------------

    def settle(
        self, job: JobRecord, outcome: Outcome, mechanism: JobMechanism, actor: Actor
    ) -> JobRecord:
        """End ``job`` with ``outcome``: charge and succeed, or close reservations and fail."""
        if isinstance(outcome, Succeeded):
            try:
                charged = mechanism.charge(self.ctx, actor, job, outcome.result)
            except ZoneError as exc:
                return self.settle(job, Failed(exc), mechanism, actor)
            return self.ctx.jobs.move(job.id, JobState.SUCCEEDED, result=charged.to_dict())
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
