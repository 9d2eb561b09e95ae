"""Honest figures at small n: the DP metrics' 95% intervals, the unreliable flag, their display.

A point estimate alone misleads when the noise is as large as the counts (see
``privacy.dp_metrics``), so every metric comes with a 95% interval and the result carries an
``unreliable`` flag with a reason. ``privacy.dp_metrics.metrics_from_histogram`` draws the
intervals with the helpers here and applies the rules with the thresholds here:

- **Interval:** a parametric bootstrap of the released histogram (:data:`REDRAWS` redraws).
  Each redraw adds to the noisy histogram (a) Poisson test-set sampling, centred, with each
  cell's noisy count (raised to 0) as its mean, and (b) fresh N(0, sigma^2) noise on every
  cell, and recomputes the metrics. So the interval covers both the DP noise and the sampling
  error of a finite test set (it targets the model's performance on the population the test
  persons come from, and so also covers the AUROC of the test persons themselves). AUROC and
  accuracy take the 2.5 and 97.5 percentiles of the redraws. ECE is biased upward under
  noise (it averages absolute gaps of noisy rates) and every redraw carries that bias twice,
  so its interval is the basic (reflected) bootstrap interval ``[2m - q97.5, 2m - q2.5]``,
  which removes a bias the redraws share with the estimate. A metric that is undefined (no
  noisy positives or negatives, nothing counted) in more than :data:`MAX_UNDEFINED_SHARE` of
  the redraws gets its whole range [0, 1] as interval. ``n_noisy``'s interval is the DP
  noise's alone (``+- 1.96 sigma sqrt(2 bins)``): the test set's size is not a sample.
  The redraws use the caller's ``rng`` after the histogram's noise: they are post-processing
  of the released histogram, cost no privacy, and are as unpredictable as the noise.
  What the interval does not cover: the binning (ties within a bin count half; on
  calibrated cohorts the binned AUROC is ~0.003 below the exact one) and, for ECE, the bin
  centre standing in for the bin's mean score (at most 0.047, see ``privacy.dp_metrics``).
- **Unreliable** (``unreliable: true`` and ``unreliable_reason``), by these rules in turn:

  1. a metric is undefined under the noise, in the estimate or in more than
     :data:`MAX_UNDEFINED_SHARE` of the redraws; or the noisy count of positives or of
     negatives is below :data:`SWAMP_SDS` noise standard deviations of that count
     (``sigma * sqrt(bins)``, the noise of a sum of ``bins`` cells). Reason:
     :data:`SWAMPED`, "the evaluation noise swamps the test counts".
  2. the 95% interval of AUROC, accuracy or ECE is wider than :data:`MAX_RELIABLE_WIDTH`
     (0.25: an AUROC "between 0.55 and 0.80" says little). Reason: the metric and the width.

  At 220 test persons (~30 positives) under sigma 18, rule 1 fires in nearly every run; at
  10,000 persons under sigma 10 neither rule fires and the AUROC interval is ~0.03 wide.

``format_metric`` and ``describe_metrics`` turn a metric and its interval into the display
lines the card and the CLI print.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: redraws of the parametric bootstrap behind every interval (~10 ms at 32 bins)
REDRAWS = 1000
#: the intervals' coverage
CONFIDENCE = 0.95
#: rule 1: a class whose noisy count is below this many noise sd (sigma * sqrt(bins)) is swamped
SWAMP_SDS = 2.0
#: rule 2: an interval (AUROC, accuracy or ECE) wider than this marks the evaluation unreliable
MAX_RELIABLE_WIDTH = 0.25
#: a metric undefined in more than this share of the redraws gets its whole range as interval
MAX_UNDEFINED_SHARE = 0.025
#: the reason of rule 1, as the card and the CLI print it
SWAMPED = "the evaluation noise swamps the test counts"


#: how the intervals were made (written next to them)
def interval_method(redraws: int) -> str:
    return (
        f"{CONFIDENCE:.0%} parametric bootstrap, {redraws} redraws of the Gaussian noise and of "
        "Poisson test-set sampling around the noisy counts (percentile; basic for ECE); "
        "n_noisy: the noise alone"
    )


INTERVAL_METHOD = interval_method(REDRAWS)
#: the bounded metrics, in display order
METRICS = ("auroc", "accuracy", "ece")

Z_975 = 1.959963984540054  # the standard normal's 97.5% quantile


def redraw_histograms(
    noisy: np.ndarray, sigma: float, rng: np.random.Generator, redraws: int
) -> np.ndarray:
    """``(redraws, 2, bins)``: the noisy histogram + centred Poisson sampling + fresh noise."""
    mean = np.maximum(noisy, 0.0)
    shape = (redraws, *noisy.shape)
    sampled = rng.poisson(np.broadcast_to(mean, shape)).astype(np.float64) - mean
    out = noisy + sampled
    if sigma > 0:
        out = out + rng.normal(0.0, sigma, size=shape)
    return out


def bootstrap_interval(
    point: float, draws: np.ndarray, *, basic: bool = False
) -> tuple[tuple[float, float], bool]:
    """``((low, high), defined)``: the bootstrap interval of a [0, 1] metric; its whole range
    (and ``defined`` False) when the metric is undefined in the estimate or too many redraws."""
    undefined = float(np.mean(np.isnan(draws))) if draws.size else 1.0
    if math.isnan(point) or undefined > MAX_UNDEFINED_SHARE:
        return (0.0, 1.0), False
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    q_lo, q_hi = (float(q) for q in np.nanpercentile(draws, [tail, 100.0 - tail]))
    if basic:
        q_lo, q_hi = 2.0 * point - q_hi, 2.0 * point - q_lo
    lo = min(max(q_lo, 0.0), 1.0)
    hi = min(max(q_hi, 0.0), 1.0)
    # the interval always holds its own estimate (the percentiles of a lopsided redraw
    # distribution can miss it by a hair)
    return (min(lo, point), max(hi, point)), True


def format_metric(value: float | None, interval: Any) -> str:
    """``0.702 (95% CI 0.655-0.748)``: three significant digits; an undefined metric reads
    ``undefined``."""

    def g(x: float) -> str:
        return f"{x:#.3g}"

    head = "undefined" if value is None or math.isnan(value) else g(float(value))
    if interval is None:
        return head
    lo, hi = (float(x) for x in interval)
    return f"{head} ({CONFIDENCE:.0%} CI {g(lo)}-{g(hi)})"


def describe_metrics(metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """Display lines of a :meth:`privacy.dp_metrics.DPMetrics.to_dict` (or an older dict without intervals):
    ``{"auroc": "0.702 (95% CI 0.655-0.748)", ..., "unreliable": "<reason>"}``; the
    ``unreliable`` entry only when flagged. Empty for no metrics (a skipped evaluation)."""
    if not metrics:
        return {}
    ci = metrics.get("ci95") or {}
    out = {
        name: format_metric(metrics.get(name), ci.get(name)) for name in METRICS if name in metrics
    }
    if metrics.get("unreliable"):
        out["unreliable"] = str(metrics.get("unreliable_reason") or SWAMPED)
    return out
