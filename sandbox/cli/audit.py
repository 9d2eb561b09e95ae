"""``sandbox audit``: the hash-chained audit log."""

from __future__ import annotations

from typing import Annotated

import typer

from sandbox.cli.common import JsonOpt, TokenOpt, ZoneOpt, console, emit, session, show_table

app = typer.Typer(help="The audit log.", no_args_is_help=True)


@app.command("list")
def list_(
    limit: Annotated[int, typer.Option("--limit")] = 100,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The latest audit events."""
    with session(zone, token) as s:
        evs = s.service.audit_list(s.user, limit=limit)
    emit(
        {"events": evs},
        as_json,
        lambda o: show_table(
            [e.to_dict() for e in evs], ["seq", "at", "actor", "action", "outcome", "target"]
        ),
    )


@app.command("verify")
def verify(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Check the keyed chain and its head: names the first line edited, dropped, reordered
    or re-hashed without the key, and a log cut short or rolled back (exit 1)."""
    with session(zone, token) as s:
        rep = s.service.audit_verify(s.user)

    def human(r: object) -> None:
        d = r.to_dict()  # type: ignore[attr-defined]
        if d["ok"]:
            console.print(f"audit chain verified: {d['checked']} events")
        else:
            detail = f" ({d['detail']})" if d["detail"] else ""
            console.print(
                f"audit chain broken at event {d['first_bad_seq']}: {d['problem']}{detail}; "
                f"{d['checked']} events before it verified",
                style="red",
                markup=False,
                soft_wrap=True,  # one line, whatever the terminal's width
            )

    emit(rep, as_json, human)
    if not rep.ok:
        # exit 1 (not 2: nothing the caller typed was wrong) so scripts and CI can act on it
        raise typer.Exit(1)
