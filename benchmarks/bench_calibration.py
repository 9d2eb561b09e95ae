"""Noise calibration: the accountant's search beside the same search on the whole order grid.

Every plan (a quote, a submit, each point of ``quote --curve``, each schedule ``tune`` tries)
calibrates noise: a bisection on sigma whose every step asks "does this sigma meet the
target?". The plain search answers each question with the whole RDP order grid
(``epsilon_for``: every order of ``RDP_ORDERS``); the zone's ``calibrate_noise`` first asks the
few orders around the last optimum, and for a "no" bounds blocks of orders from below before
computing any order one by one (``_meets_on_grid``). Both run here on
the same cases, one after the other; the answers must be identical (the run fails otherwise)
and the table gives the time of each and their ratio.

    python benchmarks/bench_calibration.py
"""

from __future__ import annotations

import itertools
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import write_figures  # noqa: E402

from foundation.errors import SpecError  # noqa: E402
from privacy.accountant import (  # noqa: E402
    GaussianStep,
    calibrate_noise,
    epsilon_for,
    search_noise,
)

#: targets, deltas, sample rates and step counts of the plans the zone makes (a job's
#: evaluation release is the q = 1, one-step case)
CASES = list(
    itertools.product(
        [0.5, 1.0, 3.0, 8.0], [1e-5, 1e-7], [1.0, 0.2, 0.01, 0.0005], [1, 10, 300, 3000]
    )
)


def plain_calibration(
    target: float, delta: float, q: float, steps: int, fixed: tuple[GaussianStep, ...]
) -> float:
    """The same search (``search_noise``), every question answered on the whole grid."""

    def meets(sigma: float) -> bool:
        return epsilon_for([*fixed, GaussianStep(sigma, q, steps)], delta) <= target

    return search_noise(meets, unreachable=SpecError("privacy.epsilon", "unreachable"))


def main() -> None:
    zone_s = plain_s = 0.0
    n = 0
    for target, delta, q, steps in CASES:
        # a DP-SGD plan's training calibration composes with its evaluation release
        fixed = (GaussianStep(calibrate_noise(0.2 * target, delta, 1.0, 1), 1.0, 1),)
        t0 = time.perf_counter()
        try:
            ours: float | str = calibrate_noise(target, delta, q, steps, fixed=fixed)
        except Exception as exc:  # noqa: BLE001 - an unreachable target, compared by kind
            ours = type(exc).__name__
        t1 = time.perf_counter()
        try:
            plain: float | str = plain_calibration(target, delta, q, steps, fixed)
        except SpecError:
            plain = "SpecError"
        t2 = time.perf_counter()
        if ours != plain:
            raise SystemExit(f"different answers at {(target, delta, q, steps)}: {ours} {plain}")
        zone_s += t1 - t0
        plain_s += t2 - t1
        n += 1
    out = {
        "machine": platform.machine(),
        "cases": n,
        "identical_answers": n,
        "zone_calibration_s": round(zone_s, 2),
        "whole_grid_calibration_s": round(plain_s, 2),
        "ratio_zone_vs_whole_grid": round(zone_s / plain_s, 3),
        "zone_ms_per_calibration": round(1000 * zone_s / n, 1),
    }
    title = "Noise calibration: the zone's search vs the same search on the whole order grid"
    print(write_figures("calibration", title, out))


if __name__ == "__main__":
    main()
