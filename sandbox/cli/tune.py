"""``sandbox tune``: choose a spec's ``"auto"`` hyperparameters on free rows and write them.

The search runs in the service (``Service.tune``; ``sandbox.mechanisms.tuning``): on the
project's released DP synthetic table or dummy rows from the contract, never a real row,
charging nothing. This command shows every candidate with its AUROC on the held-out free
rows, marks the one chosen, and writes the resolved spec as TOML (``--out``), which then
submits as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sandbox.cli.common import JsonOpt, TokenOpt, ZoneOpt, console, emit, session

#: the spec's top-level keys, in the order ``job.toml`` is usually written
_TOP_ORDER = ("project", "dataset", "label", "features", "mode")


def spec_toml(spec: dict[str, Any], header: str = "") -> str:
    """A job spec dict (``JobSpec.to_dict``) as ``job.toml`` text that parses back to it:
    the top-level values, then one table per section."""
    lines = [f"# {line}" for line in header.splitlines()]
    scalars = [k for k in _TOP_ORDER if k in spec] + sorted(
        k for k, v in spec.items() if k not in _TOP_ORDER and not isinstance(v, dict)
    )
    for key in scalars:
        lines.append(f"{key} = {_toml_value(spec[key])}")
    for key in sorted(k for k, v in spec.items() if isinstance(v, dict)):
        lines.append(f"\n[{key}]")
        for k, v in spec[key].items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        # a JSON string is a TOML basic string (same escapes)
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _show(r: dict[str, Any], out: Path | None) -> None:
    from rich.table import Table

    tuning = r.get("tuning")
    if not tuning:
        console.print('nothing in this spec is "auto": it is written as it is')
    else:
        fields = ", ".join(tuning["fields"])
        console.print(
            f"[bold]search[/bold] for {fields} on [bold]{tuning['source']}[/bold] rows "
            f"({tuning['free_train_rows']} to train, {tuning['free_test_rows']} held out; "
            "nothing charged, no real row read)"
        )
        console.print(
            f"  planned as the job: {tuning['planned_persons']} training persons "
            f"({tuning['persons_basis']}), the spec's epsilon and delta"
        )
        t = Table()
        for c in ("", "moves", "lr", "epochs", "batch_size", "max_grad_norm", "AUROC", "+/- SE"):
            t.add_column(c)
        for row in tuning["candidates"]:
            mark = "[bold green]chosen[/bold green]" if row.get("chosen") else ""
            score = row.get("auroc")
            t.add_row(
                mark,
                str(row["moves"]),
                f"{row['lr']:g}",
                str(row["epochs"]),
                str(row["batch_size"]),
                f"{row['max_grad_norm']:g}",
                f"{score:.3f}"
                if score is not None
                else str(row.get("refused") or row.get("not_run") or ""),
                f"{row['se']:.3f}" if score is not None else "",
            )
        console.print(t)
        console.print(f"  {tuning['reason']}")
        chosen = ", ".join(f"{k} {v:g}" for k, v in tuning["chosen"].items())
        console.print(f"[bold]chosen[/bold]: {chosen}")
    if out is not None:
        console.print(f"spec written to {out} (submit it as it is)")


def register(app_root: typer.Typer) -> None:
    @app_root.command("tune")
    def tune(
        spec_path: Annotated[Path, typer.Argument(metavar="JOB.toml")],
        on: Annotated[
            str | None,
            typer.Option(
                "--on",
                help="free rows to search on: dummy or synthetic:JOB (default: the project's "
                "newest released DP synthetic table of the dataset, else dummy)",
            ),
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", help="write the chosen spec here (TOML)")
        ] = None,
        zone: ZoneOpt = None,
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Choose the spec's "auto" hyperparameters (lr, epochs, batch_size, max_grad_norm,
        or those left out) by a search on free rows; nothing is charged."""
        from sandbox.jobspec import load_job_spec

        spec = load_job_spec(spec_path)
        with session(zone, token) as s:
            r = s.service.tune(s.user, spec, on)
        if out is not None:
            tuning = r.get("tuning")
            header = (
                f"chosen by `sandbox tune` on {tuning['source']} rows (docs/tuning.md)"
                if tuning
                else ""
            )
            out.write_text(spec_toml(r["spec"], header), encoding="utf-8")
        emit(r, as_json, lambda r: _show(r, out))
