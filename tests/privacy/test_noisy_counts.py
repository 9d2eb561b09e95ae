"""The smooth shape MST gives a numeric column when its noise is as large as its data
(``privacy.noisy_counts``): it recovers a hump from counts drowned in noise better than the
counts themselves, keeps two humps apart, keeps the label's split and totals, and leaves
alone what it is not for (categories, log scales, few bins, plenty of signal)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from connectors.scales import Scale
from privacy.noisy_counts import PARAMETRIC_SNR, fit_mixture, mixture_mass, smooth_anchor

BINS = 32


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between two binned distributions."""
    return float(np.abs(np.cumsum(a / a.sum()) - np.cumsum(b / b.sum())).max())


def test_a_hump_drowned_in_noise_comes_back_closer_than_the_counts() -> None:
    # 400 persons in a hump 3 bins wide, noise 30 per bin: whas500's regime at epsilon 1
    true = mixture_mass(np.asarray([13.0, math.log(3.0)]), BINS, 400.0)
    far = np.r_[0:2, 25:BINS]  # bins four deviations and more from the hump
    fitted, clipped, fitted_far, clipped_far = [], [], [], []
    for seed in range(20):
        noisy = true + np.random.default_rng(seed).normal(0.0, 30.0, BINS)
        fit = fit_mixture(noisy, 400.0, 0.5 * 30.0**2 * math.log(BINS))
        assert fit.sum() == pytest.approx(400.0) and (fit >= 0).all()
        positive = np.maximum(noisy, 0.0)
        fitted.append(_ks(fit, true))
        clipped.append(_ks(positive, true))
        fitted_far.append(fit[far].sum() / fit.sum())
        clipped_far.append(positive[far].sum() / positive.sum())
    assert np.mean(fitted) < 0.85 * np.mean(clipped)
    # the counts' positive part puts a tenth of the persons where nobody is; the fit does not
    assert np.mean(clipped_far) > 0.08 and np.mean(fitted_far) < 0.02


def test_two_humps_stay_two() -> None:
    params = np.asarray([0.0, 7.0, math.log(2.0), 24.0, math.log(2.0)])
    true = mixture_mass(params, BINS, 3000.0)
    noisy = true + np.random.default_rng(1).normal(0.0, 10.0, BINS)
    fit = fit_mixture(noisy, 3000.0, 0.5 * 10.0**2 * math.log(BINS))
    assert np.abs(fit - true).sum() < 0.05 * 3000.0
    assert fit[15] < 0.2 * min(fit[7], fit[24])  # the valley between them stays a valley


def _anchor(seed: int, n: float = 400.0, sigma: float = 25.0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy (label, bin) table, two bins past the body ("missing", say), and a denoised
    stand-in that kept the middle bins only."""
    rng = np.random.default_rng(seed)
    per_label = [
        mixture_mass(np.asarray([12.0, math.log(3.0)]), BINS, 0.6 * n),
        mixture_mass(np.asarray([16.0, math.log(3.0)]), BINS, 0.4 * n),
    ]
    table = np.concatenate([np.stack(per_label), np.full((2, 2), 5.0)], axis=1)
    noisy = table + rng.normal(0.0, sigma, table.shape)
    denoised = np.zeros_like(table)
    denoised[:, 8:22] = table[:, 8:22]
    denoised[:, BINS:] = table[:, BINS:]
    return noisy, denoised


def test_the_label_split_and_the_totals_are_kept() -> None:
    noisy, denoised = _anchor(2)
    label = denoised.sum(axis=1)
    out = smooth_anchor(
        True, Scale.LINEAR, BINS, noisy, denoised, label, 25.0, piece_penalty=0.5, rake_rounds=25
    )
    assert out is not denoised and (out >= 0).all()
    np.testing.assert_allclose(out.sum(axis=1), label, rtol=1e-6)
    np.testing.assert_allclose(out[:, BINS:].sum(axis=0), denoised[:, BINS:].sum(axis=0), rtol=1e-3)
    # where the piecewise fit kept mass the label's share is its own (label 0 sits lower)
    share = out[0, :BINS] / out[:, :BINS].sum(axis=0)
    kept = denoised[0, :BINS] / np.where(
        denoised[:, :BINS].sum(axis=0) > 0, denoised[:, :BINS].sum(axis=0), 1
    )
    assert share[10] == pytest.approx(kept[10], abs=0.05)
    assert share[9] > share[20]  # label 0's hump is left of label 1's, past the kept bins too
    assert share[2] == pytest.approx(share[8], abs=0.05)  # an emptied bin takes its neighbour's


@pytest.mark.parametrize(
    ("numeric", "scale", "body", "sigma"),
    [
        (False, Scale.LINEAR, BINS, 25.0),  # a category or a date: no hump to assume
        (True, Scale.LOG, BINS, 25.0),  # a log-scaled count: its mass sits at the low end
        (True, Scale.LINEAR, 5, 25.0),  # a few values: already few numbers
        (True, Scale.LINEAR, BINS, 0.1),  # plenty of signal: the piecewise fit is better
    ],
)
def test_what_it_is_not_for_is_left_alone(
    numeric: bool, scale: Scale, body: int, sigma: float
) -> None:
    noisy, denoised = _anchor(3)
    if sigma < 1:
        assert 400.0 / (sigma * math.sqrt(2) * math.sqrt(BINS)) > PARAMETRIC_SNR
    out = smooth_anchor(
        numeric,
        scale,
        body,
        noisy,
        denoised,
        denoised.sum(axis=1),
        sigma,
        piece_penalty=0.5,
        rake_rounds=25,
    )
    assert out is denoised
