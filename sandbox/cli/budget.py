"""``sandbox budget``: a project's privacy budget per dataset."""

from __future__ import annotations

import typer

from sandbox.cli.common import (
    JsonOpt,
    TokenOpt,
    ZoneOpt,
    emit,
    session,
    show_table,
    to_jsonable,
)


def register(app: typer.Typer) -> None:
    @app.command("budget")
    def budget(
        project: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
    ) -> None:
        """Granted, reserved, spent (per mechanism) and remaining epsilon and delta, per dataset."""
        with session(zone, token) as s:
            bs = s.service.budget(s.user, project)
        emit(
            {"project": project, "budgets": bs},
            as_json,
            lambda o: show_table(
                [
                    {
                        **to_jsonable(b),
                        "dataset": b.key.dataset + (f"@{b.key.site}" if b.key.site else ""),
                        # training, federated, synthetic data and DP queries side by side
                        "spent by": ", ".join(
                            f"{m} {v:.3g}" for m, v in (b.spent_by or {}).items()
                        ),
                    }
                    for b in bs
                ],
                [
                    "dataset",
                    "granted_epsilon",
                    "reserved_epsilon",
                    "spent_epsilon",
                    "spent by",
                    "remaining_epsilon",
                    "granted_delta",
                    "spent_delta",
                ],
                title=f"budget of {project} (epsilon per person)",
            ),
        )
