"""The noise of DP queries: OpenDP's vetted mechanisms, and their 95% accuracy.

Only OpenDP adds noise here (no numpy or ``random`` noise of our own): its samplers draw from
OpenSSL's CSPRNG, and nothing in it can be seeded, so no noise ever derives from anything a
user controls. Three mechanisms, all pure DP (delta 0):

- ``discrete_laplace``: integer vectors (counts). Noise P(z) ~ exp(-|z|/b) on the integers.
- ``laplace``: float vectors (sums). OpenDP rounds the input exactly onto the lattice of
  multiples of 2^-1074 and adds discrete Laplace noise there (no Mironov float attack).
- ``private_quantile``: one quantile from fixed candidates (the exponential mechanism over
  OpenDP's quantile score, sampled by report-noisy-max).

Each scale is solved from the epsilon asked (``*_scale``): the published closed form,
nudged up by ulps until the measurement's own ``check(d_in, epsilon)`` passes, because
OpenDP's ``map`` rounds up and the bare closed form can overshoot by one ulp. Every release
re-checks ``map(d_in) <= epsilon`` on the very measurement that adds the noise and refuses
otherwise. The scales depend on parameters only, so a quote (no data) and a run agree.

OpenDP is imported inside the functions through its submodules: ``opendp.prelude`` costs
1.6-2 s (it pulls in scikit-learn) and the CLI imports this package.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from foundation.errors import BackendError

#: 1 - the coverage of every interval and accuracy figure
ALPHA = 0.05
#: how many ulps the closed-form scale may be nudged up before giving up
_NUDGES = 64


@functools.cache
def _contrib() -> None:
    """Enable OpenDP's "contrib" features once per process (the only flag needed)."""
    from opendp.mod import enable_features

    enable_features("contrib")


def _solve(make: Callable[[float], Any], d_in: float | int, epsilon: float, closed: float) -> float:
    """The smallest float scale at or above ``closed`` whose measurement passes the check."""
    scale = closed
    for _ in range(_NUDGES):
        if make(scale).check(d_in, epsilon):
            return scale
        scale = math.nextafter(scale, math.inf)
    raise BackendError("no noise scale meets the epsilon asked (OpenDP check failed)")


def _checked(meas: Any, d_in: float | int, epsilon: float) -> None:
    # the guarantee rests on this: the measurement that adds the noise spends no more than asked
    if not meas.map(d_in) <= epsilon:
        raise BackendError("the noise measurement would exceed its epsilon; nothing released")


def _check_args(sensitivity: float, epsilon: float) -> None:
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise BackendError("a noise sensitivity must be a positive number")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise BackendError("a noise epsilon must be a positive number")


# -- discrete Laplace on integer vectors -------------------------------------------------------
def _make_discrete_laplace(scale: float) -> Any:
    _contrib()
    from opendp.domains import atom_domain, vector_domain
    from opendp.measurements import make_laplace
    from opendp.metrics import l1_distance

    # T="i64": T=int would be i32, which saturates its noisy output silently
    space = vector_domain(atom_domain(T="i64")), l1_distance(T="i64")
    return make_laplace(*space, scale=scale)


def discrete_laplace_scale(sensitivity: int, epsilon: float) -> float:
    """Scale b of discrete Laplace noise: L1 ``sensitivity`` (an int) costs ``epsilon``."""
    _check_args(sensitivity, epsilon)
    return _solve(_make_discrete_laplace, int(sensitivity), epsilon, sensitivity / epsilon)


def discrete_laplace(
    values: Sequence[int], sensitivity: int, epsilon: float
) -> tuple[list[int], float]:
    """Noisy integers (each with its own draw) and the scale used. Never clamped: a noisy
    count may be negative."""
    scale = discrete_laplace_scale(sensitivity, epsilon)
    meas = _make_discrete_laplace(scale)
    _checked(meas, int(sensitivity), epsilon)
    return [int(v) for v in meas([int(v) for v in values])], scale


def discrete_laplace_half_width(scale: float, alpha: float = ALPHA) -> int:
    """The smallest integer h with P(|Z| <= h) >= 1 - alpha for discrete Laplace scale b.

    With p = e^(-1/b), P(|Z| >= m) = 2 p^m / (1 + p) for m >= 1, so h = ceil(t) - 1 where
    t = b ln(2 / (alpha (1 + p))) (OpenDP's ``discrete_laplacian_scale_to_accuracy``); the
    loop below re-checks the tail exactly and steps past float rounding either way.
    """
    from opendp.accuracy import discrete_laplacian_scale_to_accuracy

    p = math.exp(-1.0 / scale)

    def tail(m: int) -> float:  # P(|Z| >= m), m >= 1
        return 2.0 * p**m / (1.0 + p)

    h = max(0, math.ceil(discrete_laplacian_scale_to_accuracy(float(scale), alpha)) - 1)
    while tail(h + 1) > alpha:
        h += 1
    while h > 0 and tail(h) <= alpha:
        h -= 1
    return h


# -- Laplace on float vectors ------------------------------------------------------------------
def _make_laplace(scale: float) -> Any:
    _contrib()
    from opendp.domains import atom_domain, vector_domain
    from opendp.measurements import make_laplace
    from opendp.metrics import l1_distance

    space = vector_domain(atom_domain(T=float, nan=False)), l1_distance(T=float)
    return make_laplace(*space, scale=scale)


def laplace_scale(sensitivity: float, epsilon: float) -> float:
    """Scale b of (lattice) Laplace noise: L1 ``sensitivity`` costs ``epsilon``."""
    _check_args(sensitivity, epsilon)
    return _solve(_make_laplace, float(sensitivity), epsilon, sensitivity / epsilon)


def laplace(
    values: Sequence[float], sensitivity: float, epsilon: float
) -> tuple[list[float], float]:
    """Noisy floats (each with its own draw) and the scale used."""
    scale = laplace_scale(sensitivity, epsilon)
    meas = _make_laplace(scale)
    _checked(meas, float(sensitivity), epsilon)
    data = [float(v) for v in values]
    if not all(math.isfinite(v) for v in data):
        raise BackendError("a value to be noised is not finite")
    return [float(v) for v in meas(data)], scale


def laplace_half_width(scale: float, alpha: float = ALPHA) -> float:
    """P(|Z| > h) = alpha for Laplace scale b: h = b ln(1/alpha) (b ln 20 at 95%).

    The lattice noise is discrete Laplace on a grid of 2^-1074, whose tails are the continuous
    ones to within that grid.
    """
    from opendp.accuracy import laplacian_scale_to_accuracy

    return float(laplacian_scale_to_accuracy(float(scale), alpha))


# -- one quantile, by the exponential mechanism --------------------------------------------------
def _make_quantile(candidates: Sequence[float], alpha: float, scale: float) -> Any:
    _contrib()
    from opendp.domains import atom_domain, vector_domain
    from opendp.measurements import make_private_quantile
    from opendp.measures import max_divergence
    from opendp.metrics import symmetric_distance

    # size unknown (the row count is private): the sensitivity is the unsized one
    space = vector_domain(atom_domain(T=float, nan=False)), symmetric_distance()
    return make_private_quantile(
        *space, max_divergence(), candidates=list(candidates), alpha=alpha, scale=scale
    )


def quantile_scale(candidates: Sequence[float], alpha: float, epsilon: float, d_in: int) -> float:
    """Scale s of the quantile mechanism at level ``alpha`` for ``d_in`` added/removed rows.

    Closed form (unknown n): epsilon = d_in * 2 * max(alpha, 1 - alpha) / s. The score (see
    ``quantile_rank_error``) moves by at most max(alpha, 1 - alpha) per row, and the
    exponential mechanism spends twice its sensitivity over its scale.
    """
    _check_args(d_in, epsilon)
    closed = d_in * 2.0 * max(alpha, 1.0 - alpha) / epsilon
    return _solve(lambda s: _make_quantile(candidates, alpha, s), int(d_in), epsilon, closed)


def private_quantile(
    data: Sequence[float], candidates: Sequence[float], alpha: float, epsilon: float, d_in: int
) -> tuple[float, float]:
    """One released candidate for the ``alpha`` quantile of ``data``, and the scale used."""
    scale = quantile_scale(candidates, alpha, epsilon, d_in)
    meas = _make_quantile(candidates, alpha, scale)
    _checked(meas, int(d_in), epsilon)
    return float(meas([float(v) for v in data])), scale


def quantile_rank_error(scale: float, n_candidates: int, alpha: float = ALPHA) -> float:
    """R: with probability >= 1 - alpha the released candidate's score is within R of the best.

    OpenDP scores candidate c (in rows) as u(c) = |(1 - q) #{x < c} - q #{x > c}| for level q
    (its integer score divided by q's denominator), and releases argmin over candidates of
    u(c) minus independent noise of scale s (report-noisy-max; exponential noise, or Gumbel:
    either way a candidate with u(c) >= u_min + t wins over the best with probability at most
    e^(-t/s)). A union over the other n_candidates - 1 gives
    P(u(released) > u_min + t) <= (n_candidates - 1) e^(-t/s), so R = s ln((n_candidates - 1)
    / alpha). When no value equals c, u(c) = |#{x < c} - q n| is c's distance in rows from the
    target rank q n; with ties u(c) is at least the distance from q n to the ranks
    [#{x < c}, #{x <= c}] that c spans. The candidates' own spacing adds u_min (the best grid
    point's distance), which depends on the data and so is not part of R.
    """
    return float(scale) * math.log(max(n_candidates - 1, 1) / alpha)
