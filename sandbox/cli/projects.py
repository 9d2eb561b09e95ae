"""``sandbox project``: research projects (researchers create them)."""

from __future__ import annotations

from typing import Annotated, Any

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


@app.command("show")
def show(name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a project: purpose, owner, status, members and its grants (members, stewards,
    operators)."""
    with session(zone, token) as s:
        p = s.service.show_project(s.user, name)

    def human(p: dict[str, Any]) -> None:
        console.print(f"[bold]{p['name']}[/bold] ({p['status']}), owner {p['owner']}")
        console.print(f"purpose: {p['purpose']}")
        console.print("members: " + ", ".join(p["members"]))
        if p.get("gpu_quota") is not None:
            console.print(f"GPU quota: {p['gpu_quota']:g}")
        if not p["grants"]:
            console.print("no grants yet")
            return
        show_table(
            p["grants"],
            ["id", "dataset", "columns", "mechanisms", "epsilon", "delta", "expires_at", "revoked"],
            title="grants",
        )

    emit(p, as_json, human)


@app.command("add-member")
def add_member(
    name: str,
    user: str,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a researcher or an analyst to your project (its owner only)."""
    with session(zone, token) as s:
        p = s.service.add_project_member(s.user, name, user)
    emit(
        p,
        as_json,
        lambda p: console.print(f"project {p.name} members: {', '.join(p.members)}"),
    )


@app.command("close")
def close(
    name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Close your project (its owner only): it keeps its history and runs nothing more."""
    with session(zone, token) as s:
        p = s.service.close_project(s.user, name)
    emit(
        p,
        as_json,
        lambda p: console.print(
            f"project {p.name} closed: no new members, access requests or jobs"
        ),
    )


@app.command("gpu-quota")
def gpu_quota(
    name: str,
    gpus: Annotated[
        float | None,
        typer.Option("--gpus", help="GPUs the project's running jobs may hold at once"),
    ] = None,
    lift: Annotated[bool, typer.Option("--lift", help="remove the project's quota")] = False,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a project's GPU quota (a data steward): jobs over it wait in the queue."""
    from foundation.errors import SpecError

    if (gpus is None) == (not lift):
        raise SpecError("--gpus", "give --gpus N or --lift", "e.g. --gpus 2")
    with session(zone, token) as s:
        q = s.service.set_gpu_quota(s.user, name, None if lift else gpus)
    emit(
        q,
        as_json,
        lambda q: console.print(
            f"project {q['project']}: "
            + ("no GPU quota" if q["gpu_quota"] is None else f"GPU quota {q['gpu_quota']:g}")
        ),
    )
