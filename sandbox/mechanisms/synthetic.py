"""Synthetic data fitted inside the zone: DP (charged like a job) or a steward's non-DP
baseline (charges nothing; its rows and report are held until a steward releases them)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from connectors.schema import SchemaContract
from connectors.schema_columns import Role as ColumnRole
from foundation.errors import PolicyDenied, SpecError
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Action, Actor, Role
from privacy.budget_events import BudgetKey
from privacy.synth import SynthMethod, is_dp
from privacy.synth.codec import Codec
from sandbox.backend import Resources
from sandbox.context import ZoneContext
from sandbox.disclosure import cut_released_card
from sandbox.jobs import JobRecord
from sandbox.mechanisms.base import WHOLE_DATASET, Admission, BackendMechanism, commit_charge
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
        rec = ctx.store.get_dataset(req.dataset)
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
            "dataset_path": rec.path,
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

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        if not isinstance(result, SynthResult):
            raise SpecError("job", "is not a synthetic-data job", "see `sandbox jobs list`")
        if job.reservation_id is None:
            # a steward's non-DP baseline: nothing charged; its output is held for a steward
            ctx.audit.append(
                actor.name, "job.uncharged", "ok", job.id, {"dry_run": False, "kind": self.kind}
            )
            return result
        epsilon, delta = float(result.epsilon or 0.0), float(result.delta or 0.0)
        charge = commit_charge(ctx, actor, job, epsilon, delta)
        charged = replace(result, charge=charge)
        card = write_synth_card(ctx.zone.job_dir(job.id), job, charged)
        if not ctx.store.get_dataset(job.dataset).counts_public:
            # the card leaves the zone: the same cut as every researcher view
            cut_released_card(card)
        return charged
