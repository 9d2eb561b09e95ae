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
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import IntegrityError, PolicyDenied, SpecError
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Actor
from privacy.budget_events import BudgetKey
from sandbox.backend import Resources
from sandbox.context import ZoneContext
from sandbox.disclosure import cut_released_card
from sandbox.jobs import JobRecord
from sandbox.jobspec import JobSpec, parse_stored_spec
from sandbox.mechanisms.base import WHOLE_DATASET, Admission, BackendMechanism, commit_charge
from sandbox.mechanisms.plans import check_figures, dpsgd_epsilon, not_a_result
from sandbox.release import write_model_card
from sandbox.results import DpsgdResult, JobResult
from sandbox.worker import (
    EVAL_SHARE,
    NOISE_SECRET_KEY,
    PLAN_ERROR_KEY,
    PLAN_KEY,
    new_noise_secret,
    run_dpsgd_job,
)

#: the reader's person split: the train part is what DP-SGD trains on
TRAIN_FRACTION = 0.8


def check_columns(spec: JobSpec, contract: SchemaContract) -> None:
    known = {c.name for c in contract.columns}
    for field_name, cols in (("features", spec.features), ("label", (spec.label,))):
        for c in cols:
            if c not in known:
                raise SpecError(
                    field_name,
                    f"column {c!r} is not in dataset {spec.dataset!r}",
                    f"known columns: {', '.join(sorted(known))}",
                )
    if spec.label not in contract.label_names():
        raise SpecError(
            "label",
            f"column {spec.label!r} is not a label in the schema contract",
            f"labels: {', '.join(contract.label_names())}",
        )


def decide(ctx: ZoneContext, actor: Actor, spec: JobSpec, mechanism: Mechanism) -> str:
    """Chokepoint 1: the access decision, before anything is reserved or opened."""
    decision = decide_job_access(
        JobAccessRequest(
            user=actor.name,
            role=actor.role,
            project=spec.project,
            dataset=spec.dataset,
            columns=spec.columns,
            mechanism=mechanism,
            epsilon=spec.privacy.epsilon,
            delta=spec.privacy.delta,
        ),
        ctx.store.project_view(spec.project),
        ctx.store.grants_for(spec.project, spec.dataset),
        ctx.clock(),
    )
    if not decision.allowed:
        raise PolicyDenied(decision.reason, missing=decision.missing, grantor=decision.grantor)
    return decision.grant_id or ""


def checked_spec(
    ctx: ZoneContext, actor: Actor, spec: JobSpec, mechanism: Mechanism
) -> tuple[Any, SchemaContract, str]:
    """What every spec-driven mechanism checks first: its columns against the contract, then
    the access decision. Returns the dataset record, its contract and the grant used."""
    dataset = ctx.store.get_dataset(spec.dataset)
    contract = SchemaContract.from_dict(dataset.contract)
    check_columns(spec, contract)
    return dataset, contract, decide(ctx, actor, spec, mechanism)


def check_batch_size(spec: JobSpec, dataset: Any) -> None:
    """Refuse a batch larger than the training split before anything is reserved, when the
    counts are public (with private counts this check would be a free oracle on the exact
    size: the worker checks after reading instead, and the job is charged)."""
    if not dataset.counts_public:
        return
    n_train = int(dataset.persons * TRAIN_FRACTION)
    if spec.training.batch_size > n_train:
        raise SpecError(
            "training.batch_size",
            f"is larger than the training split ({n_train} persons)",
            f"set batch_size <= {n_train}",
        )


def plan_spec(spec: JobSpec, n_train: int) -> Any:
    """The accountant's plan (``privacy.job_plan.JobPlan``) for a DP-SGD ``spec`` on
    ``n_train`` training persons: the one planning the submit, the quote and dry runs share."""
    from privacy.job_plan import plan_job

    return plan_job(
        spec.privacy.epsilon,
        spec.privacy.delta,
        n_train,
        spec.training.batch_size,
        spec.training.epochs,
        # privacy.evaluate = false: no evaluation release, its share goes to training
        evaluate=spec.privacy.evaluate,
        eval_share=EVAL_SHARE,
    )


def service_plan(
    spec: JobSpec, n_train: int, *, counts_public: bool
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The service's plan for ``spec`` on ``n_train`` training persons: ``(plan, None)``.

    A spec the planner refuses for this size (a batch above the split, delta >= 1/n, a
    target no noise reaches) is refused now when the size is public. With private counts
    that refusal would be a free oracle on the exact size: the job is admitted and charged
    like one whose batch is too large, and ``(None, error)`` carries the refusal (its
    field and fix; the problem without the size) for the worker to raise after reading."""
    from privacy import accountant

    # refusals that do not depend on the size stay free
    accountant._check_epsilon(spec.privacy.epsilon)
    accountant._check_delta(spec.privacy.delta)
    try:
        dp = plan_spec(spec, n_train)
    except SpecError as exc:
        if counts_public:
            raise
        problem = "cannot be met on this dataset's training split (its size is private)"
        return None, {"field": exc.field, "problem": problem, "fix": exc.fix}
    return dp.to_dict(), None


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


def n_train_of(dataset: Any) -> int:
    """The training split's size the service plans with (the split itself is drawn per
    person by the reader; the plan's sample rate bounds the run whatever its exact size)."""
    return int(dataset.persons * TRAIN_FRACTION)


def job_plan(ctx: ZoneContext, job: JobRecord) -> dict[str, Any] | None:
    """The service's plan of a DP-SGD job, made again from what the service persisted: the
    job's spec and the dataset's record (the same inputs as at admission, the same plan;
    None when the size is private and no plan could be made)."""
    spec = parse_stored_spec(job.spec)
    if spec.spec_hash() != job.spec_hash:
        raise IntegrityError(
            f"job {job.id}: its stored spec does not match its hash; it is not charged from it"
        )
    dataset = ctx.store.get_dataset(job.dataset)
    return service_plan(spec, n_train_of(dataset), counts_public=dataset.counts_public)[0]


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
        spec: JobSpec = request
        dataset, contract, grant = checked_spec(ctx, actor, spec, Mechanism.DP_SGD)
        check_batch_size(spec, dataset)
        # plan before reserving: a spec the planner refuses never holds budget
        plan = service_plan(spec, n_train_of(dataset), counts_public=dataset.counts_public)
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
        return Admission(
            project=spec.project,
            dataset=spec.dataset,
            spec=spec.to_dict(),
            spec_hash=spec.spec_hash(),
            reservations=dict(reserved),
            work=worker_payload(ctx, job_id, spec, contract, dataset.path, plan),
            resources=resources,
            details={"grant": grant},
        )

    def check_report(self, ctx: ZoneContext, job: JobRecord, work: Any, result: Any) -> JobResult:
        show = ctx.store.get_dataset(job.dataset).counts_public
        return check_dpsgd_report(job, result, job_plan(ctx, job), show=show)

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        if job.reservation_id is None:
            raise SpecError("job", "has no reservation", "submit it again")
        dataset = ctx.store.get_dataset(job.dataset)
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
