"""DP evaluation across sites: each site's DP metrics, and the sites' pooled metrics.

Each site releases one Gaussian-noised ``2 x bins`` histogram (label x score bin) of the
final global model on its own test split: ``privacy.dp_metrics.noisy_histogram`` (L2
sensitivity 1 under add/remove one person, noise ``eval_sigma`` from the site's plan,
charged as ``GaussianStep(eval_sigma, 1.0, 1)`` in the site's own budget).

Every figure is post-processing of released histograms with
``privacy.dp_metrics.metrics_from_histogram``: a 95% interval per metric (DP noise and
test-set sampling) and the ``unreliable`` flag when the noise swamps the counts. The
server derives each site's figures and the pooled ones from the histograms itself
(``rounds.ServerRun.close_evaluation``), so they come from one code path whatever the site
computed.

The server adds the sites' histograms (``pooled_metrics``): the sum counts every evaluated
person once, i.e. it weights each site by its test persons, and it is post-processing of
released histograms (no extra charge). Its noise has standard deviation
sqrt(sum of the sites' sigma^2).

At the budgets of the test cohort (epsilon 1, ``EVAL_SHARE`` 0.1: sigma ~40 per cell) a
site of ~100-190 test persons has a per-class noise of sd ~220 (32 bins): its AUROC is often
undefined and always flagged. That is the honest answer to what was bought; a job that does
not want to pay for it sets ``privacy.evaluate = false`` (``FederatedConfig.evaluate``), and
:func:`evaluation_swamped` lets the service see it coming from public sizes alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from foundation.errors import SpecError
from privacy.dp_intervals import SWAMP_SDS
from privacy.dp_metrics import DEFAULT_BINS, DPMetrics, noisy_histogram
from privacy.dp_metrics import metrics_from_histogram as _metrics_from_histogram

#: score bins of the evaluation histogram: dp_binary_metrics' own default
EVAL_BINS: int = DEFAULT_BINS


def site_evaluation(
    scores: np.ndarray, labels: np.ndarray, sigma: float, seed: int
) -> tuple[DPMetrics, np.ndarray]:
    """One site's DP metrics and the ``(2, EVAL_BINS)`` noisy histogram they come from: the
    histogram is the first draw of the generator seeded with ``seed``, the intervals' redraws
    follow from it (``dp_binary_metrics`` exactly)."""
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise SpecError("evaluation.sigma", "must be a finite number > 0", "use the plan's sigma")
    rng = np.random.default_rng(seed)
    hist = noisy_histogram(scores, labels, float(sigma), rng, bins=EVAL_BINS)
    return _metrics_from_histogram(hist, float(sigma), rng), hist


def metrics_from_histogram(noisy: np.ndarray, sigma: float, seed: int) -> DPMetrics:
    """The metrics (with intervals and flag) of a released ``(2, EVAL_BINS)`` histogram."""
    noisy = np.asarray(noisy, dtype=np.float64)
    if noisy.shape != (2, EVAL_BINS) or not np.isfinite(noisy).all():
        raise SpecError("evaluation.histogram", f"must be 2 x {EVAL_BINS} finite counts")
    return _metrics_from_histogram(noisy, float(sigma), np.random.default_rng(seed))


def pooled_metrics(histograms: Sequence[tuple[np.ndarray, float]], seed: int) -> DPMetrics | None:
    """Metrics of the sum of the sites' noisy histograms ``(histogram, sigma)``; None if none."""
    if not histograms:
        return None
    total = np.zeros((2, EVAL_BINS), dtype=np.float64)
    variance = 0.0
    for hist, sigma in histograms:
        total += np.asarray(hist, dtype=np.float64).reshape(2, EVAL_BINS)
        variance += float(sigma) ** 2
    return metrics_from_histogram(total, math.sqrt(variance), seed)


def site_eval_sigma(epsilon: float, delta: float) -> float:
    """The noise of each site's evaluation histogram: ``plan_dpsgd``'s ``eval_sigma`` for
    the site's budget, which depends on ``epsilon``, ``delta`` and ``EVAL_SHARE`` alone."""
    from privacy.accountant import calibrate_noise
    from training.federated.config import EVAL_SHARE

    return calibrate_noise(EVAL_SHARE * epsilon, delta, 1.0, 1)


def evaluation_swamped(test_persons: Sequence[int], *, epsilon: float, delta: float) -> bool:
    """Whether the pooled evaluation of sites with these test-split sizes, each under its
    plan's noise (:func:`site_eval_sigma`), is swamped even in the best case: when half of all test persons were
    positives, that count would still be under ``SWAMP_SDS`` noise sd of the pooled class
    count (``dp_metrics`` rule 1 would flag it whatever the data). Decide it from *public*
    sizes only (the dataset card's counts when the contract declares them public): a
    decision on private counts would answer a threshold question about them for free."""
    sites = [int(n) for n in test_persons]
    if not sites:
        return True
    class_sd = site_eval_sigma(epsilon, delta) * math.sqrt(len(sites) * EVAL_BINS)
    return sum(sites) / 2.0 < SWAMP_SDS * class_sd
