"""The end-to-end demo: every step a user takes, through the same service the CLI uses.

Each step prints the CLI command it stands for, so a reader can repeat it by hand.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privacy.dp_intervals import describe_metrics
from sandbox.jobspec import parse_job_toml

DEMO_FEATURES = [
    "age",
    "sex",
    "dx_chapter",
    "diabetes",
    "chf",
    "copd",
    "ckd",
    "cancer",
    "hba1c",
    "creatinine",
    "hemoglobin",
    "sodium",
    "sbp",
    "heart_rate",
    "bmi",
    "prior_admissions",
    "length_of_stay",
]
DEMO_LABEL = "readmitted_30d"


def demo_job_toml(epsilon: float = 1.0, epochs: int = 10) -> str:
    feats = ", ".join(f'"{f}"' for f in DEMO_FEATURES)
    return f"""
project = "readmission"
dataset = "cohort"
label = "{DEMO_LABEL}"
features = [{feats}]
[model]
kind = "mlp"
hidden = [64, 64]
[privacy]
epsilon = {epsilon}
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = {epochs}
batch_size = 1024
seed = 7
[resources]
gpus = 0
"""


def demo_federated_toml(epsilon: float = 1.0, rounds: int = 5) -> str:
    feats = ", ".join(f'"{f}"' for f in DEMO_FEATURES)
    return f"""
project = "readmission"
dataset = "cohort"
label = "{DEMO_LABEL}"
features = [{feats}]
mode = "federated"
[federated]
rounds = {rounds}
sites = "all"
min_sites = 3
local_epochs = 1
strategy = "fedavg"
[model]
kind = "logistic"
[privacy]
epsilon = {epsilon}
delta = 1e-6
max_grad_norm = 1.0
[training]
batch_size = 256
seed = 7
"""


def _submit_with_bar(
    svc: Any, user: Any, spec: Any, console: Console, label: str, total: int, key: str
) -> Any:
    """Submit ``spec`` with a live bar over ``total`` epochs or rounds (``key`` in the progress)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(label, total=total)
        job = svc.submit(
            user, spec, on_progress=lambda p: progress.update(task, completed=p.get(key, 0))
        )
        progress.update(task, completed=total)
    return job


def run_demo(
    patients: int = 50_000, keep: Path | None = None, as_json: bool = False
) -> dict[str, Any]:
    from connectors.cohort import write_cohort
    from sandbox.ray_backend import RayBackend
    from sandbox.service import Service
    from training.predict import predict_file

    console = Console(quiet=as_json)
    root = keep or Path(tempfile.mkdtemp(prefix="safe-zone-demo-")) / "zone"
    t0 = time.perf_counter()

    def step(cmd: str) -> None:
        console.print(f"[dim]$ {cmd}[/dim]")

    step(f"sandbox init --zone {root}")
    svc, op_token = Service.init_zone(root)
    svc.close()
    svc = Service(svc.zone, RayBackend(svc.zone.root))
    try:
        operator = svc.authenticate(op_token)
        step("sandbox user add sam --role steward; sandbox user add rita --role researcher")
        _, steward_token = svc.add_user(operator, "sam", "steward")
        _, researcher_token = svc.add_user(operator, "rita", "researcher")
        steward = svc.authenticate(steward_token)
        rita = svc.authenticate(researcher_token)

        step(f"sandbox dataset ingest cohort --demo --patients {patients}   # as sam")
        ds = svc.ingest_demo(steward, "cohort", patients, seed=0)
        console.print(
            f"  {ds.rows} rows, {ds.persons} persons across {len(ds.sites)} hospitals (pseudonymised)"
        )

        step('sandbox project create readmission --purpose "30-day readmission risk"   # as rita')
        svc.create_project(rita, "readmission", "30-day readmission risk model")
        step(
            "sandbox access request readmission --dataset cohort --columns ... --mechanism dp-sgd,federated,synthetic,dp-query --epsilon 3 --delta 1e-5"
        )
        req = svc.request_access(
            rita,
            "readmission",
            "cohort",
            [*DEMO_FEATURES, DEMO_LABEL, "hospital"],
            ["dp-sgd", "federated", "synthetic", "dp-query"],
            3.0,
            1e-5,
        )
        expires = datetime.now(UTC) + timedelta(days=90)
        step(f"sandbox access approve {req.id} --expires {expires.date()}   # as sam")
        grant = svc.approve(steward, req.id, expires_at=expires)

        spec = parse_job_toml(demo_job_toml())
        step("sandbox submit job.toml   # as rita: runs on a local Ray")
        job = _submit_with_bar(
            svc, rita, spec, console, "DP-SGD epochs", spec.training.epochs or 0, "epoch"
        )
        result = job.result or {}
        metrics = result.get("metrics", {})
        shown = describe_metrics(metrics)
        console.print(
            f"  job {job.id}: {job.state}; epsilon {result.get('epsilon', 0):.3f}; "
            f"DP AUROC {shown.get('auroc', 'n/a')}"
        )
        if "unreliable" in shown:
            console.print(f"  unreliable: {shown['unreliable']}")

        out = root.parent / "release"
        step(f"sandbox jobs result {job.id} --out {out}")
        svc.job_result(rita, job.id, out)
        new_rows = root.parent / "new_patients.csv"
        write_cohort(new_rows, 1000, seed=99, canaries=None, format="csv")
        step(
            f"sandbox model predict {out} --from {new_rows} --out {root.parent / 'scores.parquet'}"
        )
        scored = predict_file(out, new_rows, root.parent / "scores.parquet").scored

        fed_spec = parse_job_toml(demo_federated_toml())
        step("sandbox submit federated.toml   # as rita: Flower on Ray, one client per hospital")
        assert fed_spec.federated is not None
        fed_job = _submit_with_bar(
            svc, rita, fed_spec, console, "federated rounds", fed_spec.federated.rounds, "round"
        )
        fed = fed_job.result or {}
        for site, c in sorted(fed.get("sites", {}).items()):
            console.print(f"  {site}: epsilon {c['epsilon']:.3f}")
        left_out = len(fed.get("excluded") or []) + len(fed.get("left_out") or {})
        if left_out:
            console.print(
                f"  left out (too few patients for a useful DP guarantee): {left_out} site(s)"
            )

        dummy_out = root.parent / "dummy.parquet"
        step(
            f"sandbox synth dummy cohort --rows 1000 --out {dummy_out}   # free: from the contract alone"
        )
        dummy = svc.synth_dummy(rita, "cohort", 1000, dummy_out)
        console.print(f"  {dummy['rows']} dummy rows, epsilon charged: {dummy['charged_epsilon']}")

        synth_cols = [*DEMO_FEATURES, DEMO_LABEL, "hospital"]
        step("sandbox synth fit cohort --project readmission --epsilon 1 --method mst --rows 20000")
        synth_job = svc.synth_fit(
            rita,
            "readmission",
            "cohort",
            epsilon=1.0,
            delta=1e-6,
            method="mst",
            rows=20_000,
            columns=synth_cols,
            label=DEMO_LABEL,
        )
        sr = synth_job.result or {}
        console.print(
            f"  synthetic job {synth_job.id}: {sr.get('rows')} rows, epsilon {sr.get('epsilon', 0):.3f} charged"
        )
        step(f"sandbox synth release {synth_job.id}   # as sam, after reading the full report")
        svc.synth_report(steward, synth_job.id)
        svc.synth_release(steward, synth_job.id)
        step(f"sandbox synth report {synth_job.id}   # as rita: aggregate scores")
        agg = svc.synth_report(rita, synth_job.id)["report"]
        for key in ("quality", "tstr_auroc", "trtr_auroc", "new_row_share"):
            if key in agg and agg[key] is not None:
                console.print(f"  {key}: {agg[key]:.3f}")

        step(f"sandbox quote job.toml --curve --on synthetic:{synth_job.id}   # no charge")
        quote = svc.quote(rita, spec)
        curve = svc.quote_curve(
            rita,
            spec,
            f"synthetic:{synth_job.id}",
            root.parent / "quote",
            epsilons=(0.25, 1.0, 4.0),
        )
        console.print(
            f"  the job would spend epsilon {quote['epsilon']:.3f} (delta {quote['delta']:g})"
        )
        for pt in curve["points"]:
            auroc = pt["auroc"]
            console.print(
                f"  epsilon {pt['epsilon']:>4g}: AUROC on synthetic {auroc:.3f}"
                if auroc is not None
                else f"  epsilon {pt['epsilon']:>4g}: -"
            )
        console.print(f"  curve: {curve['png']}")

        step(
            "sandbox query run mean age --by hospital --project readmission --dataset cohort"
            " --epsilon 0.1   # as rita: a DP query, quoted then charged"
        )
        query: dict[str, Any] = {"dataset": "cohort", "kind": "mean", "column": "age"}
        query["by"] = "hospital"
        query["epsilon"] = 0.1
        quoted = svc.run_query(rita, "readmission", query, dry=True)
        asked = svc.run_query(rita, "readmission", query)
        console.print(
            f"  quoted epsilon {quoted['epsilon']:g}, charged {asked['epsilon']:g}; "
            f"mean age in {len(asked['figures'])} groups (the declared hospitals and (other)), e.g. "
            + ", ".join(
                f"{f['group']} {f['value']:.1f} ({f['ci_low']:.1f}-{f['ci_high']:.1f})"
                for f in asked["figures"][:2]
            )
        )

        step("sandbox budget readmission")
        bal = next(b for b in svc.budget(rita, "readmission") if not b.key.site)
        step("sandbox audit verify   # as sam")
        verified = svc.audit_verify(steward)
        summary: dict[str, Any] = {
            "zone": str(root),
            "dataset": {"rows": ds.rows, "persons": ds.persons, "sites": len(ds.sites)},
            "grant": {"id": grant.id, "epsilon": grant.epsilon, "delta": grant.delta},
            "job": {
                "id": job.id,
                "state": str(job.state),
                "epsilon_spent": result.get("epsilon"),
                "dp_metrics": metrics,
            },
            "budget": {
                "spent_epsilon": bal.spent_epsilon,
                "remaining_epsilon": bal.remaining_epsilon,
            },
            "synthetic": {
                "dummy_rows": dummy["rows"],
                "job": synth_job.id,
                "epsilon": sr.get("epsilon"),
                "report": agg,
                "quote_epsilon": quote["epsilon"],
                "curve": curve["points"],
            },
            "federated": {
                "job": fed_job.id,
                "state": str(fed_job.state),
                "rounds": fed.get("rounds"),
                "site_epsilon": {s: c["epsilon"] for s, c in fed.get("sites", {}).items()},
                "excluded": fed.get("excluded"),
                "dp_metrics": fed.get("metrics"),
            },
            "query": {
                "id": asked["id"],
                "kind": "mean age by hospital",
                "quoted_epsilon": quoted["epsilon"],
                "charged_epsilon": asked["epsilon"],
                "groups": len(asked["figures"]),
            },
            "spent_by": dict(bal.spent_by),
            "release": str(out),
            "scored_rows": scored,
            "audit": {"verified": verified.ok, "events": verified.checked},
            "seconds": round(time.perf_counter() - t0, 1),
        }
    finally:
        svc.close()
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        console.rule("summary")
        console.print(
            f"epsilon spent {summary['budget']['spent_epsilon']:.3f} of {grant.epsilon:g}, left {summary['budget']['remaining_epsilon']:.3f} (delta {grant.delta:g}, per person)"
        )
        shown = describe_metrics(metrics)
        console.print(
            f"DP AUROC {shown.get('auroc', 'n/a')}, DP accuracy {shown.get('accuracy', 'n/a')}"
            + (f" (unreliable: {shown['unreliable']})" if "unreliable" in shown else "")
        )
        console.print(
            "federated per-site epsilon: "
            + ", ".join(
                f"{s} {e:.3f}" for s, e in sorted(summary["federated"]["site_epsilon"].items())
            )
        )
        console.print(
            "spent by mechanism: "
            + ", ".join(f"{m} {e:.3f}" for m, e in summary["spent_by"].items())
            + f" (the DP query: epsilon {summary['query']['charged_epsilon']:g})"
        )
        console.print(f"audit chain verified: {verified.ok} ({verified.checked} events)")
        console.print(f"release in {out}; zone in {root}; {summary['seconds']} s")
    return summary
