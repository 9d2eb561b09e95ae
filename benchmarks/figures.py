"""A benchmark's figures as ``benchmarks/results/<name>.json`` and a two-column table in
``<name>.md`` under its title (the shape of ``calibration``, ``rdp`` and ``submit``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_figures(name: str, title: str, figures: dict[str, Any]) -> str:
    """Write both files; returns the table (the benchmark prints it)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    table = "\n".join(
        ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in figures.items()]]
    )
    (RESULTS / f"{name}.md").write_text(f"# {title}\n\n{table}\n", encoding="utf-8")
    return table
