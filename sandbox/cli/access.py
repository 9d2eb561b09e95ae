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
    dataset_version: Annotated[
        int | None,
        typer.Option(
            "--dataset-version",
            help="pin the grant to this version of the dataset (default: follow the latest)",
        ),
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
            dataset_version=dataset_version,
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
    """Approve a request: grants the project a budget on those columns and mechanisms. Prints
    each budget's totals before and after (a grant on a budget that has one adds to it) and
    one person's worst case on the dataset across every project."""
    with session(zone, token) as s:
        g = s.service.approve(
            s.user, request_id, epsilon=epsilon, delta=delta, expires_at=_date(expires)
        )
    emit(g, as_json, _approved)


def _approved(g: Any) -> None:
    console.print(
        f"granted {g.id}: epsilon {g.epsilon:g}, delta {g.delta:g} on {g.dataset} for {g.project}"
    )
    if g.get("adds_to"):
        console.print(
            f"  [bold]this adds to the budget of {', '.join(g.adds_to)}[/bold]: the ledger pools "
            f"a project's grants on a dataset, so {g.project}'s totals on {g.dataset} add up"
            " (they are not replaced)"
        )
    for b in g.get("budgets") or []:
        was, now = b["before"], b["after"]
        console.print(
            f"  budget {b['key']}: epsilon {was['granted_epsilon']:g} -> "
            f"{now['granted_epsilon']:g}, delta {was['granted_delta']:g} -> "
            f"{now['granted_delta']:g} granted; {now['remaining_epsilon']:g} and "
            f"{now['remaining_delta']:g} left"
        )
    worst = g.get("worst_case")
    if worst:
        was, now = worst["before"], worst["after"]
        cap = worst.get("cap_epsilon")
        console.print(
            f"  one person's worst case on {g.dataset} (every project): epsilon "
            f"{was['epsilon']:g} -> {now['epsilon']:g} (dataset-wide "
            f"{now['dataset_wide_epsilon']:g} + their own site's {now['per_site_epsilon']:g}), "
            f"delta {was['delta']:g} -> {now['delta']:g}"
            + (f"; the dataset's cap is {cap:g}" if cap is not None else "")
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
            _quote_lines(r.quote)

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


def _quote_lines(q: Any) -> None:
    """The quote attached to a request, as its figures (``--json`` has it whole)."""
    if not isinstance(q, dict) or "mode" not in q:
        console.print("quote: " + json.dumps(q, sort_keys=True))
        return
    if q["mode"] == "federated":
        console.print(
            f"quote: up to epsilon {_fig(q.get('epsilon_per_site'))}, delta "
            f"{_fig(q.get('delta'))} on each site's budget (federated)"
        )
        for site, p in sorted((q.get("sites") or {}).items()):
            console.print(f"  {site}: " + _plan_line(p))
    else:
        console.print(
            f"quote: epsilon {_fig(q.get('epsilon'))}, delta {_fig(q.get('delta'))} (dp-sgd); "
            + _plan_line(q.get("plan") or {})
        )
    for line in (q.get("warnings") or []) + (q.get("submit_now") or []):
        console.print(f"  note: {line}")


def _plan_line(p: Any) -> str:
    if "left_out" in p:
        return f"left out ({p['left_out']})"
    return (
        f"noise multiplier {_fig(p.get('noise_multiplier'))}, sample rate "
        f"{_fig(p.get('sample_rate'))}, {_fig(p.get('steps'))} steps"
    )


def _fig(v: Any) -> str:
    """A figure at 3 significant digits; a withheld one says so."""
    if isinstance(v, int | float) and not isinstance(v, bool):
        return f"{v:.3g}"
    return "withheld" if isinstance(v, str) and v.startswith("withheld") else str(v)


def _minute(iso: str) -> str:
    """An ISO time from a record as "2026-01-31 12:00"."""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")
