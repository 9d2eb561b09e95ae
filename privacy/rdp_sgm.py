"""The Renyi DP of the sampled Gaussian mechanism, every term of a series at once.

Mironov, Talwar and Zhang 2019, "Renyi differential privacy of the sampled Gaussian
mechanism" (arXiv:1908.10530), Section 3.3: a step that samples each person with probability
``q`` and adds Gaussian noise of ``sigma`` times the sensitivity has, at order ``alpha``, RDP
``log(A_alpha) / (alpha - 1)``. ``A_alpha`` is a finite binomial sum for an integer order and,
for a fractional one, two alternating series, each cut after its first term below ``e**-30``.

Opacus sums the same series one term at a time in Python (``opacus.accountants.analysis.rdp``).
A calibration evaluates them for dozens of noise levels, and at a high sampling rate (a few
hundred persons) a fractional order's series runs to thousands of terms: the accountant took
0.3-0.9 CPU-s of each quote or submit on such a table and ~35 CPU-s of one ``make test``.
Here the orders are rows and the terms columns of NumPy arrays, a series is
extended in doubling batches only while some order's has not reached the cut, and each sum is
a signed log-sum-exp: the same series, cut after the same term.
``tests/privacy/test_rdp_sgm.py`` holds the result to Opacus's own functions over a grid of
sampling rates, noise levels and every order the accountant uses; ``test_accountant.py`` holds
the accountant to Google's ``dp_accounting``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special

#: a fractional order's series stops after its first term below e**-30 (the paper's and
#: Opacus's cut; the terms left are below e**-30 and falling)
LOG_TERM_CUT = -30.0
#: terms of the first batch; an order whose series has not reached the cut by ``MAX_TERMS``
#: terms gets RDP nan (the accountant reads it as +inf: that order never gives the minimum)
FIRST_BATCH, MAX_TERMS = 64, 1 << 20
#: an integer order's sum has alpha + 1 terms; rows are padded to this many (the largest order
#: of the accountant's grid)
INTEGER_TERMS = 1024


class _SignedLogSums:
    """One running sum per row, of terms given as log-magnitudes and signs, kept as
    ``log(sum) = top + log(scaled)`` so that no term overflows or underflows on its own."""

    def __init__(self, rows: int) -> None:
        self.top = np.full(rows, -np.inf)
        self.scaled = np.zeros(rows)

    def add(self, rows: np.ndarray, log_terms: np.ndarray, signs: Any, keep: np.ndarray) -> None:
        masked = np.where(keep, log_terms, -np.inf)
        old_top = self.top[rows]
        top = np.maximum(old_top, masked.max(axis=1))
        shift = np.where(np.isfinite(top), top, 0.0)
        carried = np.where(np.isfinite(old_top), self.scaled[rows] * np.exp(old_top - shift), 0.0)
        fresh = np.where(keep, signs * np.exp(masked - shift[:, None]), 0.0).sum(axis=1)
        self.scaled[rows] = carried + fresh
        self.top[rows] = top

    def logs(self) -> np.ndarray:
        """Each row's log(sum); nan where the sum is not positive."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.scaled > 0, self.top + np.log(self.scaled), np.nan)


def _log_a_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha) for integer orders: sum over i <= alpha of C(alpha, i) q^i (1-q)^(alpha-i)
    exp((i^2 - i) / (2 sigma^2))."""
    # as many terms for every row and every call (masked past each row's order): a row's sum
    # then never depends on which other orders were asked for with it
    i = np.arange(max(int(alphas.max()), INTEGER_TERMS) + 1, dtype=np.float64)[None, :]
    a = alphas[:, None]
    keep = i <= a
    # log C(alpha, i) from log-gamma: no coefficient overflows (C(1024, 512) is ~1e307)
    log_binom = (
        special.gammaln(a + 1)
        - special.gammaln(i + 1)
        - special.gammaln(np.where(keep, a - i, 0.0) + 1)
    )
    log_terms = (
        log_binom + i * math.log(q) + (a - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    )
    sums = _SignedLogSums(len(alphas))
    sums.add(np.arange(len(alphas)), log_terms, 1.0, keep)
    return sums.logs()


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha) for fractional orders: the two series over (-inf, z0] and [z0, inf)."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq, two_var = math.log(q), math.log1p(-q), 2 * sigma**2
    below0, above0 = _SignedLogSums(len(alphas)), _SignedLogSums(len(alphas))
    done = np.zeros(len(alphas), dtype=bool)
    rows = np.arange(len(alphas))
    start, size = 0, FIRST_BATCH
    while rows.size and start < MAX_TERMS:
        i = np.arange(start, start + size, dtype=np.float64)[None, :]
        a = alphas[rows][:, None]
        coef = special.binom(a, i)
        log_coef = np.log(np.abs(coef))
        j = a - i
        # log(erfc(x) / 2) = log_ndtr(-sqrt(2) x), with x = (i - z0) / (sqrt(2) sigma)
        log_s0 = (
            log_coef
            + i * log_q
            + j * log_1mq
            + (i * i - i) / two_var
            + special.log_ndtr((z0 - i) / sigma)
        )
        log_s1 = (
            log_coef
            + j * log_q
            + i * log_1mq
            + (j * j - j) / two_var
            + special.log_ndtr((j - z0) / sigma)
        )
        under = np.maximum(log_s0, log_s1) < LOG_TERM_CUT
        reached = under.any(axis=1)
        # a series ends with its first term under the cut (that term is still added)
        last = np.where(reached, under.argmax(axis=1), size - 1)
        keep = np.arange(size)[None, :] <= last[:, None]
        signs = np.sign(coef)
        below0.add(rows, log_s0, signs, keep)
        above0.add(rows, log_s1, signs, keep)
        done[rows[reached]] = True
        rows = rows[~reached]
        start, size = start + size, size * 2
    with np.errstate(invalid="ignore"):
        return np.where(done, np.logaddexp(below0.logs(), above0.logs()), np.nan)


def rdp_curve(q: float, sigma: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    """``steps`` steps' RDP at each order (composition adds RDP); nan where a series failed.

    The edge cases as the paper takes them: nothing sampled (``q = 0``) costs 0, no noise costs
    +inf, ``q = 1`` is the plain Gaussian mechanism's ``alpha / (2 sigma^2)``."""
    alphas = np.asarray(orders, dtype=np.float64)
    if q == 0:
        return np.zeros(len(alphas))
    if sigma == 0:
        return np.full(len(alphas), np.inf)
    if q == 1.0:
        return alphas / (2 * sigma**2) * steps
    out = np.full(len(alphas), np.inf)
    finite = np.isfinite(alphas)
    integer = finite & (alphas == np.floor(alphas))
    fractional = finite & ~integer
    if integer.any():
        out[integer] = _log_a_integer(q, sigma, alphas[integer]) / (alphas[integer] - 1)
    if fractional.any():
        out[fractional] = _log_a_fractional(q, sigma, alphas[fractional]) / (alphas[fractional] - 1)
    return out * steps
