"""``sandbox submit`` and ``sandbox jobs``: run DP jobs and fetch their releases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sandbox.cli.common import (
    JsonOpt,
    RayOpt,
    TokenOpt,
    ZoneOpt,
    console,
    emit,
    figure,
    session,
    show_curve,
    show_table,
)

app = typer.Typer(help="Jobs and their releases.", no_args_is_help=True)


def _metric_lines(evaluation: str | None, metrics: dict[str, Any], title: str) -> None:
    """Each DP metric as "0.702 (95% CI 0.655-0.748)", then "unreliable: <reason>" when the
    evaluation is flagged, then whether the DP AUROC's interval shows that the model learned;
    "evaluation: skipped" when none was run (``--json`` has it all)."""
    from privacy.dp_intervals import describe_metrics
    from sandbox.release import learned_verdict

    if evaluation == "skipped":
        console.print("  evaluation: skipped (no DP metrics, no evaluation charge)")
        return
    lines = describe_metrics(metrics)
    if not lines:
        return
    names = {"auroc": "AUROC", "accuracy": "accuracy", "ece": "ECE"}
    console.print(f"  {title}:")
    for key, label in names.items():
        if key in lines:
            console.print(f"    {label} {lines[key]}")
    if "unreliable" in lines:
        console.print(f"    [bold]unreliable[/bold]: {lines['unreliable']}")
    if "auroc" in lines:
        _learned_line(learned_verdict(metrics))


def _learned_line(learned: Any) -> None:
    """``learned: yes; the DP AUROC's 95% interval ... lies above 0.5 ...`` (the card's
    ``learned``, or the same read off a result's metrics)."""
    if learned:
        console.print(f"  [bold]learned: {learned['verdict']}[/bold]; {learned['statement']}")


def _optimizer_line(optimizer: Any) -> None:
    """``optimizer adam, lr 0.03`` (+ weight decay for adamw); nothing for a result stored
    before the optimizer was recorded."""
    if not optimizer:
        return
    extra = f", weight decay {optimizer['weight_decay']:g}" if "weight_decay" in optimizer else ""
    console.print(
        f"  optimizer {optimizer['name']}, lr {optimizer['lr']:g}{extra} "
        "(on the privatized gradient: no privacy cost)"
    )


def _tuning_line(tuning: Any) -> None:
    """``hyperparameters chosen on dummy rows: lr 0.03, epochs 38, ...`` for a spec whose
    "auto" fields the zone chose (``sandbox tune`` shows the whole search)."""
    if not tuning:
        return
    chosen = ", ".join(f"{k} {v:g}" for k, v in tuning["chosen"].items())
    console.print(
        f"  hyperparameters chosen on {tuning['source']} rows (no charge): {chosen} "
        "(docs/tuning.md)"
    )


def _summary(rec: Any) -> None:
    from sandbox.results import DpsgdResult, FederatedResult, SynthResult, parse_result

    r = parse_result(rec.result)
    # a dry run says so from its first line, whatever its state (it has no result until it ends)
    tag = " (dry run: nothing is charged)" if getattr(rec, "dry_run", False) else ""
    console.print(f"job [bold]{rec.id}[/bold]{tag}: {rec.state}")
    if isinstance(r, FederatedResult):
        left_out = len(r.excluded) + len(r.left_out)
        console.print(
            f"  federated: {r.rounds} rounds; dropped {', '.join(r.dropped) or 'none'}; "
            f"left out {left_out}"
        )
        for site, c in sorted(r.sites.items()):
            console.print(f"    {site}: epsilon {fmt3(c['epsilon'])} (delta {r.delta:g})")
        _optimizer_line(r.optimizer)
        _metric_lines(r.evaluation, r.metrics, "global DP metrics (all sites' histograms pooled)")
    elif isinstance(r, DpsgdResult) and r.dry_run:
        # nothing was spent: what a dry run can say is what the job would spend
        would = r.would_spend or {}
        submitted = (
            f"; submitted, it would spend epsilon {fmt3(would['epsilon'])}, delta "
            f"{would['delta']:g} (its quote)"
            if would
            else ""
        )
        console.print(f"  dry run on {r.dry_run} rows, nothing charged{submitted}")
        console.print(f"  clipping {r.clipping}")
        _tuning_line(r.tuning)
        _optimizer_line(r.optimizer)
        _metric_lines(r.evaluation, r.metrics, "metrics on the dry run's rows")
    elif isinstance(r, DpsgdResult):
        console.print(
            f"  epsilon spent {fmt3(r.epsilon)} (delta {r.delta:g}), clipping {r.clipping}"
        )
        _tuning_line(r.tuning)
        _optimizer_line(r.optimizer)
        _metric_lines(r.evaluation, r.metrics, "DP metrics")
    elif isinstance(r, SynthResult):
        charged = f"epsilon {fmt3(r.epsilon)}" if r.dp else "not DP: held for a steward"
        console.print(f"  synthetic ({r.method}): {r.rows} rows; {charged}")
    if rec.error:
        console.print(f"  error: {rec.error}")


def _kind(job: Any) -> str:
    """A job's kind for ``jobs list``: a dry run says so, and on which rows."""
    if getattr(job, "dry_run", False):
        on = (job.result or {}).get("dry_run")
        return f"dry run ({on})" if on else "dry run"
    return str(getattr(job, "kind", "") or "")


def _left(p: Any) -> str:
    """``epsilon 4 and delta 1e-05 left`` of the budget a quote draws on (before the job)."""
    if "remaining_epsilon" not in p:
        return ""
    return f"epsilon {fmt3(p['remaining_epsilon'])} and delta {p['remaining_delta']:g} left"


def _left_line(q: Any) -> None:
    if "remaining_epsilon" in q:
        console.print(f"  its budget has {_left(q)} before it")


def fmt3(value: Any) -> str:
    """A figure at 3 significant digits (a withheld one as its note): ``common.figure``."""
    return figure(value)


def register(app_root: typer.Typer) -> None:
    @app_root.command("submit")
    def submit(
        spec_path: Annotated[Path, typer.Argument(metavar="JOB.toml")],
        on: Annotated[
            str | None,
            typer.Option("--on", help="dry run on dummy or synthetic:JOB data (no charge)"),
        ] = None,
        ray_address: RayOpt = None,
        zone: ZoneOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
        follow: Annotated[
            bool, typer.Option("--follow", help="served zone: wait and show progress")
        ] = False,
    ) -> None:
        """Submit a job spec. Embedded: waits with a live progress bar. Served: returns the
        job's id at once (``jobs status ID --follow`` shows its progress; or ``--follow``)."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from sandbox.jobspec import load_job_spec

        spec = load_job_spec(spec_path)
        with session(zone, token, ray_address) as s:
            if on is not None:
                rec = s.service.dry_run(s.user, spec, on)
            elif s.served:
                rec = s.service.submit(s.user, spec)
                if follow:
                    rec = follow_job(s, rec.id, as_json)
                elif not as_json:
                    console.print(
                        f"job [bold]{rec.id}[/bold] {rec.state}; follow it with "
                        f"`sandbox jobs status {rec.id} --follow`"
                    )
                    return
            elif as_json:
                rec = s.service.submit(s.user, spec)
            else:
                federated = spec.federated is not None
                total = spec.federated.rounds if spec.federated else spec.training.epochs
                with Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[note]}"),
                    console=console,
                    transient=False,
                ) as progress:
                    task = progress.add_task(
                        "rounds" if federated else "epochs", total=total, note=""
                    )

                    def on_progress(p: dict[str, Any]) -> None:
                        done = p.get("round", p.get("epoch", 0))
                        note = ""
                        if federated and p.get("epsilon"):
                            # cumulative epsilon per site so far (accountant figures, not data)
                            eps = [v for v in p["epsilon"].values() if v is not None]
                            note = f"max site epsilon {max(eps):.3f}" if eps else ""
                        # "auto" epochs: the total is known once the zone chose them
                        whole = p.get("rounds", p.get("epochs")) or total
                        progress.update(task, completed=done, total=whole, note=note)

                    rec = s.service.submit(s.user, spec, on_progress=on_progress)
                    progress.update(task, completed=progress.tasks[0].total)
        emit(rec, as_json, _summary)


def register_quote(app_root: typer.Typer) -> None:
    @app_root.command("quote")
    def quote(
        spec_path: Annotated[Path, typer.Argument(metavar="JOB.toml")],
        curve: Annotated[
            bool, typer.Option("--curve", help="utility vs epsilon from dry runs (PNG + table)")
        ] = False,
        on: Annotated[
            str, typer.Option("--on", help="data for the curve's dry runs: dummy or synthetic:JOB")
        ] = "dummy",
        out: Annotated[Path, typer.Option("--out", help="folder for the curve")] = Path("quote"),
        for_request: Annotated[
            bool,
            typer.Option(
                "--for-request",
                help="a quote for an access request: a missing grant or budget is listed, "
                "not refused",
            ),
        ] = False,
        ray_address: RayOpt = None,
        zone: ZoneOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """What a job will spend (epsilon, delta) from the accountant, before anything runs,
        after every check a submit runs (what submit refuses, the quote refuses)."""
        import json as _json

        from sandbox.jobspec import load_job_spec

        spec = load_job_spec(spec_path)
        with session(zone, token, ray_address) as s:
            q = s.service.quote(s.user, spec, for_request=for_request)
            if curve:
                q["curve"] = s.service.quote_curve(s.user, spec, on, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quote.json").write_text(_json.dumps(q, indent=2, default=str))

        def human(q: dict[str, Any]) -> None:
            if q["mode"] == "dp-sgd":
                p = q["plan"]
                console.print(
                    f"this job spends epsilon {fmt3(q['epsilon'])}, delta {q['delta']:g} (per person, RDP accountant)"
                )
                console.print(
                    f"  noise multiplier {fmt3(p['noise_multiplier'])}, sample rate {fmt3(p['sample_rate'])}, {fmt3(p['steps'])} steps, "
                    + (
                        "evaluation skipped"
                        if p.get("eval_sigma") is None
                        else f"eval sigma {fmt3(p['eval_sigma'])}"
                    )
                )
                _left_line(q)
            else:
                console.print(
                    f"this job spends up to epsilon {q['epsilon_per_site']:g}, delta {q['delta']:g} on each site's budget"
                )
                for site, p in q["sites"].items():
                    console.print(
                        f"  {site}: "
                        + (
                            p["left_out"]
                            if "left_out" in p
                            else f"noise {fmt3(p['noise_multiplier'])}, epsilon {fmt3(p['epsilon'])}; "
                            + _left(p)
                        )
                    )
            _tuning_line(q.get("tuning"))
            for line in q.get("warnings") or []:
                console.print(f"[bold]warning[/bold]: {line}")
            for line in q.get("submit_now") or []:
                console.print(f"submit would refuse it now: {line}")
            if "curve" in q:
                show_curve(q["curve"], spec.privacy.epsilon)
            console.print(
                f"quote saved to {out / 'quote.json'} (attach it with `access request --quote`)"
            )

        emit(q, as_json, human)


@app.command("list")
def list_(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List your jobs (all jobs for stewards and operators)."""
    with session(zone, token) as s:
        js = s.service.list_jobs(s.user)
    emit(
        {"jobs": js},
        as_json,
        lambda o: show_table(
            [
                {
                    **j.to_dict(),
                    "kind": _kind(j),
                    # a dry run charged nothing: its plan's figure is no spend
                    "epsilon": None
                    if getattr(j, "dry_run", False)
                    else (j.result or {}).get("epsilon"),
                }
                for j in js
            ],
            ["id", "kind", "project", "dataset", "state", "epsilon", "created_at"],
        ),
    )


@app.command("status")
def status(
    job_id: str,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
    follow: Annotated[
        bool, typer.Option("--follow", help="wait for the job's end, with live progress")
    ] = False,
) -> None:
    """One job's state, progress and released figures."""
    with session(zone, token) as s:
        rec = s.service.job_status(s.user, job_id)
        if follow:
            rec = follow_job(s, job_id, as_json)
    emit(rec, as_json, _summary)


#: seconds between two looks at a followed job
FOLLOW_POLL_S = 0.5


def follow_job(s: Any, job_id: str, as_json: bool) -> Any:
    """Poll the job's record until it ends, with a progress bar of its epochs or rounds
    (its persisted progress: counts of epochs and rounds and accountant figures, no data)."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    rec = s.service.job_status(s.user, job_id)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        disable=as_json,
    ) as progress:
        task = progress.add_task(job_id, total=None, note="")
        while rec.state not in ("succeeded", "failed"):
            p = rec.progress or {}
            rounds = "rounds" in p
            progress.update(
                task,
                description=f"{job_id} {'rounds' if rounds else 'epochs'}",
                completed=p.get("round", p.get("epoch", 0)),
                total=p.get("rounds", p.get("epochs")),
                # a job held by its project's GPU quota says so
                note=p.get("waiting") if rec.state == "queued" and p.get("waiting") else rec.state,
            )
            time.sleep(FOLLOW_POLL_S)
            rec = s.service.job_status(s.user, job_id)
        task_total = progress.tasks[0].total
        progress.update(
            task, completed=task_total if rec.state == "succeeded" else None, note=rec.state
        )
    return rec


@app.command("cancel")
def cancel(
    job_id: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Cancel a job of yours. Queued: it ends, its reservation released (no row was read).
    Running (served zone): its worker is stopped; it then fails, charged if it read rows."""
    with session(zone, token) as s:
        rec = s.service.cancel_job(s.user, job_id)

    def human(rec: Any) -> None:
        if rec.state == "running":
            console.print(
                f"{rec.id}: stopping its worker; `sandbox jobs status {rec.id} --follow` "
                "shows the end (charged if it had read rows)"
            )
        else:
            _summary(rec)

    emit(rec, as_json, human)


@app.command("result")
def result(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", help="folder to write the release into")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a succeeded job's release: weights (safetensors), preprocessing, model card."""
    with session(zone, token) as s:
        r = s.service.job_result(s.user, job_id, out)
    emit(r, as_json, _released)


def _released(r: Any) -> None:
    """What ``jobs result`` prints: the files, then the card's optimizer and whether the
    model learned."""
    console.print(f"released {len(r['files'])} files into {r['out']}")
    card = _released_card(r)
    if card:
        training = card.get("training") or {}
        if "optimizer" in training:
            shown = {"name": training["optimizer"], "lr": training["lr"]}
            if "weight_decay" in training:
                shown["weight_decay"] = training["weight_decay"]
            _optimizer_line(shown)
        _learned_line(card.get("learned"))


def _released_card(r: Any) -> dict[str, Any] | None:
    """The model card just released (its ``training`` and ``learned`` are shown); None for a
    synthetic-data release or a card that cannot be read."""
    import json as _json

    for f in r["files"]:
        if Path(f).name == "model_card.json":
            try:
                card = _json.loads(Path(f).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return card if isinstance(card, dict) else None
    return None
