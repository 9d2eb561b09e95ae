"""The sampled Gaussian mechanism's RDP curve: ``privacy.rdp_sgm`` beside Opacus's sums.

Two figures, each the zone's code and the plain baseline on the same cases in one run:

- **curves:** the whole order grid (``RDP_ORDERS``) for sampling rates and noise levels of
  the plans the zone makes, by ``rdp_sgm.rdp_curve`` (NumPy arrays) and by Opacus's
  ``compute_rdp`` (the same series, one term at a time); the curves must agree to rounding
  (the run fails otherwise).
- **calibrations:** ``calibrate_noise`` as the zone runs it, then with the accountant's curve
  taken from Opacus's ``compute_rdp`` (what it used before ``rdp_sgm``); the noise levels must
  be identical.

    python benchmarks/bench_rdp.py
"""

from __future__ import annotations

import itertools
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import write_figures  # noqa: E402

import privacy.accountant as accountant  # noqa: E402
from privacy import rdp_sgm  # noqa: E402
from privacy.accountant import RDP_ORDERS, GaussianStep, calibrate_noise  # noqa: E402

#: sampling rates from a few hundred persons (batch ~64-128) to a large table, and noise
#: levels from epsilon ~10 to ~0.1
CURVE_CASES = list(itertools.product([0.4, 0.1, 0.01, 0.0005], [0.6, 1.0, 2.0, 5.0, 15.0]))
#: (target epsilon, delta, sample rate, steps) of DP-SGD plans
CALIBRATION_CASES = list(
    itertools.product([1.0, 3.0, 8.0], [1e-6], [0.4, 0.15, 0.01], [6, 100, 600])
)


def opacus_curve(q: float, sigma: float, steps: int, orders: Sequence[float]) -> np.ndarray:
    curve = accountant._opacus_rdp().compute_rdp(
        q=q, noise_multiplier=sigma, steps=steps, orders=list(orders)
    )
    return np.asarray(curve, dtype=np.float64)


def calibrate_all() -> tuple[list[float], float]:
    answers, t0 = [], time.perf_counter()
    for target, delta, q, steps in CALIBRATION_CASES:
        # a DP-SGD plan's training calibration composes with its evaluation release
        fixed = (GaussianStep(calibrate_noise(0.2 * target, delta, 1.0, 1), 1.0, 1),)
        answers.append(calibrate_noise(target, delta, q, steps, fixed=fixed))
    return answers, time.perf_counter() - t0


def main() -> None:
    ours_s = plain_s = 0.0
    for q, sigma in CURVE_CASES:
        t0 = time.perf_counter()
        ours = rdp_sgm.rdp_curve(q, sigma, 1, RDP_ORDERS)
        t1 = time.perf_counter()
        plain = opacus_curve(q, sigma, 1, RDP_ORDERS)
        t2 = time.perf_counter()
        np.testing.assert_allclose(ours, plain, rtol=1e-9, atol=1e-11)
        ours_s, plain_s = ours_s + t1 - t0, plain_s + t2 - t1

    zone_answers, zone_cal_s = calibrate_all()
    accountant.rdp_curve = opacus_curve  # the baseline: the accountant before rdp_sgm
    try:
        plain_answers, plain_cal_s = calibrate_all()
    finally:
        accountant.rdp_curve = rdp_sgm.rdp_curve
    if zone_answers != plain_answers:
        raise SystemExit(f"different noise levels: {zone_answers} {plain_answers}")

    out = {
        "machine": platform.machine(),
        "curve_cases": len(CURVE_CASES),
        "orders_per_curve": len(RDP_ORDERS),
        "rdp_sgm_curves_s": round(ours_s, 3),
        "opacus_curves_s": round(plain_s, 3),
        "ratio_curves": round(ours_s / plain_s, 3),
        "calibrations": len(CALIBRATION_CASES),
        "identical_noise_levels": len(CALIBRATION_CASES),
        "zone_calibrations_s": round(zone_cal_s, 2),
        "opacus_curve_calibrations_s": round(plain_cal_s, 2),
        "ratio_calibrations": round(zone_cal_s / plain_cal_s, 3),
    }
    print(
        write_figures(
            "rdp",
            "RDP curves of the sampled Gaussian mechanism: rdp_sgm (NumPy) vs Opacus's sums",
            out,
        )
    )


if __name__ == "__main__":
    main()
