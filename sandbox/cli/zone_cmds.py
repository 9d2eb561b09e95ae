"""``sandbox init``: create a zone."""

from __future__ import annotations

from typing import Annotated

import typer
from sqlalchemy.engine import make_url

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

    @app.command("upgrade")
    def upgrade(
        zone: ZoneOpt = None,
        db_url: Annotated[
            str | None,
            typer.Option(
                "--db-url",
                help="the schema owner's URL (where the service runs as a least-privilege role)",
            ),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Upgrade a zone made by an older version in place (its database's schema)."""
        from foundation.sql import make_engine
        from policies.audit import AuditLog
        from sandbox.db_roles import grant_service_role
        from sandbox.schema_upgrade import upgrade as run_upgrade
        from sandbox.zone import Zone

        z = Zone.open(settings(zone).zone)
        owner = make_engine(db_url or z.db_url)
        try:
            z.check_database(owner)
            before, after = run_upgrade(owner)
            service_role = make_url(z.db_url).username
            regranted = None
            if db_url and owner.dialect.name == "postgresql" and service_role:
                if service_role != make_url(db_url).username:
                    # the tables the migrations added: the service role gets its rights on them
                    grant_service_role(owner, service_role)
                    regranted = service_role
            AuditLog(owner, key=z.audit_key(), head_path=z.audit_head_path).append(
                "zone-owner", "zone.upgrade", "ok", str(z.root), {"from": before, "to": after}
            )
        finally:
            owner.dispose()
        out = {"zone": str(z.root), "from": before, "to": after, "regranted": regranted}
        emit(
            out,
            as_json,
            lambda o: console.print(f"zone {o['zone']}: schema {o['from']} -> {o['to']}"),
        )
