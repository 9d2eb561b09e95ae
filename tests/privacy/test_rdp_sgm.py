"""``privacy.rdp_sgm`` against Opacus's own term-by-term sums (the independent reference).

Opacus's ``opacus.accountants.analysis.rdp`` is loaded from its file, as the accountant
loads it for the conversion to epsilon; its ``compute_rdp`` is the same paper's series summed
one term at a time in Python. Ours must give the same curve at every order of the accountant's
grid, to rounding, over sampling rates from a large table's to a tiny one's and noise levels
from almost none to a lot.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from privacy import rdp_sgm
from privacy.accountant import RDP_ORDERS, _epsilon_from_curve, _opacus_rdp

RATES = [1e-5, 0.004, 0.1, 0.4, 0.8, 0.999]
SIGMAS = [0.4, 1.0, 2.5, 8.0, 40.0]


@pytest.mark.parametrize(("q", "sigma"), list(itertools.product(RATES, SIGMAS)))
def test_every_order_matches_opacus_term_by_term_sums(q: float, sigma: float) -> None:
    steps = 300
    want = np.asarray(
        _opacus_rdp().compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
    )
    got = rdp_sgm.rdp_curve(q, sigma, steps, RDP_ORDERS)
    assert np.isfinite(want).all() and np.isfinite(got).all()
    # rounding only: log1p(-q) against log(1 - q) and one log-sum-exp against a chain of
    # pairwise log-additions differ by ~1e-12 per step on the smallest values
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * steps)
    # and so does what a researcher sees: epsilon
    for delta in (1e-5, 1e-8):
        assert _epsilon_from_curve(got, delta) == pytest.approx(
            _epsilon_from_curve(want, delta), rel=1e-9
        )


def test_a_subset_of_orders_gives_exactly_the_whole_grids_values() -> None:
    """Calibration evaluates a few orders at a time and relies on each being the whole
    grid's value there, bit for bit."""
    rng = np.random.default_rng(7)
    for q, sigma in [(0.4, 1.3), (0.01, 0.9), (0.9, 6.0)]:
        whole = rdp_sgm.rdp_curve(q, sigma, 11, RDP_ORDERS)
        for _ in range(5):
            idx = np.sort(rng.choice(len(RDP_ORDERS), size=7, replace=False))
            part = rdp_sgm.rdp_curve(q, sigma, 11, [RDP_ORDERS[i] for i in idx])
            assert np.array_equal(part, whole[idx]), (q, sigma, idx)


def test_the_edge_cases_are_the_papers() -> None:
    orders = [1.5, 2.0, 32.0]
    assert np.array_equal(rdp_sgm.rdp_curve(0.0, 1.0, 10, orders), np.zeros(3))
    assert np.isinf(rdp_sgm.rdp_curve(0.3, 0.0, 10, orders)).all()
    # q = 1: the Gaussian mechanism, alpha / (2 sigma^2) per step
    assert np.allclose(rdp_sgm.rdp_curve(1.0, 2.0, 10, orders), [10 * a / 8 for a in orders])
    assert math.isinf(rdp_sgm.rdp_curve(0.3, 1.0, 1, [math.inf])[0])


def test_a_series_that_does_not_reach_the_cut_is_nan_not_a_number_too_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fractional order whose series is still above e**-30 after ``MAX_TERMS`` terms gets
    nan (the accountant makes it +inf: it never gives the minimum), not a partial sum."""
    monkeypatch.setattr(rdp_sgm, "MAX_TERMS", rdp_sgm.FIRST_BATCH)
    # at q = 0.4 and sigma = 1, order 1.1's series needs thousands of terms; 10.5's a few
    got = rdp_sgm.rdp_curve(0.4, 1.0, 1, [1.1, 10.5])
    assert math.isnan(got[0])
    assert math.isfinite(got[1])
