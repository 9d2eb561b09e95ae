"""``sandbox init``: create a zone."""

from __future__ import annotations

from typing import Annotated

import typer

from sandbox.cli.common import JsonOpt, ZoneOpt, console, emit, settings


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init(
        zone: ZoneOpt = None,
        db_url: Annotated[
            str | None,
            typer.Option("--db-url", help="state database URL (default: SQLite in the zone)"),
        ] = None,
        service_db_url: Annotated[
            str | None,
            typer.Option(
                "--service-db-url",
                help="PostgreSQL: the role the service runs as (--db-url is then the schema's "
                "owner); it may only read and append the ledger and the audit log",
            ),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Create a zone: state database, data folder, secret, and the operator's token."""
        from sandbox.service import Service

        s = settings(zone)
        svc, token = Service.init_zone(s.zone, db_url=db_url, service_db_url=service_db_url)
        out = {
            "zone": str(svc.zone.root),
            "db_url": svc.zone.db_url.split("@")[-1],
            "operator": "operator",
            "token": token,
        }
        svc.close()

        def human(o: dict) -> None:
            console.print(f"zone created at [bold]{o['zone']}[/bold]")
            console.print(f"operator token (shown once): [bold]{o['token']}[/bold]")
            console.print("export SANDBOX_TOKEN=... to act as the operator")

        emit(out, as_json, human)
