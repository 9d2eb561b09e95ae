"""Post-processing of noisy counts: the least-squares non-negative table with a known total
(``project_to_simplex``), and a smooth shape for a numeric column's counts when the noise is
as large as the data (``smooth_anchor``).

MST's anchors (``privacy.synth.marginals``) are noisy (label, bin) tables. On a few hundred
persons at epsilon 1 the noise per bin is as large as the counts, and the piecewise-constant
denoising then shifts a column's mass by a tenth of its spread or more: measured on the
public tables (``benchmarks/bench_synth.py --tables public``), the Kolmogorov-Smirnov
distance of age, blood pressures, heart rate and BMI between real and synthetic rows was
0.21-0.26 at epsilon 1, and the sdmetrics shape score 0.74-0.79.

A numeric column on a linear scale (a measurement, not a date nor a log-scaled count) is
usually one or two humps. So when the noise is comparable to the signal (``snr``, the
column's total over the noise of all its bins together, at most :data:`PARAMETRIC_SNR`), its
1-way counts are fitted by a mixture of one or two normals discretised on the bins (least
squares, each extra parameter paying the same penalty per noise variance as a piece of the
piecewise fit), which pools every bin's evidence into five numbers or fewer. The label split
of each bin is kept from the piecewise fit (its shrinkage towards the label marginal is what
keeps noise from inventing associations); bins the piecewise fit emptied take their nearest
kept bin's split. Post-processing of the noisy counts only: no privacy cost.

Measured (``benchmarks/results/synth_public.md``, 5 noise draws each): sdmetrics quality at
epsilon 1 on whas500 0.738 -> 0.786, gbsg2 0.789 -> 0.825, aids 0.875 -> 0.884, rossi
0.741 -> 0.748; at epsilon 3 0.815 -> 0.841, 0.858 -> 0.888, 0.905 -> 0.914, 0.808 -> 0.820;
train-on-synthetic AUROC the same within the draws' spread or higher (whas500 at epsilon 3
0.707 -> 0.745, rossi at epsilon 1 0.502 -> 0.558). flchain (6,271 persons: ``snr`` 47-130)
keeps the piecewise fit; a mixture fitted there lost (0.915 -> 0.900 at epsilon 3). Log-scaled
columns keep it too: fitted alike, gbsg2's lost 0.03-0.04 of train-on-synthetic AUROC.

Where the contract declares the column's ``typical = [low, high]`` range (where most values
lie, from a published reference, not from the rows), the fit also weighs a :class:`Prior`:
a normal whose 5th and 95th percentiles are the range, in bin units. The mixture's means and
spreads pay for straying from it as a Gaussian log-prior would beside the counts' Gaussian
noise (the penalty is in noise variances, like the squared error), so it pulls hard when
the noise swamps the counts and little when the counts are clear. Measured (public
tables, 15 noise draws each, sdmetrics quality, without -> with): at epsilon 1 whas500
0.783 -> 0.808, gbsg2 0.823 -> 0.836, aids 0.875 -> 0.873; at epsilon 3 0.841 -> 0.840,
0.882 -> 0.884, 0.911 -> 0.914. Train-on-synthetic AUROC moved within about one standard
error of its mean (whas500 at epsilon 3 0.732 -> 0.719, aids at epsilon 1 0.596 -> 0.579,
gbsg2 0.609 -> 0.605 and 0.643 -> 0.647). Log-scaled columns fitted alike gained at epsilon
1 (whas500 0.823, 5 draws) but lost at epsilon 3 (gbsg2 0.866), so they keep the piecewise
fit. The contract is public to the zone before any row is read: the prior costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import ndtr

from connectors.scales import Scale

#: the signal-to-noise ratio (total / (noise sd x sqrt(bins))) up to which the mixture
#: replaces the piecewise fit (measured: 2-16 on tables of 343-910 persons gained; 47-130 on
#: 6,271 persons tied or lost)
PARAMETRIC_SNR = 25.0
#: a column with fewer bins than this keeps the piecewise fit (a handful of values is
#: already few numbers to estimate)
MIN_BINS = 8
#: Nelder-Mead's iteration cap per fit (a fit of five parameters converges in a few hundred)
MAX_ITERATIONS = 2000
#: the prior on a normal's mean: this many of the typical range's own standard deviations
#: (the range is read as the 5th to 95th percentiles, width / 3.29)
PRIOR_MEAN_SDS = 0.5
#: ... and on its log standard deviation (0.5: within a factor of 1.65 either way, 1 sd)
PRIOR_LOG_SD = 0.5
#: the typical range's width in standard deviations of a normal (5th to 95th percentile)
TYPICAL_WIDTH_SDS = 3.29


@dataclass(frozen=True)
class Prior:
    """Where a column's values usually lie, as a normal in bin units (``mu``, ``sd``), from
    the contract's ``typical`` range alone (:meth:`from_typical`)."""

    mu: float
    sd: float

    @classmethod
    def from_typical(cls, low: float, high: float) -> Prior:
        """``low`` and ``high`` (bin units, already on the column's scale) as the 5th and 95th
        percentiles; at least a quarter of a bin wide."""
        return cls(mu=(low + high) / 2.0, sd=max((high - low) / TYPICAL_WIDTH_SDS, 0.25))

    def penalty(self, params: np.ndarray) -> float:
        """The mixture's (see :func:`mixture_mass`) negative log-prior, times 2: each normal's
        mean and log standard deviation against the prior's, averaged over the normals."""
        parts = [params[0:2]] if params.size == 2 else [params[1:3], params[3:5]]
        out = 0.0
        for mu, log_sd in parts:
            out += ((mu - self.mu) / (PRIOR_MEAN_SDS * self.sd)) ** 2
            out += ((log_sd - math.log(self.sd)) / PRIOR_LOG_SD) ** 2
        return out / len(parts)


def project_to_simplex(values: np.ndarray, totals: np.ndarray | float) -> np.ndarray:
    """Euclidean projection of each row of ``values`` (last axis) onto
    ``{x >= 0, sum(x) = total}``: the least-squares non-negative table with a known total.

    Used on noisy counts: it removes negative counts without the upward bias of clipping at 0
    (cells of noise-only mass shrink to zero). Post-processing: it costs no privacy."""
    v = np.asarray(values, dtype=np.float64)
    shape = v.shape
    k = shape[-1]
    flat = v.reshape(-1, k)
    t = np.broadcast_to(np.asarray(totals, dtype=np.float64), shape[:-1]).reshape(-1)
    t = np.maximum(t, 0.0)
    u = -np.sort(-flat, axis=1)
    css = np.cumsum(u, axis=1) - t[:, None]
    ranks = np.arange(1, k + 1)
    positive = u - css / ranks > 0
    last = k - 1 - np.argmax(positive[:, ::-1], axis=1)
    # index 0 always qualifies in exact arithmetic (t > 0); rounding can lose it for a total
    # far below the values' spacing, and then the answer is "all mass on the largest value"
    last = np.where(positive.any(axis=1), last, 0)
    theta = css[np.arange(flat.shape[0]), last] / (last + 1)
    out = np.maximum(flat - theta[:, None], 0.0)
    out[t <= 0] = 0.0
    return out.reshape(shape)


def rake(table: np.ndarray, rows_to: np.ndarray, cols_to: np.ndarray, rounds: int) -> np.ndarray:
    """Iterative proportional fitting of a non-negative 2-D ``table``, in place: ``rounds``
    times its rows scaled to sum to ``rows_to``, then its columns to ``cols_to`` (a row or
    column that sums to 0 stays 0). Returns ``table``."""
    for _ in range(rounds):
        rows = table.sum(axis=1)
        table *= np.where(rows > 0, rows_to / np.where(rows > 0, rows, 1.0), 0.0)[:, None]
        cols = table.sum(axis=0)
        table *= np.where(cols > 0, cols_to / np.where(cols > 0, cols, 1.0), 0.0)[None, :]
    return table


def snr(total: float, noise_sd: float, bins: int) -> float:
    """The column's total against the noise of its ``bins`` counts together."""
    return total / max(noise_sd * math.sqrt(max(bins, 1)), 1e-12)


def mixture_mass(params: np.ndarray, bins: int, total: float) -> np.ndarray:
    """``total`` persons spread over ``bins`` unit-width bins by one normal (``mu, log sd``)
    or two (``logit w, mu1, log sd1, mu2, log sd2``); mass beyond the ends falls in the end
    bins, as the codec clips values outside the domain into them."""
    edges = np.arange(bins + 1, dtype=np.float64)
    edges[0], edges[-1] = -np.inf, np.inf
    if params.size == 2:
        parts = [(1.0, params[0], params[1])]
    else:
        w = 1.0 / (1.0 + math.exp(-float(params[0])))
        parts = [(w, params[1], params[2]), (1.0 - w, params[3], params[4])]
    mass = np.zeros(bins)
    for weight, mu, log_sd in parts:
        sd = math.exp(min(float(log_sd), 50.0))
        mass += weight * np.diff(ndtr((edges - mu) / sd))
    return total * mass


def fit_mixture(
    noisy: np.ndarray,
    total: float,
    penalty: float,
    prior: Prior | None = None,
    noise_var: float = 0.0,
) -> np.ndarray:
    """The least-squares mixture of one or two normals for the noisy counts ``noisy``
    (``total`` persons), the one whose squared error plus ``penalty`` per parameter is the
    smaller; with a ``prior``, the squared error also pays ``noise_var`` (a count's noise
    variance) times :meth:`Prior.penalty`, i.e. the fit is the posterior mode. Starts from the
    quantiles of the counts' positive part (and from the prior, when there is one)."""
    bins = noisy.size
    positive = np.maximum(noisy, 0.0)
    centres = np.arange(bins) + 0.5
    cdf = np.cumsum(positive) / max(float(positive.sum()), 1e-12)

    def quantile(q: float) -> float:
        return float(centres[min(int(np.searchsorted(cdf, q)), bins - 1)])

    wide = math.log(max(bins / 6.0, 0.5))
    narrow = math.log(max(bins / 12.0, 0.5))
    starts: tuple[np.ndarray, ...] = (
        np.asarray([quantile(0.5), wide]),
        np.asarray([0.0, quantile(0.25), narrow, quantile(0.75), narrow]),
    )
    if prior is not None:
        starts += (np.asarray([prior.mu, math.log(prior.sd)]),)
    best: tuple[float, np.ndarray] | None = None
    for start in starts:

        def loss(p: np.ndarray) -> float:
            error = float(((noisy - mixture_mass(p, bins, total)) ** 2).sum())
            return error if prior is None else error + noise_var * prior.penalty(p)

        found = minimize(
            loss, start, method="Nelder-Mead", options={"maxiter": MAX_ITERATIONS, "xatol": 1e-3}
        )
        criterion = float(found.fun) + penalty * start.size
        if best is None or criterion < best[0]:
            best = (criterion, mixture_mass(found.x, bins, total))
    assert best is not None
    return best[1]


def smooth_anchor(
    numeric: bool,
    scale: Scale,
    body: int,
    noisy: np.ndarray,
    denoised: np.ndarray,
    label_marginal: np.ndarray,
    sigma: float,
    *,
    piece_penalty: float,
    rake_rounds: int,
    prior: Prior | None = None,
) -> np.ndarray:
    """``denoised`` (a (label, value) table from the piecewise fit of the noisy anchor
    ``noisy``, noise ``sigma`` per cell), with its first ``body`` values (the in-domain bins)
    re-shaped by :func:`fit_mixture` (weighing ``prior``, the contract's typical range, when
    given) when the column is ``numeric`` on a linear ``scale`` and the noise is as large as
    the data (see the module docstring); otherwise as it is."""
    if not numeric or scale is not Scale.LINEAR or body < MIN_BINS:
        return denoised
    k_label = noisy.shape[0]
    noise_sd = sigma * math.sqrt(k_label)  # of a bin's count summed over the label
    total = float(denoised[:, :body].sum())
    if total <= 0 or snr(total, noise_sd, body) > PARAMETRIC_SNR:
        return denoised
    per_parameter = piece_penalty * noise_sd**2 * math.log(max(body, 2))
    mass = fit_mixture(noisy[:, :body].sum(axis=0), total, per_parameter, prior, noise_sd**2)
    kept = denoised[:, :body].sum(axis=0)
    label_share = label_marginal / max(float(label_marginal.sum()), 1e-12)
    share = denoised[:, :body] / np.where(kept > 0, kept, 1.0)[None, :]
    alive = np.flatnonzero(kept > 0)
    if alive.size == 0:
        share[:] = label_share[:, None]
    else:
        for v in np.flatnonzero(kept <= 0):  # the nearest bin the piecewise fit kept
            share[:, v] = share[:, alive[np.argmin(np.abs(alive - v))]]
    out = denoised.copy()
    out[:, :body] = share * mass[None, :]
    # rows to the label marginal, columns to the fitted counts
    want = np.concatenate([mass, denoised[:, body:].sum(axis=0)])
    return rake(out, label_marginal, want, rake_rounds)
