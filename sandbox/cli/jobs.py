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
    open_session,
    show_table,
)

app = typer.Typer(help="Jobs and their releases.", no_args_is_help=True)


def _summary(rec: Any) -> None:
    r = rec.result or {}
    console.print(f"job [bold]{rec.id}[/bold]: {rec.state}")
    if r and r.get("mode") == "federated":
        console.print(
            f"  federated: {r['rounds']} rounds; dropped {r.get('dropped') or 'none'}; left out {len(r.get('excluded') or [])}"
        )
        for site, c in sorted(r["sites"].items()):
            console.print(f"    {site}: epsilon {c['epsilon']:.3f} (delta {r['delta']:g})")
        m = r.get("metrics") or {}
        if m.get("auroc") is not None:
            console.print(f"  global DP AUROC {m['auroc']:.3f}")
    elif r:
        m = r.get("metrics", {})
        console.print(
            f"  epsilon spent {r['epsilon']:.3f} (delta {r['delta']:g}), {r['steps_taken']} steps, clipping {r['clipping']}"
        )
        console.print(
            f"  DP metrics: AUROC {m.get('auroc', float('nan')):.3f}, accuracy {m.get('accuracy', float('nan')):.3f}, ECE {m.get('ece', float('nan')):.3f}"
        )
    if rec.error:
        console.print(f"  error: {rec.error}")


def register(app_root: typer.Typer) -> None:
    @app_root.command("submit")
    def submit(
        spec_path: Annotated[Path, typer.Argument(metavar="JOB.toml")],
        ray_address: RayOpt = None,
        zone: ZoneOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Submit a job spec; waits for it with a live progress bar of epochs."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from sandbox.jobspec import load_job_spec

        spec = load_job_spec(spec_path)
        s = open_session(zone, token, ray_address)
        try:
            if as_json:
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
                        progress.update(task, completed=done, note=note)

                    rec = s.service.submit(s.user, spec, on_progress=on_progress)
                    progress.update(task, completed=total)
        finally:
            s.close()
        emit(rec, as_json, _summary)


@app.command("list")
def list_(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List your jobs (all jobs for stewards and operators)."""
    s = open_session(zone, token)
    try:
        js = s.service.list_jobs(s.user)
    finally:
        s.close()
    emit(
        {"jobs": js},
        as_json,
        lambda o: show_table(
            [{**j.to_dict(), "epsilon": (j.result or {}).get("epsilon")} for j in js],
            ["id", "project", "dataset", "state", "epsilon", "created_at"],
        ),
    )


@app.command("status")
def status(
    job_id: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """One job's state, progress and released figures."""
    s = open_session(zone, token)
    try:
        rec = s.service.job_status(s.user, job_id)
    finally:
        s.close()
    emit(rec, as_json, _summary)


@app.command("result")
def result(
    job_id: str,
    out: Annotated[Path, typer.Option("--out", help="folder to write the release into")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a succeeded job's release: weights (safetensors), preprocessing, model card."""
    s = open_session(zone, token)
    try:
        r = s.service.job_result(s.user, job_id, out)
    finally:
        s.close()
    emit(r, as_json, lambda r: console.print(f"released {len(r['files'])} files into {r['out']}"))
