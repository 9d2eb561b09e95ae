"""DP evaluation across sites: each site's DP metrics, and the sites' pooled metrics.

Each site releases one Gaussian-noised ``2 x bins`` histogram (label x score bin) of the
final global model on its own test split: ``privacy.dp_metrics.dp_binary_metrics``'s
mechanism (L2 sensitivity 1 under add/remove one person, noise ``eval_sigma`` from the
site's plan, charged as ``GaussianStep(eval_sigma, 1.0, 1)`` in the site's own budget).

``site_evaluation`` returns the site's metrics from ``dp_binary_metrics`` itself, and the
noisy histogram of the very same draw (the generator is seeded twice from one seed and the
histogram is the first thing either draws), so metrics and histogram are one release.

The server adds the sites' histograms (``pooled_metrics``): the sum counts every evaluated
person once, i.e. it weights each site by its test persons, and it is post-processing of
released histograms (no extra charge). Its noise has standard deviation
sqrt(sum of the sites' sigma^2).

``privacy.dp_metrics`` exposes only ``dp_binary_metrics`` (scores in, metrics out, the
histogram discarded), so the histogram comes from its private ``_noisy_histogram`` and
``metrics_from_histogram`` repeats its post-processing with its private helpers.
``tests/test_federated.py`` pins that ``metrics_from_histogram`` of a site's histogram
equals ``dp_binary_metrics`` on the same draw, so a change there fails a test here.
(Asked of the privacy owner: make ``noisy_histogram`` and ``metrics_from_histogram`` public.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from connectors.errors import SpecError
from privacy import dp_metrics as _dpm
from privacy.dp_metrics import DPMetrics, dp_binary_metrics

#: score bins of the evaluation histogram: dp_binary_metrics' own default
EVAL_BINS: int = int(getattr(_dpm, "DEFAULT_BINS", 20))


def site_evaluation(
    scores: np.ndarray, labels: np.ndarray, sigma: float, seed: int
) -> tuple[DPMetrics, np.ndarray]:
    """One site's DP metrics and the ``(2, EVAL_BINS)`` noisy histogram they come from."""
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise SpecError("evaluation.sigma", "must be a finite number > 0", "use the plan's sigma")
    metrics = dp_binary_metrics(
        scores, labels, float(sigma), np.random.default_rng(seed), bins=EVAL_BINS
    )
    labels_idx = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    hist = _dpm._noisy_histogram(
        scores, labels_idx, float(sigma), np.random.default_rng(seed), EVAL_BINS
    )
    return metrics, hist


def metrics_from_histogram(noisy: np.ndarray, sigma: float) -> DPMetrics:
    """The metrics ``dp_binary_metrics`` derives from a noisy histogram (post-processing)."""
    noisy = np.asarray(noisy, dtype=np.float64)
    bins = EVAL_BINS
    if noisy.shape != (2, bins) or not np.isfinite(noisy).all():
        raise SpecError("evaluation.histogram", f"must be 2 x {bins} finite counts")
    n_noisy = max(0.0, float(noisy.sum()))
    clamped = np.maximum(noisy, 0.0)
    neg, pos = noisy[0], noisy[1]
    total = float(noisy.sum())
    half = bins // 2
    correct = float(neg[:half].sum() + pos[half:].sum())
    return DPMetrics(
        auroc=_dpm._binned_auroc(neg, pos),
        accuracy=min(1.0, max(0.0, correct / total)) if total > 0 else math.nan,
        ece=_dpm._expected_calibration_error(clamped[0], clamped[1], bins),
        n_noisy=n_noisy,
        bins=bins,
        sigma=float(sigma),
    )


def pooled_metrics(histograms: Sequence[tuple[np.ndarray, float]]) -> DPMetrics | None:
    """Metrics of the sum of the sites' noisy histograms ``(histogram, sigma)``; None if none."""
    if not histograms:
        return None
    total = np.zeros((2, EVAL_BINS), dtype=np.float64)
    variance = 0.0
    for hist, sigma in histograms:
        total += np.asarray(hist, dtype=np.float64).reshape(2, EVAL_BINS)
        variance += float(sigma) ** 2
    return metrics_from_histogram(total, math.sqrt(variance))
