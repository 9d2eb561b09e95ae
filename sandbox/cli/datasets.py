"""``sandbox dataset``: governed datasets (stewards ingest; everyone sees contracts, never values)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from connectors.errors import SpecError
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
    emit(
        rec,
        as_json,
        lambda r: console.print(
            f"dataset {r.name}: {r.rows} rows, {r.persons} persons, {len(r.sites)} sites"
        ),
    )


@app.command("list")
def list_(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List datasets: name, rows, persons, sites."""
    with session(zone, token) as s:
        ds = s.service.list_datasets(s.user)
    emit(
        {"datasets": ds},
        as_json,
        lambda o: show_table(
            [
                {"name": d.name, "rows": d.rows, "persons": d.persons, "sites": len(d.sites)}
                for d in ds
            ],
            ["name", "rows", "persons", "sites"],
        ),
    )


@app.command("show")
def show(name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a dataset's schema contract, row count and sites (never values)."""
    with session(zone, token) as s:
        d = s.service.show_dataset(s.user, name)

    def human(d: object) -> None:
        rec = d.to_dict()  # type: ignore[attr-defined]
        console.print(f"[bold]{rec['name']}[/bold]: {rec['rows']} rows, {rec['persons']} persons")
        console.print("sites: " + ", ".join(f"{k} ({v})" for k, v in sorted(rec["sites"].items())))
        cols = rec["contract"]["columns"]
        if isinstance(cols, dict):
            cols = [{"name": k, **v} for k, v in cols.items()]
        rows = []
        for c in cols:
            dom = f"[{c.get('min')}, {c.get('max')}]" if c.get("min") is not None else ""
            if c.get("categories"):
                dom = f"{len(c['categories'])} categories"
            rows.append({"column": c["name"], "type": c["type"], "role": c["role"], "domain": dom})
        show_table(rows, ["column", "type", "role", "domain"])

    emit(d, as_json, human)
