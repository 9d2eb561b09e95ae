"""``sandbox dataset``: governed datasets (stewards ingest; everyone sees contracts, never values)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from foundation.errors import SpecError
from sandbox.cli.common import JsonOpt, TokenOpt, ZoneOpt, console, emit, session, show_table

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

    def said(r: object) -> None:
        console.print(
            f"dataset {r.name}: {r.rows} rows, {r.persons} persons, {len(r.sites)} sites"  # type: ignore[attr-defined]
        )
        if r.cross_site_persons:  # type: ignore[attr-defined]
            console.print(
                f"[yellow]warning: {r.cross_site_persons} persons have rows at more than one "  # type: ignore[attr-defined]
                "site; federated jobs on this dataset will be refused[/yellow]"
            )

    emit(rec, as_json, said)


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
def show(name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a dataset's schema contract and sites; counts where the contract makes them public
    (stewards see them always). Never values."""
    with session(zone, token) as s:
        d = s.service.show_dataset(s.user, name)

    def human(rec: dict) -> None:
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
            f"one person's worst case now: epsilon {w.epsilon:g}"
            f" ({w.dataset_wide_epsilon:g} dataset-wide + {w.per_site_epsilon:g} per site),"
            f" delta {w.delta:g}; {w.released_epsilon:g} of it already released"
        )
        if o["over_cap"]:
            console.print(
                "[bold]over the cap already[/bold]: existing grants stay, and every new grant on"
                f" {c.dataset} is refused until the worst case is under the cap"
            )
        else:
            console.print(f"left under the cap: epsilon {o['epsilon_left']:g}")

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
        console.print(f"one person's worst case now: epsilon {w.epsilon:g}, delta {w.delta:g}")
        if o["over_cap"]:
            console.print("[bold]over the cap[/bold]: every new grant on it is refused")
        elif o["epsilon_left"] is not None:
            console.print(f"left under the cap: epsilon {o['epsilon_left']:g}")
        if o["history"]:
            show_table(
                [h.to_dict() for h in o["history"]],
                ["set_at", "set_by", "epsilon", "delta"],
                title="caps set, oldest first",
            )

    emit(out, as_json, human)


@app.command("delete")
def delete(
    name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Delete a dataset (stewards): its files go and its data key is destroyed, so copies of
    its Parquet are unreadable; its grants, ledger and audit history stay. Refused while a
    queued or running job uses it."""
    with session(zone, token) as s:
        out = s.service.delete_dataset(s.user, name)

    def human(o: dict[str, Any]) -> None:
        console.print(f"dataset {o['name']} deleted; its history stays in the ledger and audit log")
        if not o["key_destroyed"]:
            console.print(
                "[yellow]it was ingested before encryption at rest: copies of its files made "
                "earlier stay readable[/yellow]"
            )

    emit(out, as_json, human)
