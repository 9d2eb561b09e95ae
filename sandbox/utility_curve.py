"""The PNG of a quote's utility curve: DP AUROC of dry runs against epsilon.

Each point is one dry run (``sandbox quote --curve``); its AUROC is drawn with the 95%
interval the evaluation gives every DP metric (``privacy.dp_intervals``: here, on rows that
are not real, the test set's sampling alone, since a dry run evaluates without noise), as a
band. The epsilon the spec asks for is marked, so the reader sees where the job stands on
the curve. The epsilon axis is logarithmic when the points span a decade (the default
points double from 0.25 to 8), ticked at the points themselves; every figure on it reads at
3 significant digits (each AUROC as the CLI prints it).

Drawn on a bare ``Figure`` with the Agg canvas (no pyplot, no global backend): the service
draws from several threads, and a test reads the figure's artists back (``gid``s below).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from privacy.dp_intervals import format_metric

#: the artists' ids (a test, or an SVG reader, finds them by these)
GID_AUROC, GID_INTERVAL, GID_ASKED = "auroc", "auroc-ci95", "asked-epsilon"
#: the most epsilon ticks drawn (the points beyond are thinned, evenly)
MAX_TICKS = 8
#: the points' epsilons spanning this ratio or more are drawn on a log axis
LOG_SPAN = 10.0


def sig3(value: float) -> str:
    """``0.702``, ``0.25``, ``1``, ``8``: 3 significant digits, no trailing zeros."""
    return f"{value:.3g}"


def draw(points: Sequence[Mapping[str, Any]], *, on: str, asked_epsilon: float) -> Figure:
    """The curve as a figure: ``points`` carry ``epsilon``, ``auroc`` (None: undefined under
    the noise) and ``auroc_ci95`` (``[low, high]`` or None)."""
    xs = [float(p["epsilon"]) for p in points]
    ys = [_num(p.get("auroc")) for p in points]
    ci = [p.get("auroc_ci95") or (None, None) for p in points]
    lo, hi = [_num(c[0]) for c in ci], [_num(c[1]) for c in ci]

    fig = Figure(figsize=(6, 3.8), layout="constrained")
    FigureCanvasAgg(fig)  # gives the figure a renderer (savefig, and tests' bounding boxes)
    ax = fig.add_subplot()
    ax.fill_between(xs, lo, hi, alpha=0.25, color="C0", linewidth=0, label="95% interval")
    ax.collections[-1].set_gid(GID_INTERVAL)
    (line,) = ax.plot(xs, ys, marker="o", color="C0", label="DP AUROC")
    line.set_gid(GID_AUROC)
    for x, y in zip(xs, ys, strict=True):
        if math.isnan(y):
            # no point to draw: say so where the point would be (low on the axes)
            where = ax.get_xaxis_transform()
            ax.text(x, 0.03, "undefined", transform=where, ha="center", fontsize=7, rotation=90)
        else:
            # each AUROC as the CLI prints it (0.700)
            label = format_metric(y, None)
            ax.annotate(
                label, (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
            )
    ax.axhline(0.5, color="0.5", linewidth=0.8, linestyle=":", label="chance (0.5)")
    asked = ax.axvline(
        asked_epsilon, color="C3", linestyle="--", label=f"your epsilon {sig3(asked_epsilon)}"
    )
    asked.set_gid(GID_ASKED)

    # every point and the mark in view, a point with no AUROC too (autoscaling skips it)
    left, right = min([*xs, asked_epsilon]), max([*xs, asked_epsilon])
    if right / left >= LOG_SPAN:
        ax.set_xscale("log")
        ax.set_xlim(left / 1.3, right * 1.3)
    else:
        pad = (right - left) * 0.06 or 0.5
        ax.set_xlim(left - pad, right + pad)
    # ticks at the points (thinned past MAX_TICKS), no log minor tick labels to crowd them
    ticks = xs[:: max(1, math.ceil(len(xs) / MAX_TICKS))]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: sig3(v)))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: sig3(v)))
    ax.set_ylim(*_ylim([*ys, *lo, *hi]))
    ax.set_xlabel("epsilon (per person)")
    ax.set_ylabel(f"AUROC on {'dummy' if on == 'dummy' else 'synthetic'} rows")
    ax.set_title("utility vs epsilon (dry runs, no charge)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def write(points: Sequence[Mapping[str, Any]], png: Path, *, on: str, asked_epsilon: float) -> Path:
    """Draw the curve and save it as ``png``."""
    draw(points, on=on, asked_epsilon=asked_epsilon).savefig(png, dpi=120)
    return png


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _ylim(values: Sequence[float]) -> tuple[float, float]:
    """Room around every AUROC and interval end, and the chance line, inside [0, 1]."""
    seen = [v for v in values if not math.isnan(v)] + [0.5]
    low, high = min(seen), max(seen)
    pad = max(0.03, (high - low) * 0.12)  # the labels above the points need room too
    return max(0.0, low - pad), min(1.0, high + pad)
