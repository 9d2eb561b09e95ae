"""DP-SGD on one dataset, charged to the project's dataset-wide budget.

The service plans the run at admission (``service_plan``: noise multiplier, sample rate,
steps and evaluation noise from ``privacy.job_plan.plan_job`` on the training split's size
the service knows, ``persons x TRAIN_FRACTION``) and hands the plan to the worker in its
payload; it makes the same plan again from the job's persisted spec and the dataset's
record (``job_plan``) to check the worker's report and to charge the accountant's epsilon
for it. The worker trains with the plan's sample rate on its exact split: Poisson
sampling's privacy depends on the rate, the noise and the steps, not on how many persons
the split holds, so the plan's figure bounds the run whatever the split's exact size. The
worker's report is checked against the plan (``check_dpsgd_report``); DP-SGD takes exactly
its planned steps (the trainer has no early stop), so any other step count is a mismatch.

A spec with ``"auto"`` hyperparameters is resolved at admission, after the access decision
and before anything is planned or reserved, by the search on free data
(``sandbox.mechanisms.tuning``: never a real row); the job is planned, stored and charged as
the resolved spec, and the search's record travels in the payload to the job's result and
its model card (``result.tuning``: the service's, never the worker's).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import IntegrityError, SpecError
from policies.roles import Actor
from privacy.budget_events import BudgetKey
from sandbox.backend import Resources
from sandbox.context import ZoneContext
from sandbox.disclosure import cut_released_card
from sandbox.jobs import JobRecord
from sandbox.jobspec import JobSpec, parse_stored_spec
from sandbox.mechanisms.base import WHOLE_DATASET, Admission, BackendMechanism, commit_charge
from sandbox.mechanisms.dpsgd_plan import (
    TRAIN_FRACTION,
    check_batch_size,
    check_columns,
    decide,
    disjoint_eval,
    n_train_of,
    plan_spec,
    service_plan,
)
from sandbox.mechanisms.plans import check_figures, dpsgd_epsilon, not_a_result
from sandbox.mechanisms.precheck import precheck
from sandbox.mechanisms.tuning import TUNING_KEY, summary
from sandbox.release import write_model_card
from sandbox.results import DpsgdResult, JobResult
from sandbox.worker import (
    NOISE_SECRET_KEY,
    PLAN_ERROR_KEY,
    PLAN_KEY,
    new_noise_secret,
    run_dpsgd_job,
)


def worker_payload(
    ctx: ZoneContext,
    job_id: str,
    spec: JobSpec,
    contract: SchemaContract,
    path: str,
    plan: tuple[dict[str, Any] | None, dict[str, str] | None],
) -> dict[str, Any]:
    """What a DP-SGD worker gets: the spec, the contract, where its rows are, the service's
    plan (or the refusal to raise after reading) and a fresh noise secret for this run alone
    (chokepoint 9)."""
    return {
        "zone_root": str(ctx.zone.root),
        "db_url": ctx.zone.db_url,
        "job_id": job_id,
        "spec": spec.to_dict(),
        "contract": contract.to_dict(),
        "dataset_path": path,
        PLAN_KEY: plan[0],
        PLAN_ERROR_KEY: plan[1],
        NOISE_SECRET_KEY: new_noise_secret(),
    }


def job_plan(ctx: ZoneContext, job: JobRecord) -> dict[str, Any] | None:
    """The service's plan of a DP-SGD job, made again from what the service persisted: the
    job's spec and the dataset's record (the same inputs as at admission, the same plan;
    None when the size is private and no plan could be made)."""
    spec = parse_stored_spec(job.spec)
    if spec.spec_hash() != job.spec_hash:
        raise IntegrityError(
            f"job {job.id}: its stored spec does not match its hash; it is not charged from it"
        )
    dataset = ctx.job_dataset(job)
    return service_plan(
        spec,
        n_train_of(dataset),
        counts_public=dataset.counts_public,
        disjoint=disjoint_eval(dataset),
    )[0]


#: the admission helpers, where they were first written (``sandbox.mechanisms.dpsgd_plan``)
__all__ = [
    "TRAIN_FRACTION",
    "DpsgdMechanism",
    "check_batch_size",
    "check_columns",
    "decide",
    "n_train_of",
    "plan_spec",
    "service_plan",
    "worker_payload",
]

#: the figures a DP-SGD worker reports and the service checks (``DpsgdResult.run``)
REPORTED = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "eval_sigma", "delta")


def check_dpsgd_report(
    job: JobRecord, result: Any, plan: dict[str, Any] | None, *, show: bool
) -> DpsgdResult:
    """``result`` with the service's plan figures, once its report matches ``plan``."""
    if not isinstance(result, DpsgdResult):
        raise not_a_result("DP-SGD")
    if plan is None:
        # the service could not plan (private size): the worker had to fail after reading
        raise not_a_result("failed (the service had no plan for this job)")
    expected = {**plan, "max_grad_norm": job.spec["privacy"]["max_grad_norm"]}
    check_figures(expected, result.run, REPORTED, show=show)
    check_figures(expected, {"steps": result.steps_taken}, ("steps",), show=show, label="taken")
    # the optimizer shown is the stored spec's, never a figure the worker wrote (a worker's
    # free-form number would be a channel out of the zone)
    optimizer = parse_stored_spec(job.spec).training.optimizer_summary()
    return replace(result, plan=dict(plan), steps_taken=int(plan["steps"]), optimizer=optimizer)


class DpsgdMechanism(BackendMechanism):
    kind = "dp-sgd"
    worker = staticmethod(run_dpsgd_job)

    def admit(
        self, ctx: ZoneContext, actor: Actor, request: Any, job_id: str, reserved: dict[str, str]
    ) -> Admission:
        # every check a quote and a dry run run too, in the same order (columns, the access
        # decision, "auto" hyperparameters chosen on free data, the plan, the budget): a spec
        # the planner refuses never holds budget; everything below plans, stores and charges
        # the resolved spec
        pre = precheck(ctx, actor, request)
        spec, tuning, dataset, plan = pre.spec, pre.tuning, pre.dataset, pre.dpsgd_plan
        resources = Resources(cpus=spec.resources.cpus, gpus=spec.resources.gpus)
        ctx.backend.check_resources(resources)
        # chokepoint 2: the ledger reserves before the job may run
        reserved[WHOLE_DATASET] = ctx.ledger.reserve(
            BudgetKey(spec.project, spec.dataset),
            spec.privacy.epsilon,
            spec.privacy.delta,
            job_id=job_id,
            actor=actor.name,
        )
        work = worker_payload(ctx, job_id, spec, pre.contract, str(ctx.dataset_path(dataset)), plan)
        details: dict[str, Any] = {"grant": pre.grant}
        if tuning is not None:
            work[TUNING_KEY] = tuning
            details["tuned"] = summary(tuning)
        return Admission(
            project=spec.project,
            dataset=spec.dataset,
            spec=spec.to_dict(),
            spec_hash=spec.spec_hash(),
            reservations=dict(reserved),
            work=work,
            resources=resources,
            details=details,
            dataset_version=dataset.version,
        )

    def check_report(self, ctx: ZoneContext, job: JobRecord, work: Any, result: Any) -> JobResult:
        show = ctx.job_dataset(job).counts_public
        checked = check_dpsgd_report(job, result, job_plan(ctx, job), show=show)
        # the search's record is the service's (from the payload it built), never the worker's
        return replace(checked, tuning=work.get(TUNING_KEY))

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        if job.reservation_id is None:
            raise SpecError("job", "has no reservation", "submit it again")
        dataset = ctx.job_dataset(job)
        # checked again here (``execute`` did already): the charge below is the plan's, made
        # again from what the service persisted, and a result that does not match it is
        # never charged as if it had run
        result = check_dpsgd_report(job, result, job_plan(ctx, job), show=dataset.counts_public)
        plan = dict(result.plan)
        # the accountant's figure for the service's own plan, never the worker's epsilon
        epsilon, delta = dpsgd_epsilon(plan), float(plan["delta"])
        if not dataset.counts_public:
            # the accountant's figure is a function of the exact training size: with private
            # counts the job is charged (and shows) what was reserved, an upper bound
            epsilon = ctx.ledger.reservation(job.reservation_id).epsilon
        # chokepoint 3: commit the charge before anything can be released
        charge = commit_charge(ctx, actor, job, epsilon, delta)
        # the plan shows what was charged (with private counts the plan's own figure would
        # have the size in its digits)
        plan["epsilon"] = epsilon
        # the report equals the plan now: it is not stored (no figure beyond the plan's)
        charged = replace(result, epsilon=epsilon, delta=delta, plan=plan, run=None, charge=charge)
        card = write_model_card(
            ctx.zone.job_dir(job.id), job, dataset, charged, backend=ctx.backend.name
        )
        if not dataset.counts_public:
            # the card leaves the zone: no figure that gives the exact size back
            cut_released_card(card)
        return charged
