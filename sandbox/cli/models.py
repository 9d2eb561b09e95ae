"""``sandbox model``: use a released model outside the zone (no token needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    as_json: JsonOpt = False,
) -> None:
    """Score rows with a released model and the same preprocessing it was trained with."""
    from training.predict import predict_file

    n = predict_file(folder, source, out)
    emit(
        {"rows": n, "out": str(out)},
        as_json,
        lambda o: console.print(f"scored {n} rows into {out}"),
    )
