"""The synthetic-data report's plots, for the data steward only.

``save_plots`` writes ``column_shapes.png``, ``marginals.png`` and ``utility.png``. The
marginals draw real-data distributions, so these files are a release of the real data: never
hand them to a researcher. Bins and bars come from the contract's declared domains and
vocabularies only. Matplotlib's ``Figure`` is rendered by the Agg canvas directly: pyplot and
its global backend state are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from connectors.scale_arrays import scale_edges
from connectors.scales import Scale
from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import SpecError
from privacy.synth.report_contract import OTHER, contract_frame, require_columns
from privacy.synth.report_types import SynthReport

#: how many marginal comparisons ``save_plots`` draws (the worst-shaped columns first)
DEFAULT_MARGINALS = 6
#: histogram bins across a numeric column's declared domain
_HIST_BINS = 30
#: an integer column whose declared domain spans at most this many values gets one bar per
#: value (0/1 flags, counts such as prior admissions) instead of a histogram
_MAX_INTEGER_BARS = 31


def save_plots(
    report: SynthReport,
    real: pa.Table,
    synth: pa.Table,
    contract: SchemaContract,
    out_dir: str | Path,
    *,
    max_marginals: int = DEFAULT_MARGINALS,
) -> list[Path]:
    """Write the report's plots as PNG files into ``out_dir``; returns their paths.

    STEWARD ONLY: ``marginals.png`` draws the real rows' distributions (histograms of numeric
    columns, category shares of the others), which is a release of the real data; so is
    ``column_shapes.png`` in its detail. Never hand these files to a researcher. Bins and bars
    come from the contract (declared domains and vocabularies, plus "other" and "missing"), so
    no undeclared value is ever drawn, but the heights are real-data statistics.

    Files: ``column_shapes.png`` (each column's shape score), ``marginals.png`` (real vs
    synthetic for up to ``max_marginals`` columns, the worst-shaped first), ``utility.png``
    (TSTR vs TRTR AUROC). Matplotlib's ``Figure`` is rendered by the Agg canvas directly:
    pyplot and its global backend state are never touched.
    """
    if not isinstance(report, SynthReport):
        raise SpecError("report", "must be a SynthReport", "build it with build_report")
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    if isinstance(max_marginals, bool) or not isinstance(max_marginals, int) or max_marginals < 0:
        raise SpecError("max_marginals", "must be a non-negative integer", "pass e.g. 6")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(report.column_shape_scores)
    ordered = sorted(columns, key=lambda c: report.column_shape_scores[c])
    chosen = ordered[:max_marginals]
    require_columns(real, chosen, "real")
    require_columns(synth, chosen, "synth")
    paths = [
        _plot_shapes(report, out / "column_shapes.png"),
        _plot_utility(report, out / "utility.png"),
    ]
    if chosen:
        paths.insert(
            1, _plot_marginals(report, real, synth, contract, chosen, out / "marginals.png")
        )
    return paths


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _plot_shapes(report: SynthReport, path: Path) -> Path:
    names = list(report.column_shape_scores)
    scores = [report.column_shape_scores[n] for n in names]
    fig = _figure(8.0, 0.3 * len(names) + 1.5)
    ax = fig.add_subplot()
    bars = ax.barh(range(len(names)), scores, color="#4c72b0")
    ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.12)  # room for the labels
    ax.set_xlabel("sdmetrics column shape score (1 = same distribution)")
    ax.set_title(f"Column shapes: {report.column_shapes:.3f}  quality: {report.quality:.3f}")
    return _save(fig, path)


def _plot_utility(report: SynthReport, path: Path) -> Path:
    fig = _figure(5.0, 3.5)
    ax = fig.add_subplot()
    bars = ax.bar(
        ["train on real\n(TRTR)", "train on synthetic\n(TSTR)"],
        [report.trtr_auroc, report.tstr_auroc],
        color=["#55a868", "#4c72b0"],
    )
    ax.bar_label(bars, fmt="%.3f")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("AUROC on held-out real rows")
    ax.set_title(f"{report.tstr_model.value}: gap {report.tstr_gap:+.3f}")
    return _save(fig, path)


def _plot_marginals(
    report: SynthReport,
    real: pa.Table,
    synth: pa.Table,
    contract: SchemaContract,
    columns: Sequence[str],
    path: Path,
) -> Path:
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(columns) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, columns, strict=False):
        spec = contract.column(name)
        real_col = contract_frame(real, [name], contract)[name]
        synth_col = contract_frame(synth, [name], contract)[name]
        title = f"{name} (shape {report.column_shape_scores[name]:.3f})"
        narrow = (
            spec.is_integer
            and spec.min is not None
            and spec.max is not None
            and spec.max - spec.min + 1 <= _MAX_INTEGER_BARS
        )
        if spec.is_numeric and spec.role is not Role.LABEL and spec.min is not None and not narrow:
            _numeric_panel(ax, spec, real_col.to_numpy(), synth_col.to_numpy())
        else:
            _category_panel(ax, spec, real_col, synth_col)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _numeric_panel(ax: Any, spec: ColumnSpec, real: np.ndarray, synth: np.ndarray) -> None:
    lo, hi = float(spec.min), float(spec.max)  # type: ignore[arg-type]
    log = spec.scale is Scale.LOG
    # a log-scaled column: log-spaced bins on a log(1 + x) axis, as the synthesizers bin it
    edges = scale_edges(lo, hi, _HIST_BINS, spec.scale) if log else _nice_edges(lo, hi)
    for values, colour, name in ((real, "#55a868", "real"), (synth, "#4c72b0", "synthetic")):
        known = values[~np.isnan(values)]
        missing = 1.0 - known.size / max(values.size, 1)
        ax.hist(
            np.clip(known, lo, hi),
            bins=edges,
            density=True,
            histtype="step",
            linewidth=1.5,
            color=colour,
            label=f"{name} ({missing:.0%} missing)",
        )
    if log:
        ax.set_xscale("function", functions=(_log1p_axis, np.expm1))
    ax.set_xlim(edges[0], edges[-1])
    ax.tick_params(labelsize=7)


def _log1p_axis(x: np.ndarray) -> np.ndarray:
    # matplotlib probes a scale's forward function with values left of the axis too
    return np.log1p(np.maximum(x, 0.0))


def _nice_edges(lo: float, hi: float) -> np.ndarray:
    """About ``_HIST_BINS`` bins over [lo, hi] with a 1-2-5 width on multiples of the width.

    Bins of a round width keep values recorded to whole units (ages in years, pressures in
    mmHg) from piling up unevenly, as they do in bins of 2.9 units.
    """
    raw = (hi - lo) / _HIST_BINS
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    return np.arange(start, hi + step, step)


def _category_panel(ax: Any, spec: ColumnSpec, real: pd.Series, synth: pd.Series) -> None:
    if spec.type == "bool":
        levels: list[Any] = [False, True]
        names = ["false", "true"]
    elif spec.is_numeric:
        # a narrow integer domain (a 0/1 flag, a label): one bar per declared value
        lo = math.ceil(spec.min) if spec.min is not None else 0
        hi = math.floor(spec.max) if spec.max is not None else 1
        levels = [float(v) for v in range(lo, hi + 1)]
        names = [str(v) for v in range(lo, hi + 1)]
    else:
        cats = list(spec.categories or ())
        levels = cats if OTHER in cats else [*cats, OTHER]
        names = list(levels)
    names.append("missing")

    def shares(values: pd.Series) -> np.ndarray:
        n = max(len(values), 1)
        missing = values.isna().to_numpy()
        present = values[~missing]
        counts = [float((present == level).sum()) for level in levels]
        return np.asarray([*counts, float(missing.sum())]) / n

    x = np.arange(len(names))
    ax.bar(x - 0.2, shares(real), width=0.4, color="#55a868", label="real")
    ax.bar(x + 0.2, shares(synth), width=0.4, color="#4c72b0", label="synthetic")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("share of rows", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
