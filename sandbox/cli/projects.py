"""``sandbox project``: research projects (researchers create them)."""

from __future__ import annotations

from typing import Annotated

import typer

from sandbox.cli.common import JsonOpt, TokenOpt, ZoneOpt, console, emit, session, show_table

app = typer.Typer(help="Research projects.", no_args_is_help=True)


@app.command("create")
def create(
    name: str,
    purpose: Annotated[str, typer.Option("--purpose", help="the approved research purpose")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a project; you become its owner."""
    with session(zone, token) as s:
        p = s.service.create_project(s.user, name, purpose)
    emit(p, as_json, lambda p: console.print(f"project {p.name} created"))


@app.command("list")
def list_(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List projects (yours, or all for stewards)."""
    with session(zone, token) as s:
        ps = s.service.list_projects(s.user)
    emit(
        {"projects": ps},
        as_json,
        lambda o: show_table([p.to_dict() for p in ps], ["name", "owner", "status", "purpose"]),
    )
