"""The service's federated path: per-site reservations, Flower on the zone's Ray, per-site charges.

Sites hold disjoint patients, so the ledger keeps one budget per site
(``BudgetKey(project, dataset, site)``) and a federated job's spend on one hospital's patients
is charged to that hospital's budget only (parallel composition). The flow mirrors DP-SGD:

1. the checks every spec passes first (``sandbox.mechanisms.precheck``: the grant decision,
   mechanism ``federated``, then the site plan, ``plan_sites``: which sites take part,
   decided before any row is read, at least ``min_sites`` of them, and each site's budget);
2. every site's epsilon is reserved up front, all or nothing (a site without budget refuses
   the whole job before any data is opened);
3. Flower's Simulation Engine runs the ServerApp and one ClientApp per site on Ray;
4. each round the server writes every site's cumulative epsilon (from the accountant) and
   the service writes one audit event per round (the server's figures, for the record);
5. at the end the service checks each site's report against the site's plan it rebuilds
   from the config it kept with the job, and commits every site's reservation with the
   plan's full figure (``sandbox.mechanisms.federated_charge``), never the server's; on
   failure a site that touched data keeps its whole reservation, and a report that does not
   match the plan keeps every site's.

Server-side client-level DP protects the *same* release a second time (unit: one site, which
covers any one person in it): the released model then satisfies both guarantees, and the
ledger charges the per-site figure, which is the person-level bound. The server's figure is
recorded in the card and the audit log, not added on top: adding would double-count one
release.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import BudgetExceeded, ZoneError
from policies.roles import Actor
from privacy.budget_events import BudgetKey
from sandbox.backend import Resources
from sandbox.context import ProgressFn, ZoneContext
from sandbox.jobs import JobRecord
from sandbox.jobspec import JobSpec
from sandbox.mechanisms.base import Admission, JobMechanism, close_reservations
from sandbox.mechanisms.federated_charge import (
    charge_federated,
    check_federated_report,
    persisted_spec,
    read_left_out,
    read_summary,
    write_federated_card,
)

# the plan of the sites lives in federated_plan (precheck imports it without a circle);
# _config is re-exported for the tests that build a config from a spec
from sandbox.mechanisms.federated_plan import SitePlan, plan_sites
from sandbox.mechanisms.federated_plan import _config as _config
from sandbox.mechanisms.plans import ReportMismatch
from sandbox.mechanisms.precheck import precheck
from sandbox.results import FederatedResult, JobResult
from training.federated.config import FederatedConfig
from training.federated.payload import FederatedPayload

#: a federated job may take this long before it is stopped (and charged what it spent)
FEDERATED_TIMEOUT_S = 3600.0


def job_config(ctx: ZoneContext, job: JobRecord) -> FederatedConfig:
    """The config the service made at admission, made again from the job's persisted spec
    and the dataset's record (never read from the payload file a worker could rewrite)."""
    return plan_sites(persisted_spec(job), ctx.job_dataset(job)).config


def reserve_sites(
    ctx: ZoneContext,
    actor: Actor,
    spec: JobSpec,
    sites: tuple[str, ...],
    job_id: str,
    reserved: dict[str, str],
) -> None:
    """Reserve every site's epsilon, all or nothing (each one recorded in ``reserved``)."""
    try:
        for site in sites:
            reserved[site] = ctx.ledger.reserve(
                BudgetKey(spec.project, spec.dataset, site),
                spec.privacy.epsilon,
                spec.privacy.delta,
                job_id=job_id,
                actor=actor.name,
            )
    except BudgetExceeded as exc:
        for rid in reserved.values():
            ctx.ledger.release(
                rid, actor=actor.name, reason="another site of the job was over budget"
            )
        reserved.clear()
        raise BudgetExceeded(f"{exc} (no site was charged)") from None


def build_payload(
    ctx: ZoneContext,
    spec: JobSpec,
    contract_dict: dict[str, Any],
    dataset_path: str,
    plan: SitePlan,
    job_id: str,
) -> Path:
    job_dir = ctx.zone.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    payload = FederatedPayload(
        job_id=job_id,
        dataset=spec.dataset,
        dataset_path=Path(dataset_path).resolve(),
        contract=SchemaContract.from_dict(contract_dict),
        config=plan.config,
        out_dir=(job_dir / "federated").resolve(),
        # per-job noise secret from OS randomness: the researcher knows the seed, never this
        noise_secret_hex=secrets.token_hex(32),
    )
    path = job_dir / "payload.json"
    path.write_text(payload.to_json())
    path.chmod(0o600)
    (job_dir / "left_out.json").write_text(json.dumps(plan.left_out, sort_keys=True))
    return path


class FederatedMechanism(JobMechanism):
    kind = "federated"

    def admit(
        self, ctx: ZoneContext, actor: Actor, request: Any, job_id: str, reserved: dict[str, str]
    ) -> Admission:
        # every check a quote runs too (columns, the access decision, the sites taking part
        # and their plans, the budget of each): a spec refused never holds budget
        pre = precheck(ctx, actor, request)
        spec, dataset, contract, plan = pre.spec, pre.dataset, pre.contract, pre.federated_plan
        resources = Resources(cpus=spec.resources.cpus, gpus=spec.resources.gpus)
        ctx.backend.check_resources(resources)
        reserve_sites(ctx, actor, spec, plan.sites, job_id, reserved)
        payload_path = build_payload(
            ctx, spec, contract.to_dict(), str(ctx.dataset_path(dataset)), plan, job_id
        )
        return Admission(
            project=spec.project,
            dataset=spec.dataset,
            spec=spec.to_dict(),
            spec_hash=spec.spec_hash(),
            reservations=dict(reserved),
            work=payload_path,
            resources=resources,
            details={"grant": pre.grant, "sites": len(plan.sites)},
            dataset_version=dataset.version,
        )

    def execute(
        self,
        ctx: ZoneContext,
        actor: Actor,
        job: JobRecord,
        work: Any,
        on_progress: ProgressFn | None,
    ) -> JobResult:
        from training.federated.simulation import run_federated_simulation

        rounds = int((job.spec.get("federated") or {}).get("rounds", 0))
        counts_public = ctx.job_dataset(job).counts_public

        def on_round(line: dict[str, Any]) -> None:
            sites = line.get("sites", {})
            if any(v.get("status") == "trained" for v in sites.values()):
                ctx.jobs.mark_data_opened(job.id)
            # each round's charge is on the record (cumulative epsilon per site, from the
            # accountant)
            ctx.audit.append(
                actor.name,
                "federated.round",
                "ok",
                job.id,
                {
                    "round": int(line.get("round", 0)),
                    **{
                        f"epsilon@{s}": float(v.get("epsilon") or 0.0)
                        for s, v in sorted(sites.items())
                    },
                    "dropped": ",".join(line.get("dropped", [])),
                },
            )
            progress: dict[str, Any] = {"round": int(line.get("round", 0)), "rounds": rounds}
            if counts_public:
                # a site's cumulative accountant figure is a function of its size
                progress["epsilon"] = {s: v.get("epsilon") for s, v in sites.items()}
            ctx.jobs.set_progress(job.id, progress)
            if on_progress is not None:
                on_progress(progress)

        run = run_federated_simulation(
            Path(work),
            timeout_s=FEDERATED_TIMEOUT_S,
            zone_dir=ctx.zone.root,
            on_round=on_round,
            # the sites' actors are named in the job's project's namespace
            namespace=job.project,
        )
        # a completed run set its sites up, which reads their rows, whatever they recorded
        ctx.jobs.mark_data_opened(job.id)
        summary = dict(run.summary)
        result = FederatedResult(
            # the sites' own figures, before the service charges them (``charge``)
            sites={s: dict(v) for s, v in (summary.get("sites") or {}).items()},
            epsilon=0.0,
            delta=float(job.spec["privacy"]["delta"]),
            rounds=run.rounds,
            dropped=list(run.dropped),
            excluded=list(summary.get("excluded") or []),
            left_out=read_left_out(ctx.zone.job_dir(job.id)),
            server_epsilon=run.server_epsilon,
            metrics=summary.get("global_dp_metrics") or {},
            evaluation=summary.get("evaluation"),
            optimizer=persisted_spec(job).training.optimizer_summary(),
        )
        return self.check_report(ctx, job, work, result)

    def check_report(self, ctx: ZoneContext, job: JobRecord, work: Any, result: Any) -> JobResult:
        show = ctx.job_dataset(job).counts_public
        return check_federated_report(job_config(ctx, job), result, show=show)

    def charge(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, result: JobResult
    ) -> JobResult:
        return charge_federated(ctx, actor, job, job_config(ctx, job), result)

    def settle_failed(
        self, ctx: ZoneContext, actor: Actor, job: JobRecord, error: ZoneError
    ) -> str:
        """A site that read its rows keeps its whole reservation; the others are released.
        A job whose report did not match the plan keeps every reservation: the sites ran
        before the report was read, and what they say they touched is not evidence."""
        if isinstance(error, ReportMismatch):
            return close_reservations(ctx, actor, job, opened=True, error=error)
        summary = read_summary(ctx.zone.job_dir(job.id))
        sites = summary.get("sites", {})
        # a site left out at setup had read its rows to decide: it keeps its charge
        excluded = {e.get("site") for e in summary.get("excluded") or [] if isinstance(e, dict)}
        did = set()
        for r in ctx.ledger.open_reservations():
            if r.job_id != job.id:
                continue
            info = sites.get(r.key.site) or {}
            touched = r.key.site in excluded or (
                info.get("touched") is not False and float(info.get("epsilon") or 0) > 0
            )
            if touched:
                ctx.ledger.commit(r.reservation_id, r.epsilon, r.delta, actor=actor.name)
                did.add("committed")
            else:
                ctx.ledger.release(
                    r.reservation_id,
                    actor=actor.name,
                    reason=f"failed before site data ({error.kind})",
                )
                did.add("released")
        return ",".join(sorted(did)) or "none"


__all__ = ["FederatedMechanism", "plan_sites", "reserve_sites", "write_federated_card"]
