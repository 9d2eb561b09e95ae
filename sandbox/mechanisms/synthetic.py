"""Synthetic data fitted inside the zone: DP (charged like a job) or a steward's non-DP
baseline (charges nothing; its rows and report are held until a steward releases them).

A DP fit is planned by the service at admission (``privacy.job_plan.plan_synth``: the
synthesizer's Gaussian releases follow from the contract's columns, the target and delta,
never from rows); the service makes the plan again from the job's persisted spec and the
dataset's contract (``synth_plan``) to check the worker's report and to charge the
accountant's epsilon for the planned releases. The worker reports the releases it made
(``SynthResult.steps``); any that differ from the plan fail the job
(``sandbox.mechanisms.plans``)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from connectors.schema import SchemaContract
from connectors.schema_columns import Role as ColumnRole
from foundation.errors import IntegrityError, PolicyDenied, SpecError
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Action, Actor, Role
from privacy.budget_events import BudgetKey
from privacy.job_plan import SynthPlan, plan_synth
from privacy.synth import SynthMethod, is_dp
from privacy.synth.codec import Codec
from sandbox.backend import Resources
from sandbox.context import ZoneContext
from sandbox.disclosure import cut_released_card
from sandbox.jobs import JobRecord
from sandbox.mechanisms.base import WHOLE_DATASET, Admission, BackendMechanism, commit_charge
from sandbox.mechanisms.plans import ReportMismatch, check_figures, not_a_result
from sandbox.release import write_synth_card
from sandbox.results import JobResult, SynthResult
from sandbox.synth_worker import restricted_contract, run_synth_job
from sandbox.worker import NOISE_SECRET_KEY, new_noise_secret

MAX_ROWS = 5_000_000


def governed_contract(contract: SchemaContract) -> SchemaContract:
    """The contract of governed storage: direct identifiers are gone after ingest."""
    d = contract.to_dict()
    drop = {c.name for c in contract.columns if c.role is ColumnRole.DIRECT_IDENTIFIER}
    d["columns"] = {k: v for k, v in d["columns"].items() if k not in drop}
    return SchemaContract.from_dict(d)


@dataclass(frozen=True)
class SynthRequest:
    project: str
    dataset: str
    epsilon: float | None
    delta: float = 1e-6
    method: str = "mst"
    rows: int = 10_000
    seed: int = 0
    columns: tuple[str, ...] | None = None
    label: str | None = None


def _method(name: str) -> SynthMethod:
    try:
        return SynthMethod(name)
    except ValueError:
        raise SpecError(
            "--method",
            "is not a known method",
            f"use one of: {', '.join(m.value for m in SynthMethod)}",
        ) from None


class SyntheticMechanism(BackendMechanism):
    kind = "synthetic"
    worker = staticmethod(run_synth_job)

    def resources(self, job: JobRecord) -> Resources:
        return Resources(cpus=1, gpus=0)

    def admit(
        self, ctx: ZoneContext, actor: Actor, request: Any, job_id: str, reserved: dict[str, str]
    ) -> Admission:
        req: SynthRequest = request
        kind = _method(req.method)
        dp = is_dp(kind)
        if not 1 <= req.rows <= MAX_ROWS:
            raise SpecError("--rows", "must be between 1 and 5,000,000", "ask for fewer rows")
        # the version the fit reads: its grant's pinned one, else the latest
        rec = ctx.dataset_version_for(req.project, req.dataset, "synthetic" if dp else "none")
        contract = governed_contract(SchemaContract.from_dict(rec.contract))
        cols = list(req.columns or [c.name for c in contract.columns])
        unknown = [c for c in cols if c not in set(contract.names)]
        if unknown:
            raise SpecError(
                "--columns",
                f"{unknown[0]!r} is not a governed column of {req.dataset!r}",
                "see `sandbox dataset show`",
            )
        # the person column bounds each person's contribution (one row per person): the
        # synthesizer needs it whether or not the researcher named it; it is never
        # synthesised or released (pseudonyms are not data)
        if contract.identifier is not None and contract.identifier not in cols:
            cols.insert(0, contract.identifier)
        restricted = restricted_contract(contract.to_dict(), cols)
        if dp:
            self._decide(ctx, actor, req, contract, cols)
            # what the synthesizer would refuse (a column with no declared domain), now,
            # before anything is reserved
            Codec.from_contract(SchemaContract.from_dict(restricted))
            assert req.epsilon is not None  # checked by _decide
            # the releases the synthesizer will make, planned from the contract alone (a
            # target no noise reaches is refused before anything is reserved): the charge
            # is their epsilon, whatever the worker reports
            plan_synth(kind.value, SchemaContract.from_dict(restricted), req.epsilon, req.delta)
            reserved[WHOLE_DATASET] = ctx.ledger.reserve(
                BudgetKey(req.project, req.dataset),
                req.epsilon,
                req.delta,
                job_id=job_id,
                actor=actor.name,
            )
        elif actor.role is not Role.STEWARD:
            raise PolicyDenied(
                f"method {kind.value} is not differentially private: only a data steward may run it",
                missing=("a DP method (mst, dp-copula)",),
                grantor="data steward",
            )
        ctx.store.get_project(req.project)
        spec = {
            "method": kind.value,
            "epsilon": req.epsilon,
            "delta": req.delta,
            "rows": req.rows,
            "seed": req.seed,
            "columns": cols,
        }
        labels = [c for c in cols if c in contract.label_names()]
        features = [
            c.name for c in contract.columns if c.name in cols and c.role is ColumnRole.FEATURE
        ]
        payload = {
            "zone_root": str(ctx.zone.root),
            "db_url": ctx.zone.db_url,
            "job_id": job_id,
            "dataset": req.dataset,
            "dataset_path": str(ctx.dataset_path(rec)),
            "contract": restricted,
            "method": kind.value,
            "epsilon": req.epsilon,
            "delta": req.delta,
            "rows": req.rows,
            "seed": req.seed,
            "label": req.label or (labels[0] if labels else None),
            "features": features,
            NOISE_SECRET_KEY: new_noise_secret(),
        }
        return Admission(
            project=req.project,
            dataset=req.dataset,
            spec=spec,
            spec_hash=hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
            reservations=dict(reserved),
            work=payload,
            resources=Resources(cpus=1, gpus=0),
            details={"dp": dp},
            dataset_version=rec.version,
        )

    @staticmethod
    def _decide(
        ctx: ZoneContext, actor: Actor, req: SynthRequest, contract: SchemaContract, cols: list[str]
    ) -> None:
        if req.epsilon is None or not (req.epsilon > 0 and math.isfinite(req.epsilon)):
            raise SpecError("--epsilon", "must be a number > 0 for a DP method", "e.g. --epsilon 3")
        if actor.role is not Role.RESEARCHER:
            raise PolicyDenied(
                "DP synthetic releases are requested by researchers",
                missing=("role researcher",),
                grantor="zone operator",
            )
        decision = decide_job_access(
            JobAccessRequest(
                user=actor.name,
                role=actor.role,
                project=req.project,
                dataset=req.dataset,
                columns=frozenset(c for c in cols if c != contract.identifier),
                mechanism=Mechanism.SYNTHETIC,
                epsilon=req.epsilon,
                delta=req.delta,
                action=Action.SYNTH_FIT,
            ),
            ctx.store.project_view(req.project),
            ctx.store.grants_for(req.project, req.dataset),
            ctx.clock(),
        )
        if not decision.allowed:
            raise PolicyDenied(decision.reason, missing=decision.missing, grantor=decision.grantor)

    def check_report(self, ctx: ZoneContext, job: JobRecord, work: Any, result: Any) -> JobResult:
        return check_synth_report(result, synth_plan(ctx, job))

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        plan = synth_plan(ctx, job)
        result = check_synth_report(result, plan)
        if job.reservation_id is None or plan is None:
            # a steward's non-DP baseline: nothing charged; its output is held for a steward
            ctx.audit.append(
                actor.name, "job.uncharged", "ok", job.id, {"dry_run": False, "kind": self.kind}
            )
            return result
        # the accountant's epsilon for the service's planned releases, never the worker's
        epsilon, delta = plan.epsilon, plan.delta
        charge = commit_charge(ctx, actor, job, epsilon, delta)
        charged = replace(result, epsilon=epsilon, delta=delta, charge=charge)
        card = write_synth_card(ctx.zone.job_dir(job.id), job, charged)
        if not ctx.job_dataset(job).counts_public:
            # the card leaves the zone: the same cut as every researcher view
            cut_released_card(card)
        return charged


def synth_plan(ctx: ZoneContext, job: JobRecord) -> SynthPlan | None:
    """The service's plan of a synthetic-data job, made again from what the service
    persisted (the job's spec, the dataset's contract): None for a non-DP baseline."""
    spec = job.spec
    if hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest() != job.spec_hash:
        raise IntegrityError(
            f"job {job.id}: its stored spec does not match its hash; it is not charged from it"
        )
    if not is_dp(str(spec["method"])):
        return None
    rec = ctx.job_dataset(job)
    contract = governed_contract(SchemaContract.from_dict(rec.contract))
    restricted = SchemaContract.from_dict(restricted_contract(contract.to_dict(), spec["columns"]))
    return plan_synth(str(spec["method"]), restricted, float(spec["epsilon"]), float(spec["delta"]))


def check_synth_report(result: Any, plan: SynthPlan | None) -> SynthResult:
    """``result`` once its releases match the service's plan (a non-DP baseline has no plan
    and must report no releases)."""
    if not isinstance(result, SynthResult):
        raise not_a_result("synthetic-data")
    if plan is None:
        if result.dp or result.steps:
            raise ReportMismatch("dp", "DP releases for a method the service did not plan as DP")
        return result
    if not result.dp:
        raise ReportMismatch("dp", "a non-DP fit for a DP method")
    # the synthesizer's figures are not functions of the size: they may be shown
    check_figures({"delta": plan.delta}, {"delta": result.delta}, ("delta",), show=True)
    check_figures(
        {"releases": len(plan.steps)}, {"releases": len(result.steps)}, ("releases",), show=True
    )
    for i, (want, got) in enumerate(zip(plan.steps, result.steps, strict=True)):
        check_figures(
            want.to_dict(),
            got if isinstance(got, dict) else None,
            ("noise_multiplier", "sample_rate", "steps"),
            show=True,
            label=f"release {i + 1}'s",
        )
    # the steps as planned (the report matched them)
    return replace(result, steps=[s.to_dict() for s in plan.steps])
