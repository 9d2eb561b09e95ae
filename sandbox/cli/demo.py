"""``sandbox demo``: the whole mission on a fresh temporary zone, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        patients: Annotated[
            int, typer.Option("--patients", help="size of the generated cohort")
        ] = 50_000,
        keep: Annotated[
            Path | None, typer.Option("--keep", help="build the zone here and keep it")
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
        served: Annotated[
            bool,
            typer.Option(
                "--served",
                help="serve the zone as its own OS account; users act through the API (root)",
            ),
        ] = False,
    ) -> None:
        """Init a zone, ingest the demo cohort, approve access, train with DP-SGD on Ray, release, audit."""
        if served:
            from sandbox.demo_served import run_served_demo

            run_served_demo(patients=min(patients, 20_000), as_json=as_json)
            return
        from sandbox.demo import run_demo

        run_demo(patients=patients, keep=keep, as_json=as_json)
