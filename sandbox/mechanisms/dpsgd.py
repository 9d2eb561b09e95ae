"""DP-SGD on one dataset, charged to the project's dataset-wide budget."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import PolicyDenied, SpecError
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Actor
from privacy.budget_events import BudgetKey
from sandbox.backend import Resources
from sandbox.context import ZoneContext
from sandbox.disclosure import cut_released_card
from sandbox.jobs import JobRecord
from sandbox.jobspec import JobSpec
from sandbox.mechanisms.base import WHOLE_DATASET, Admission, BackendMechanism, commit_charge
from sandbox.release import write_model_card
from sandbox.results import DpsgdResult, JobResult
from sandbox.worker import NOISE_SECRET_KEY, new_noise_secret, run_dpsgd_job

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


def worker_payload(
    ctx: ZoneContext, job_id: str, spec: JobSpec, contract: SchemaContract, path: str
) -> dict[str, Any]:
    """What a DP-SGD worker gets: the spec, the contract, where its rows are, and a fresh
    noise secret for this run alone (chokepoint 9)."""
    return {
        "zone_root": str(ctx.zone.root),
        "db_url": ctx.zone.db_url,
        "job_id": job_id,
        "spec": spec.to_dict(),
        "contract": contract.to_dict(),
        "dataset_path": path,
        NOISE_SECRET_KEY: new_noise_secret(),
    }


class DpsgdMechanism(BackendMechanism):
    kind = "dp-sgd"
    worker = staticmethod(run_dpsgd_job)

    def admit(
        self, ctx: ZoneContext, actor: Actor, request: Any, job_id: str, reserved: dict[str, str]
    ) -> Admission:
        spec: JobSpec = request
        dataset, contract, grant = checked_spec(ctx, actor, spec, Mechanism.DP_SGD)
        check_batch_size(spec, dataset)
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
            work=worker_payload(ctx, job_id, spec, contract, dataset.path),
            resources=resources,
            details={"grant": grant},
        )

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        if job.reservation_id is None:
            raise SpecError("job", "has no reservation", "submit it again")
        dataset = ctx.store.get_dataset(job.dataset)
        epsilon, delta = float(result.epsilon or 0.0), float(result.delta or 0.0)
        if not dataset.counts_public:
            # the accountant's figure is a function of the exact training size: with private
            # counts the job is charged (and shows) what was reserved, an upper bound
            epsilon = ctx.ledger.reservation(job.reservation_id).epsilon
        # chokepoint 3: commit the charge before anything can be released
        charge = commit_charge(ctx, actor, job, epsilon, delta)
        if not isinstance(result, DpsgdResult):
            raise SpecError("job", "is not a DP-SGD job", "see `sandbox jobs list`")
        plan = dict(result.plan)
        if not dataset.counts_public:
            plan["epsilon"] = epsilon  # the plan's own figure has the size in its digits
        charged = replace(result, epsilon=epsilon, plan=plan, charge=charge)
        card = write_model_card(
            ctx.zone.job_dir(job.id), job, dataset, charged, backend=ctx.backend.name
        )
        if not dataset.counts_public:
            # the card leaves the zone: no figure that gives the exact size back
            cut_released_card(card)
        return charged
