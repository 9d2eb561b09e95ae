"""``sandbox access``: researchers request, stewards approve or deny."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from foundation.errors import SpecError
from sandbox.cli.common import JsonOpt, TokenOpt, ZoneOpt, console, emit, session, show_table

app = typer.Typer(help="Access requests and grants.", no_args_is_help=True)


@app.command("request")
def request(
    project: str,
    dataset: Annotated[str, typer.Option("--dataset")],
    columns: Annotated[str, typer.Option("--columns", help="comma-separated column names")],
    mechanism: Annotated[
        str, typer.Option("--mechanism", help="dp-sgd (comma-separate several)")
    ] = "dp-sgd",
    epsilon: Annotated[float, typer.Option("--epsilon")] = 1.0,
    delta: Annotated[float, typer.Option("--delta")] = 1e-6,
    quote: Annotated[
        Path | None,
        typer.Option("--quote", help="a quote.json from `sandbox quote` for the steward"),
    ] = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a data steward for access to columns of a dataset, with a privacy budget."""
    cols = [c.strip() for c in columns.split(",") if c.strip()]
    with session(zone, token) as s:
        r = s.service.request_access(
            s.user,
            project,
            dataset,
            cols,
            [m.strip() for m in mechanism.split(",")],
            epsilon,
            delta,
            quote=json.loads(quote.read_text()) if quote else None,
        )
    emit(r, as_json, lambda r: console.print(f"request {r.id} is pending; a data steward decides"))


@app.command("list")
def list_(
    pending: Annotated[bool, typer.Option("--pending", help="only undecided requests")] = False,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List access requests with their decision and reason."""
    with session(zone, token) as s:
        rs = s.service.list_requests(s.user, pending_only=pending)
    emit(
        {"requests": rs},
        as_json,
        lambda o: show_table(
            [r.to_dict() for r in rs],
            ["id", "project", "dataset", "columns", "mechanisms", "epsilon", "state", "reason"],
        ),
    )


def _date(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise SpecError("--expires", "is not a date", "use YYYY-MM-DD") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


@app.command("approve")
def approve(
    request_id: str,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="grant a different epsilon than asked")
    ] = None,
    delta: Annotated[float | None, typer.Option("--delta")] = None,
    expires: Annotated[str | None, typer.Option("--expires", help="YYYY-MM-DD")] = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a request: grants the project a budget on those columns and mechanisms."""
    with session(zone, token) as s:
        g = s.service.approve(
            s.user, request_id, epsilon=epsilon, delta=delta, expires_at=_date(expires)
        )
    emit(
        g,
        as_json,
        lambda g: console.print(
            f"granted {g.id}: epsilon {g.epsilon:g}, delta {g.delta:g} on {g.dataset} for {g.project}"
        ),
    )


@app.command("deny")
def deny(
    request_id: str,
    reason: Annotated[str, typer.Option("--reason")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deny a request with a reason the researcher will see."""
    with session(zone, token) as s:
        r = s.service.deny(s.user, request_id, reason)
    emit(r, as_json, lambda r: console.print(f"request {r.id} denied"))


@app.command("revoke")
def revoke(
    grant_id: Annotated[str, typer.Argument(metavar="GRANT")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """End a grant now (stewards): no job may use it from here on; its spend stays spent."""
    with session(zone, token) as s:
        g = s.service.revoke_grant(s.user, grant_id)
    emit(
        g,
        as_json,
        lambda g: console.print(
            f"grant {g.id} revoked: {g.project} may no longer use {g.dataset} under it"
        ),
    )


@app.command("show")
def show(
    request_id: Annotated[str, typer.Argument(metavar="ID")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one access request whole: what was asked, its state, who decided it and why,
    the quote attached (the project's members, stewards, operators)."""
    with session(zone, token) as s:
        r = s.service.show_request(s.user, request_id)

    def human(r: Any) -> None:
        console.print(
            f"[bold]{r.id}[/bold] ({r.state}): {r.project} on {r.dataset},"
            f" requested by {r.requested_by} at {_minute(r.created_at)}"
        )
        console.print("columns: " + ", ".join(sorted(r.columns)))
        console.print("mechanisms: " + ", ".join(sorted(str(m) for m in r.mechanisms)))
        console.print(f"epsilon {r.epsilon:g}, delta {r.delta:g}")
        if r.decided_by is not None:
            when = f" at {_minute(r.decided_at)}" if r.decided_at else ""
            console.print(f"decided by {r.decided_by}{when}: {r.reason}")
        if r.grant_id is not None:
            console.print(f"grant: {r.grant_id}")
        if r.quote is not None:
            console.print("quote: " + json.dumps(r.quote, sort_keys=True))

    emit(r, as_json, human)


@app.command("grants")
def grants(
    project: Annotated[str | None, typer.Option("--project", help="one project's grants")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="one dataset's grants")] = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List grants (all for stewards and operators, your projects' for everyone else)."""
    with session(zone, token) as s:
        gs = s.service.list_grants(s.user, project=project, dataset=dataset)
    emit(
        {"grants": gs},
        as_json,
        lambda o: show_table(
            gs,
            [
                "id",
                "project",
                "dataset",
                "columns",
                "mechanisms",
                "epsilon",
                "delta",
                "expires_at",
                "revoked",
                "live",
            ],
        ),
    )


def _minute(iso: str) -> str:
    """An ISO time from a record as "2026-01-31 12:00"."""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")
