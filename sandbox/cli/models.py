"""``sandbox model``: use a released model outside the zone (no token needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sandbox.cli.common import JsonOpt, console, emit

app = typer.Typer(help="Released models.", no_args_is_help=True)


@app.command("predict")
def predict(
    folder: Annotated[Path, typer.Argument(metavar="DIR")],
    source: Annotated[
        Path, typer.Option("--from", help="CSV or Parquet with the model's feature columns")
    ],
    out: Annotated[Path, typer.Option("--out", help="scores Parquet to write")],
    ids: Annotated[
        list[str] | None,
        typer.Option(
            "--id",
            help="a column to copy beside each score (repeat it; default: columns named like "
            "an identifier, id, *_id, MRN; else a row number)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Score rows with a released model and the same preprocessing it was trained with.

    The rows are checked as ingest checked the training data: declared missing text,
    category spellings and out-of-domain values are cleaned as the contract declares, and
    counted; a row ingest would have refused gets no score; an unknown category is scored
    as "other". Each is counted in a warning, per column, never with a value."""
    from training.predict import predict_file

    scored = predict_file(folder, source, out, ids or None)

    def human(r: Any) -> None:
        console.print(f"scored {r.scored} of {r.rows} rows into {r.out}")
        if r.passed_through:
            console.print("beside each score: " + ", ".join(r.passed_through))
        for v in r.not_scored:
            console.print(f"[yellow]warning: not scored: {v.line()}[/yellow]")
        if r.cleaned:
            from connectors.ingest_findings import CLEANED_MEANS

            for column, per in r.cleaned.items():
                for what, n in per.items():
                    console.print(
                        f"[yellow]warning: column {column!r}: {n} row{'s' * (n != 1)} "
                        f"{CLEANED_MEANS.get(what, what)}[/yellow]"
                    )

    emit(scored, as_json, human)
