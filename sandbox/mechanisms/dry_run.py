"""A DP-SGD spec run for free on rows that are not real: dummy rows drawn from the contract,
or a DP synthetic table already released to the project. Nothing is reserved or charged;
the run's noise comes from a secret of its own, never shared with a charged run.

A dry run passes every check a submit passes first (``sandbox.mechanisms.precheck``: the
spec's columns, the grant, "auto" hyperparameters resolved exactly as a submit resolves
them, the plan, the budget), so it never accepts a spec a submit refuses. With public counts
it runs the job's own plan (the quote's and the run's noise multiplier, sample rate and
steps) on the free rows; with private counts that plan follows the exact size, so the dry
run plans on its table's size instead (``service_plan`` on a public size: a fixed size, or
the synthetic rows asked for). The worker's report is checked against the plan like a job's,
but for the evaluation's noise (a dry run evaluates without noise: its rows are not real).
Its result says what the job would be charged if submitted (``would_spend``, the quote's
figure) and the search's record (``tuning``); its id starts with ``dry-``, so it is marked as
a dry run wherever it is listed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from connectors.ingest import ingest_table
from foundation.errors import SpecError
from policies.roles import Actor
from sandbox.backend import Resources
from sandbox.context import ZoneContext
from sandbox.jobs import DRY_RUN_PREFIX, JobRecord
from sandbox.jobspec import JobSpec, parse_stored_spec
from sandbox.mechanisms.base import Admission, BackendMechanism
from sandbox.mechanisms.dpsgd import TRAIN_FRACTION, service_plan, worker_payload
from sandbox.mechanisms.dpsgd_plan import disjoint_eval
from sandbox.mechanisms.free_data import free_table, synthetic_job
from sandbox.mechanisms.plans import check_figures, dpsgd_epsilon, not_a_result
from sandbox.mechanisms.precheck import precheck
from sandbox.mechanisms.tuning import TUNING_KEY
from sandbox.results import DpsgdResult, JobResult
from sandbox.worker import PLAN_KEY, run_dpsgd_job

#: rows of a dummy dry run when the dataset's counts are private (a fixed, public size)
DUMMY_ROWS = 5000
#: the fewest dummy rows, so a tiny public dataset still gives a usable dry run
MIN_DUMMY_ROWS = 2000


@dataclass(frozen=True)
class DryRunRequest:
    spec: JobSpec
    #: "dummy" or "synthetic:JOB"
    on: str
    #: a point of a quote's utility curve (an epsilon tried, not a job asked for): the grant
    #: and the budget are not checked for it (the quote checked the spec's own)
    curve_point: bool = False


#: payload key of what the job would be charged if submitted (the service's, into the result)
WOULD_SPEND_KEY = "would_spend"


__all__ = ["DryRunMechanism", "DryRunRequest", "synthetic_job"]


class DryRunMechanism(BackendMechanism):
    kind = "dry-run"
    id_prefix = DRY_RUN_PREFIX
    worker = staticmethod(run_dpsgd_job)

    def resources(self, job: JobRecord) -> Resources:
        # dummy or released synthetic rows: never worth a GPU
        return replace(super().resources(job), gpus=0)

    def admit(
        self, ctx: ZoneContext, actor: Actor, request: Any, job_id: str, reserved: dict[str, str]
    ) -> Admission:
        req: DryRunRequest = request
        on = req.on
        if req.spec.federated is not None:
            raise SpecError("--on", "dry runs cover DP-SGD jobs", "drop --on for federated jobs")
        # every check a submit runs, in its order (columns, the access decision, "auto"
        # hyperparameters, the plan, the budget): a dry run never accepts what submit
        # refuses. A point of a quote's curve tries an epsilon nobody asked for: its access
        # and budget were the quote's to check
        pre = precheck(
            ctx, actor, req.spec, budget=not req.curve_point, for_request=req.curve_point
        )
        spec, tuning, rec = pre.spec, pre.tuning, pre.dataset
        # the dummy table is as large as the real one only when that size is public: a dry
        # run's plan (sample rate, steps) would otherwise give the size back
        size = max(MIN_DUMMY_ROWS, int(rec.persons)) if rec.counts_public else DUMMY_ROWS
        table, contract = free_table(ctx, spec, on, dummy_rows=size, dataset=rec)
        if rec.counts_public:
            # the job's own plan (the quote's and the run's noise, sample rate and steps),
            # run on the free rows: a dry run shows the job that would run
            plan = pre.dpsgd_plan
        else:
            # the job's plan follows the exact size: the dry run plans on its table's size,
            # which is public (see the module docstring), so its refusals are free
            plan = service_plan(
                spec,
                int(table.num_rows * TRAIN_FRACTION),
                counts_public=True,
                disjoint=disjoint_eval(rec),
            )
        dest = ctx.zone.job_dir(job_id) / "dry-run-data"
        ingest_table(
            table, contract, dest, ctx.zone.secret(), zone_key_file=ctx.zone.data_key_file()
        )
        payload = worker_payload(ctx, job_id, spec, contract, str(dest), plan)
        payload["dry_run"] = on
        # what the job would be charged if it were submitted (the quote's figure)
        payload[WOULD_SPEND_KEY] = pre.would_charge()
        if tuning is not None:
            payload[TUNING_KEY] = tuning
        # it runs on CPUs: its record says so (the GPU quota counts what running jobs hold)
        ran = replace(spec, resources=replace(spec.resources, gpus=0))
        return Admission(
            project=spec.project,
            dataset=spec.dataset,
            spec=ran.to_dict(),
            spec_hash=ran.spec_hash(),
            reservations={},
            work=payload,
            resources=Resources(cpus=spec.resources.cpus, gpus=0),
            details={"dry_run": on},
            dataset_version=pre.dataset.version,
        )

    def check_report(self, ctx: ZoneContext, job: JobRecord, work: Any, result: Any) -> JobResult:
        if not isinstance(result, DpsgdResult):
            raise not_a_result("DP-SGD dry run")
        # the plan the service put in the payload (a dry run's table size is not persisted
        # with the job; nothing is charged from it)
        plan = dict(work[PLAN_KEY])
        expected = {**plan, "max_grad_norm": job.spec["privacy"]["max_grad_norm"]}
        fields = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")
        check_figures(expected, result.run, fields, show=True)
        plan["epsilon"] = dpsgd_epsilon(plan)
        # the service's figures, as for a job; the report equals them and is not stored
        return replace(
            result,
            epsilon=plan["epsilon"],
            plan=plan,
            steps_taken=int(plan["steps"]),
            run=None,
            # the stored spec's optimizer, never a figure the worker wrote
            optimizer=parse_stored_spec(job.spec).training.optimizer_summary(),
            tuning=work.get(TUNING_KEY),
            would_spend=work.get(WOULD_SPEND_KEY),
        )

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        # dummy or already-released synthetic rows: nothing to charge
        ctx.audit.append(
            actor.name, "job.uncharged", "ok", job.id, {"dry_run": True, "kind": "dp-sgd"}
        )
        return result
