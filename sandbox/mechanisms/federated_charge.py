"""A federated job's end: each site's report checked against its plan, each site charged
from the service's plan, and the global model's card.

The sites plan their DP-SGD on the training size the service gave each of them in the
config (``FederatedConfig.plan_sizes``: the dataset card's count x the training fraction),
the size the quote planned on. At the end the service makes the job's config again from
what it persisted (the job's spec, checked against its hash, and the dataset's record:
``federated.job_config``, the same config the payload got at admission), rebuilds every
site's plan with ``plan_for`` from that config and its own size for the site (the size the
site reports must be that one), checks that the site ran that plan (size, noise multiplier,
sample rate, steps per round, evaluation noise, target; no more steps, evaluations or rounds
than planned; its delta) and charges the plan's *full* figure (every round trained, the
evaluation released), never the epsilon the server reports. The full figure is the
accountant's for the planned releases, which ``plan_job`` calibrated to the target. A site
that trained fewer rounds (not sampled, refused, dropped) is charged the full figure too: its
own count of its steps is not evidence.

Every reservation of a succeeded job is committed: a site with a checked plan is charged
its plan's figure (with private counts its reservation: the plan's digits follow the size);
a site without one (left out at setup after counting its rows, failed) keeps its whole
reservation, since the server's word that a site read nothing is not evidence either.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from connectors.preprocess import FeaturePlan
from foundation.errors import IntegrityError, SpecError
from policies.roles import Actor
from privacy.dp_intervals import describe_metrics
from sandbox.context import ZoneContext
from sandbox.disclosure import redact_counts
from sandbox.jobs import JobRecord
from sandbox.jobspec import JobSpec, parse_stored_spec
from sandbox.mechanisms.base import record_charge
from sandbox.mechanisms.plans import ReportMismatch, check_figures, not_a_result
from sandbox.release import learned_verdict
from sandbox.results import FederatedResult
from training.federated.config import FederatedConfig
from training.federated.payload import SUMMARY_FILE, WEIGHTS_FILE, load_payload
from training.federated.site_plan import SitePlan, plan_for

#: a site's plan figures in the server's report (``SitePlan.card``), checked one by one
PLAN_FIGURES = (
    "n",
    "noise_multiplier",
    "sample_rate",
    "steps_per_round",
    "eval_sigma",
    "target_epsilon",
)


def persisted_spec(job: JobRecord) -> JobSpec:
    """The job's spec parsed back from its row, checked against the row's hash.

    ``JobSpec.to_dict`` writes ``federated.mu`` for every strategy while the parser takes it
    only with fedprox: it is dropped for the others (the spec is the same, its hash too)."""
    data = copy.deepcopy(job.spec)
    fed = data.get("federated")
    if isinstance(fed, dict) and fed.get("strategy") != "fedprox":
        fed.pop("mu", None)
    spec = parse_stored_spec(data)
    if spec.spec_hash() != job.spec_hash:
        raise IntegrityError(
            f"job {job.id}: its stored spec does not match its hash; it is not charged from it"
        )
    return spec


def site_plan(cfg: FederatedConfig, site: str, info: Mapping[str, Any], *, show: bool) -> SitePlan:
    """The service's plan for ``site`` (on the config's size for it; a config without sizes,
    one made outside the service, on the size the site reports), once the report matches it."""
    label = f"site {site!r}'s"
    card = info.get("plan")
    if not isinstance(card, Mapping):
        raise ReportMismatch("plan", f"no plan for site {site!r}")
    n = card.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ReportMismatch("n", f"no training size for site {site!r}")
    try:
        plan = plan_for(cfg, site, cfg.plan_size(site, n))
    except SpecError:
        raise ReportMismatch(
            "n", f"a training size for site {site!r} that no plan can be made for"
        ) from None
    check_figures(plan.card(), card, PLAN_FIGURES, show=show, label=label)
    limits = {
        "steps": plan.planned_steps(cfg.rounds),
        "evals": plan.planned_evals,
        "rounds": cfg.rounds,
    }
    check_figures(limits, info, tuple(limits), show=show, at_most=tuple(limits), label=label)
    check_figures({"delta": cfg.delta}, info, ("delta",), show=True, label=label)
    return plan


def check_federated_report(cfg: FederatedConfig, result: Any, *, show: bool) -> FederatedResult:
    """``result`` once every site in it ran the plan the service rebuilds for it."""
    if not isinstance(result, FederatedResult):
        raise not_a_result("federated")
    for site, info in result.sites.items():
        if site not in cfg.sites:
            raise ReportMismatch("sites", "a site the job's plan does not hold")
        site_plan(cfg, site, info, show=show)
    return result


def charge_sites(
    ctx: ZoneContext,
    actor: Actor,
    job: JobRecord,
    cfg: FederatedConfig,
    result: FederatedResult,
    *,
    show: bool,
) -> dict[str, dict[str, Any]]:
    """Commit every reservation of the succeeded job (see the module docstring); returns
    each site's charge and ledger event."""
    charges: dict[str, dict[str, Any]] = {}
    for r in ctx.ledger.open_reservations():
        if r.job_id != job.id:
            continue
        site, epsilon = r.key.site, r.epsilon
        info = result.sites.get(site)
        if info is not None and show:
            # the accountant's figure for the site's planned releases, never the server's
            epsilon = site_plan(cfg, site, info, show=show).planned_epsilon(cfg.rounds)
        ev = ctx.ledger.commit(r.reservation_id, epsilon, cfg.delta, actor=actor.name)
        charges[site] = {"epsilon": epsilon, "ledger_event": ev.event_id}
    return charges


def charge_federated(
    ctx: ZoneContext, actor: Actor, job: JobRecord, cfg: FederatedConfig, result: Any
) -> FederatedResult:
    """Check, charge every site, write the card: the charged result. ``cfg`` is the job's
    config as the service makes it from what it persisted (``federated.job_config``)."""
    counts_public = ctx.job_dataset(job).counts_public
    result = check_federated_report(cfg, result, show=counts_public)
    job_dir = ctx.zone.job_dir(job.id)
    summary = read_summary(job_dir)
    charges = charge_sites(ctx, actor, job, cfg, result, show=counts_public)
    record = record_charge(
        ctx,
        actor,
        job,
        {
            **{f"epsilon@{s}": c["epsilon"] for s, c in sorted(charges.items())},
            "server_epsilon": result.server_epsilon,
        },
        None,
    )
    charged = replace(
        result,
        sites=dict(sorted(charges.items())),
        epsilon=max((c["epsilon"] for c in charges.values()), default=0.0),
        delta=cfg.delta,
        charge=record,
    )
    _write_preprocessing(job_dir, job_dir / "payload.json")
    card = write_federated_card(job_dir, job, summary, charged)
    shown = json.loads(card.read_text())
    if not counts_public:
        # the card leaves the zone: no per-site figure that gives a site's size back
        shown = redact_counts(shown)
    # each site's epsilon on the card is its charge, never the figure the server reported
    for site, info in (shown.get("privacy", {}).get("per_site") or {}).items():
        if isinstance(info, dict) and site in charges:
            info["epsilon"] = charges[site]["epsilon"]
            if isinstance(info.get("plan"), dict) and "epsilon" in info["plan"]:
                info["plan"]["epsilon"] = charges[site]["epsilon"]
    card.write_text(json.dumps(shown, indent=2, sort_keys=True, default=str))
    return charged


def read_summary(job_dir: Path) -> dict[str, Any]:
    path = job_dir / "federated" / SUMMARY_FILE
    return dict(json.loads(path.read_text())) if path.exists() else {}


def read_left_out(job_dir: Path) -> dict[str, str]:
    path = job_dir / "left_out.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _write_preprocessing(job_dir: Path, payload_path: Path) -> None:
    """The release's preprocessing: the same contract-only feature plan every site used."""

    payload = load_payload(payload_path.resolve())
    plan = FeaturePlan.from_contract(payload.contract, payload.config.features)
    (job_dir / "preprocessing.json").write_text(
        json.dumps(plan.to_dict(), indent=2, sort_keys=True)
    )


def write_federated_card(
    job_dir: Path, job: JobRecord, summary: dict[str, Any], out: FederatedResult
) -> Path:
    """The global model's card: every site's epsilon and delta, rounds, strategy, DP metrics."""
    fed_dir = job_dir / "federated"
    if (fed_dir / WEIGHTS_FILE).exists():
        shutil.copy2(fed_dir / WEIGHTS_FILE, job_dir / "model.safetensors")
    spec = job.spec
    card = {
        "job": job.id,
        "project": job.project,
        "dataset": job.dataset,
        "mechanism": "federated",
        "label": spec["label"],
        "features": spec["features"],
        "columns": sorted([*spec["features"], spec["label"]]),
        "model": spec["model"],
        "federated": {k: v for k, v in spec["federated"].items()},
        "rounds_done": out.rounds,
        "privacy": {
            "unit": "person (pseudonymous identifier), per site",
            "neighbouring_relation": "add/remove one person",
            "composition": "sites hold disjoint patients: parallel composition, one budget per site",
            "accountant": "rdp",
            "per_site": {
                s: {
                    k: info.get(k)
                    for k in ("epsilon", "delta", "steps", "rounds", "n", "status", "plan")
                }
                for s, info in summary.get("sites", {}).items()
            },
            "server_client_level": summary.get("server_dp"),
        },
        "per_site_dp_metrics": {
            s: info.get("dp_metrics") for s, info in summary.get("sites", {}).items()
        },
        "global_dp_metrics": summary.get("global_dp_metrics"),
        "evaluation": summary.get("evaluation"),
        "global_dp_metrics_display": describe_metrics(summary.get("global_dp_metrics") or {}),
        # read off the pooled DP AUROC's interval: post-processing, no charge
        "learned": learned_verdict(summary.get("global_dp_metrics")),
        # each site's update rule and learning rate (the spec's; no epochs in federated mode)
        "training": persisted_spec(job).to_dict()["training"],
        "per_site_dp_metrics_display": {
            s: describe_metrics(info.get("dp_metrics") or {})
            for s, info in summary.get("sites", {}).items()
        },
        "excluded_sites": summary.get("excluded"),
        "dropped_sites": summary.get("dropped"),
        "spec_hash": job.spec_hash,
        "audit_event": {"seq": out.charge.audit_seq, "hash": out.charge.audit_hash},
    }
    path = job_dir / "model_card.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    return path
