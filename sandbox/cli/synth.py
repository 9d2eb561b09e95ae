"""``sandbox synth``: free dummy extracts, charged DP synthetic releases, their reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
)

app = typer.Typer(
    help="Synthetic data: dummy (free) and DP synthetic (charged).", no_args_is_help=True
)


@app.command("dummy")
def dummy(
    dataset: str,
    rows: Annotated[int, typer.Option("--rows")] = 1000,
    out: Annotated[Path, typer.Option("--out", help="Parquet file to write")] = Path(
        "dummy.parquet"
    ),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dummy rows from the schema contract alone: exact schema, declared missingness, rare categories. Free."""
    with session(zone, token) as s:
        r = s.service.synth_dummy(s.user, dataset, rows, out, seed)
    emit(
        r,
        as_json,
        lambda r: console.print(
            f"{r['rows']} dummy rows of {dataset} in {r['out']} (no budget spent)"
        ),
    )


@app.command("fit")
def fit(
    dataset: str,
    project: Annotated[str, typer.Option("--project")],
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="charged to the project's budget")
    ] = None,
    delta: Annotated[float, typer.Option("--delta")] = 1e-6,
    method: Annotated[
        str,
        typer.Option(
            "--method", help="mst | dp-copula (DP); gaussian-copula | ctgan | tvae (stewards, held)"
        ),
    ] = "mst",
    rows: Annotated[int, typer.Option("--rows")] = 10_000,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="comma-separated; default: every governed column"),
    ] = None,
    label: Annotated[
        str | None, typer.Option("--label", help="label column for the report's TSTR score")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    ray_address: RayOpt = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fit a synthesizer inside the zone on the real rows; a DP method's release is charged."""
    cols = [c.strip() for c in columns.split(",")] if columns else None
    with session(zone, token, ray_address) as s:
        job = s.service.synth_fit(
            s.user,
            project,
            dataset,
            epsilon=epsilon,
            delta=delta,
            method=method,
            rows=rows,
            seed=seed,
            columns=cols,
            label=label,
        )
        if s.served:  # the fit runs in the service: wait for it, as embedded mode does
            from sandbox.cli.jobs import follow_job

            job = follow_job(s, job.id, as_json)

    def human(j: object) -> None:
        r = job.result or {}
        eps = (
            f"epsilon {figure(r['epsilon'])} charged"
            if r.get("dp")
            else "not DP: held for a steward"
        )
        console.print(f"synthetic job {job.id}: {job.state}; {r.get('rows')} rows; {eps}")
        console.print(f"  fetch with: sandbox jobs result {job.id} --out DIR")

    emit(job, as_json, human)


@app.command("report")
def report(
    job_id: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """A synthetic release's report: full for stewards; aggregate scores for researchers once released."""
    with session(zone, token) as s:
        r = s.service.synth_report(s.user, job_id)

    def human(r: dict) -> None:
        rep = r["report"] or {}
        console.print(f"report of {job_id} ({r['view']} view)")
        for k, v in sorted(rep.items()):
            if isinstance(v, int | float) or v is None:
                console.print(f"  {k}: {figure(v)}")
        for p in r.get("plots", []):
            console.print(f"  plot: {p}")

    emit(r, as_json, human)


@app.command("release")
def release(
    job_id: str,
    rows: Annotated[
        bool, typer.Option("--rows", help="also release a non-DP baseline's rows")
    ] = False,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """(steward) Release a synthetic job's aggregate report to the project."""
    with session(zone, token) as s:
        rec = s.service.synth_release(s.user, job_id, rows=rows)
    emit(
        rec,
        as_json,
        lambda r: console.print(
            f"released the report of {job_id}" + (" and its rows" if rows else "")
        ),
    )
