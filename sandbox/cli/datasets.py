"""``sandbox dataset``: governed datasets (stewards ingest; everyone sees contracts, never values)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from foundation.errors import SpecError
from sandbox.cli.common import (
    JsonOpt,
    TokenOpt,
    ZoneOpt,
    console,
    emit,
    figure,
    session,
    show_table,
)

app = typer.Typer(help="Governed datasets.", no_args_is_help=True)


@app.command("ingest")
def ingest(
    name: str,
    source: Annotated[Path | None, typer.Option("--from", help="CSV or Parquet file")] = None,
    schema: Annotated[Path | None, typer.Option("--schema", help="schema contract (TOML)")] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="use the built-in multi-hospital cohort generator")
    ] = False,
    patients: Annotated[
        int, typer.Option("--patients", help="patients to generate with --demo")
    ] = 50_000,
    seed: Annotated[int, typer.Option("--seed", help="generator seed with --demo")] = 0,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ingest a file (or the demo cohort) into governed, pseudonymised Parquet."""
    from connectors.schema import SchemaContract

    with session(zone, token) as s:
        if demo:
            rec = s.service.ingest_demo(s.user, name, patients, seed)
        else:
            if source is None or schema is None:
                raise SpecError(
                    "--from/--schema",
                    "both are required without --demo",
                    "give --from FILE --schema SCHEMA.toml, or --demo",
                )
            contract = SchemaContract.from_toml_file(schema)
            rec = s.service.ingest_dataset(s.user, name, source, contract)

    def said(r: Any) -> None:
        console.print(f"dataset {r.name}: {r.rows} rows, {r.persons} persons, {len(r.sites)} sites")
        if r.get("version", 1) > 1:
            console.print(
                f"version {r.version}, now the latest: grants that follow the latest read it from "
                f"their next job; {'earlier versions stay' if r.version > 2 else 'version 1 stays'} "
                "readable until deleted "
                f"(`sandbox dataset delete {r.name} --version N`)"
            )
        if r.get("cleaned"):
            _show_cleaned(r["cleaned"], "cleaned as the contract declares")
        if r.cross_site_persons:
            console.print(
                f"[yellow]warning: {r.cross_site_persons} persons have rows at more than one "
                "site; federated jobs on this dataset will be refused[/yellow]"
            )

    emit(rec, as_json, said)


def _show_version(rec: dict[str, Any]) -> None:
    versions = rec.get("versions") or []
    if len(versions) < 2:
        return
    latest = rec.get("latest_version", rec.get("version"))
    console.print(
        f"version {rec.get('version')} of {latest}"
        + (" (the latest)" if rec.get("version") == latest else " (an older version)")
    )
    show_table(
        [
            {
                "version": v["version"],
                "created_at": v["created_at"],
                "registered_by": v["registered_by"],
                "state": "deleted" if v["deleted"] else ("latest" if v["latest"] else "readable"),
            }
            for v in versions
        ],
        ["version", "created_at", "registered_by", "state"],
        title="versions",
    )


def _show_cleaned(cleaned: dict[str, dict[str, int]], title: str) -> None:
    from connectors.ingest_findings import CLEANED_MEANS

    show_table(
        [
            {"column": col, "rows": n, "what": CLEANED_MEANS.get(what, what)}
            for col, per in cleaned.items()
            for what, n in per.items()
        ],
        ["column", "rows", "what"],
        title=title,
    )


@app.command("check")
def check(
    source: Annotated[Path, typer.Argument(metavar="FILE", help="CSV or Parquet file")],
    schema: Annotated[Path, typer.Option("--schema", help="schema contract (TOML)")],
    as_json: JsonOpt = False,
) -> None:
    """Check a file against a schema contract, writing nothing: every violation in one pass
    (counts per column and the first row numbers, never values) and what the contract's
    cleaning would change. Exit 0 when it would ingest, 1 when it would be refused."""
    from connectors.ingest import check_file
    from connectors.schema import SchemaContract

    report = check_file(source, SchemaContract.from_toml_file(schema))

    def human(r: Any) -> None:
        verdict = "[green]would ingest[/green]" if r.ok else "[red]would be refused[/red]"
        console.print(f"{source.name}: {r.rows} rows, {len(r.violations)} violations: {verdict}")
        if r.violations:
            show_table(
                [
                    {
                        "column": v.column or "-",
                        "rows": v.count,
                        "problem": v.problem,
                        "first rows": ", ".join(str(i) for i in v.rows),
                        "fix": v.fix,
                    }
                    for v in r.violations
                ],
                ["column", "rows", "problem", "first rows", "fix"],
                title="violations",
            )
        if r.cleaned:
            _show_cleaned(r.cleaned, "cleaned as the contract declares")
        for note in r.notes:
            console.print(f"[yellow]note: {note}[/yellow]")

    emit(report, as_json, human)
    if not report.ok:
        raise typer.Exit(1)


@app.command("list")
def list_(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List datasets: name, sites, and the counts where you may see them."""
    with session(zone, token) as s:
        ds = s.service.list_datasets(s.user)
    emit(
        {"datasets": ds},
        as_json,
        lambda o: show_table(
            [
                {
                    "name": d["name"],
                    "rows": d.get("rows", "private"),
                    "persons": d.get("persons", "private"),
                    "sites": len(d.get("sites") or d.get("site_names") or []),
                }
                for d in ds
            ],
            ["name", "rows", "persons", "sites"],
        ),
    )


@app.command("show")
def show(
    name: str,
    version: Annotated[
        int | None, typer.Option("--version", help="an older version (default: the latest)")
    ] = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a dataset's schema contract, sites and versions; counts where the contract makes
    them public (stewards see them always). Never values."""
    with session(zone, token) as s:
        d = s.service.show_dataset(s.user, name, version)

    def human(rec: dict) -> None:
        _show_version(rec)
        if "rows" in rec:
            console.print(
                f"[bold]{rec['name']}[/bold]: {rec['rows']} rows, {rec['persons']} persons"
            )
            console.print(
                "sites: " + ", ".join(f"{k} ({v})" for k, v in sorted(rec["sites"].items()))
            )
        else:
            console.print(f"[bold]{rec['name']}[/bold]: counts are private (contract only)")
            console.print("sites: " + ", ".join(rec.get("site_names") or []))
        if rec.get("cross_site_persons"):
            console.print(
                f"[yellow]{rec['cross_site_persons']} persons have rows at more than one site: "
                "federated jobs are refused on this dataset[/yellow]"
            )
        cols = rec["contract"]["columns"]
        if isinstance(cols, dict):
            cols = [{"name": k, **v} for k, v in cols.items()]
        rows = []
        for c in cols:
            dom = f"[{c.get('min')}, {c.get('max')}]" if c.get("min") is not None else ""
            if dom and c.get("scale") == "log":
                dom += " log"  # a declared transform (preprocessing and bins use log(1 + x))
            if c.get("categories"):
                dom = f"{len(c['categories'])} categories"
            rows.append({"column": c["name"], "type": c["type"], "role": c["role"], "domain": dom})
        show_table(rows, ["column", "type", "role", "domain"])

    emit(d, as_json, human)


@app.command("cap")
def cap(
    name: str,
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="the most one person may be charged, all projects")
    ],
    delta: Annotated[
        float | None, typer.Option("--delta", help="cap delta too (summed like epsilon)")
    ] = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cap a dataset's epsilon per person across every project (stewards); grants over it are
    refused. Prints the cap and one person's current worst case: what live grants can still
    release plus what was spent under grants that have ended."""
    with session(zone, token) as s:
        out = s.service.set_dataset_cap(s.user, name, epsilon, delta)

    def human(o: dict) -> None:
        c, w = o["cap"], o["worst_case"]
        d = "" if c.delta is None else f", delta {c.delta:g}"
        console.print(f"dataset {c.dataset} capped at epsilon {c.epsilon:g}{d} per person")
        console.print(
            f"one person's worst case now: epsilon {figure(w.epsilon)}"
            f" ({figure(w.dataset_wide_epsilon)} dataset-wide + {figure(w.per_site_epsilon)} per site),"
            f" delta {figure(w.delta)}; {figure(w.released_epsilon)} of it already released"
        )
        if o["over_cap"]:
            console.print(
                "[bold]over the cap already[/bold]: existing grants stay, and every new grant on"
                f" {c.dataset} is refused until the worst case is under the cap"
            )
        else:
            console.print(f"left under the cap: epsilon {figure(o['epsilon_left'])}")

    emit(out, as_json, human)


@app.command("caps")
def caps(name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a dataset's cap per person and every cap set on it, with one person's current
    worst case (stewards, operators); sets nothing."""
    with session(zone, token) as s:
        out = s.service.dataset_caps(s.user, name)

    def human(o: dict[str, Any]) -> None:
        c, w = o["cap"], o["worst_case"]
        if c is None:
            console.print(f"dataset {o['dataset']} has no cap")
        else:
            d = "" if c.delta is None else f", delta {c.delta:g}"
            console.print(f"dataset {c.dataset} capped at epsilon {c.epsilon:g}{d} per person")
        console.print(
            f"one person's worst case now: epsilon {figure(w.epsilon)}, delta {figure(w.delta)}"
        )
        if o["over_cap"]:
            console.print("[bold]over the cap[/bold]: every new grant on it is refused")
        elif o["epsilon_left"] is not None:
            console.print(f"left under the cap: epsilon {figure(o['epsilon_left'])}")
        if o["history"]:
            show_table(
                [h.to_dict() for h in o["history"]],
                ["set_at", "set_by", "epsilon", "delta"],
                title="caps set, oldest first",
            )

    emit(out, as_json, human)


@app.command("delete")
def delete(
    name: str,
    version: Annotated[
        int | None,
        typer.Option("--version", help="delete this older version only (not the latest)"),
    ] = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a dataset, every version of it (stewards), or with --version one older version:
    its files go and its data key is destroyed, so copies of its Parquet are unreadable; its
    grants, ledger and audit history stay. Refused while a queued or running job uses it."""
    with session(zone, token) as s:
        out = s.service.delete_dataset(s.user, name, version)

    def human(o: dict[str, Any]) -> None:
        what = f"version {o['version']} of dataset" if o.get("version") else "dataset"
        console.print(f"{what} {o['name']} deleted; its history stays in the ledger and audit log")
        if not o["key_destroyed"]:
            console.print(
                "[yellow]it was ingested before encryption at rest: copies of its files made "
                "earlier stay readable[/yellow]"
            )

    emit(out, as_json, human)
