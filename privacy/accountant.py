"""The zone's privacy accountant for DP-SGD and Gaussian releases.

What every figure here means (docs/privacy-model.md, "Honest numbers"):

- **Neighbouring relation:** add or remove one *person* (the patient is the privacy unit, not
  the row). DP-SGD must therefore sample and clip per person, and a histogram release must
  count each person in exactly one cell; the callers (trainer, ``dp_metrics``) guarantee that.
- **Mechanism:** every release we account for is a (Poisson-subsampled) Gaussian mechanism of
  L2 sensitivity 1, described by a :class:`GaussianStep`. DP-SGD with sampling rate ``q`` and
  noise multiplier ``sigma`` for ``T`` steps is ``GaussianStep(sigma, q, T)``; one noisy
  sensitivity-1 histogram with noise ``sigma`` is ``GaussianStep(sigma, 1.0, 1)``.
- **Accountant:** Renyi DP (:attr:`Accountant.RDP`); composition adds RDP curves order by
  order, then converts once to (epsilon, delta). A step's curve is ``privacy.rdp_sgm``'s
  (Mironov et al. 2019's series, held to Opacus's RDP analysis in its tests); the conversion is
  Opacus's (``opacus.accountants.analysis.rdp``; this module and the DP trainer are the only
  places that use Opacus).

Everything is a pure function of frozen values: a ledger stores the ``GaussianStep`` events and
recomputes epsilon from them, it never keeps a running epsilon.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from foundation.errors import SpecError
from privacy.rdp_sgm import rdp_curve

#: The RDP orders (alphas) every curve is evaluated at. Google's ``dp_accounting`` default grid
#: (dense fractional orders 1.1..10.9, integers 11..63, then 128..1024) plus extra orders between
#: 64 and 1024. Why the extras: a single Gaussian histogram release with a small epsilon (our
#: evaluation release) has its optimal order in the hundreds, where the default grid's powers of
#: two leave gaps that cost ~6% of epsilon (sigma=20, delta=1e-6: 0.219 on the default grid,
#: 0.207 here, 0.206 on a 1/100-spaced grid). Orders stop at 1024 because Opacus computes
#: binomial coefficients C(alpha, i) in floating point, which overflows past alpha ~1030.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [64.0, 80.0, 96.0, 112.0, 128.0, 160.0, 192.0, 224.0, 256.0]
    + [320.0, 384.0, 448.0, 512.0, 640.0, 768.0, 896.0, 1024.0]
)

#: Calibration stops when the bracket on sigma is this narrow relative to its upper end.
CALIBRATION_RELATIVE_TOLERANCE = 1e-3
#: Orders on each side of the last optimum that calibration tries before the whole grid.
CALIBRATION_WINDOW = 4
#: Consecutive orders a calibration's "no" bounds together (``_meets_on_grid``), and the
#: relative margin a bound must clear the target by (far above the sums' rounding).
CALIBRATION_BLOCK, _BLOCK_MARGIN = 13, 1e-6
#: No calibration goes below this noise multiplier: under it the RDP bound is vacuous anyway
#: (epsilon in the hundreds for any useful number of steps), so a target that large is met here.
NOISE_FLOOR = 0.1
#: Nor above this one: a target that needs more noise than this is treated as unreachable
#: (the model would learn nothing; the caller should lower the steps or raise epsilon).
NOISE_CEILING = 1e4

NEIGHBOURING = "add/remove one person"
UNIT = "person"


class Composition(StrEnum):
    """How a DP-SGD job's training and its evaluation release compose.

    ``sequential``: both may read the same person (the split is by row position, which other
    persons move), so their RDP curves add. ``parallel``: the evaluation reads only persons
    the training never reads, by a per-person rule (``epsilon_parallel``)."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


class Accountant(StrEnum):
    """The accountant used to charge a release. There is one; the enum makes it explicit in
    every plan and ledger row which analysis produced a figure.

    RDP
        Renyi DP of the Sampled Gaussian Mechanism (Mironov, Talwar, Zhang 2019,
        arXiv:1908.10530), add/remove neighbouring, evaluated at :data:`RDP_ORDERS`.
        Heterogeneous steps compose by adding their RDP curves order by order. The curve is
        converted to (epsilon, delta) with Opacus's ``get_privacy_spent``, which implements the
        improved conversion of Balle et al. 2020 ("Hypothesis testing interpretations and Renyi
        differential privacy", AISTATS; Theorem 21 of arXiv:1905.09982):
        ``eps = min_alpha [ rdp(alpha) + log((alpha-1)/alpha) - (log(delta) + log(alpha)) /
        (alpha-1) ]`` -- never looser than the classic ``rdp(alpha) - log(delta)/(alpha-1)``
        (Mironov 2017, Prop. 3) that older published tables (Abadi et al. 2016, TF Privacy
        tutorials) used. Google's ``dp_accounting`` uses the same conversion.

        Opacus sums the alternating series for fractional orders with its signs, which is exact
        (the tests check it against numerical integration); ``dp_accounting`` 0.6 sums absolute
        values, an upper bound. So where a fractional order is optimal our epsilon can be a
        little below dp_accounting's on the same orders (~1e-4 relative seen), never above.
    """

    RDP = "rdp"


@dataclass(frozen=True)
class GaussianStep:
    """``steps`` compositions of a Gaussian mechanism of L2 sensitivity 1 with noise standard
    deviation ``noise_multiplier``, each applied to a Poisson sample of the persons taken with
    probability ``sample_rate`` (1.0 = everyone, i.e. no subsampling)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        # Validate on construction so a bad step can never reach the ledger.
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise SpecError(
                "privacy.noise_multiplier",
                "must be a finite number > 0",
                "a noise multiplier of 0 is not differentially private",
            )
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise SpecError("privacy.sample_rate", "must be in (0, 1]", "use batch_size / persons")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise SpecError("privacy.steps", "must be an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise SpecError("privacy.delta", "must be in (0, 1)", "use e.g. 1e-6")


def _check_epsilon(target_epsilon: float) -> None:
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise SpecError("privacy.epsilon", "must be a finite number > 0", "use e.g. 1.0 to 10.0")


@functools.cache
def _opacus_rdp() -> ModuleType:
    """Opacus's RDP analysis (``opacus.accountants.analysis.rdp``), its own file loaded alone.

    The module needs only numpy and scipy, but ``import opacus`` first runs the package's
    ``__init__``, which imports torch and the trainer: about 4 s of every CLI call that plans
    a job (a quote, a dry run, a submit), refusals included. Loaded here from the installed
    package's file, the same code, in milliseconds. A process that has imported Opacus
    already (a worker) uses that module."""
    name = "opacus.accountants.analysis.rdp"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("opacus")  # finds the package without running it
    if package is None or package.origin is None:
        raise ImportError("opacus is not installed; the accountant needs its RDP analysis")
    path = Path(package.origin).parent / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("safe_zone_opacus_rdp", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Opacus's RDP analysis from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rdp_curve(step: GaussianStep, orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """The step's RDP at every order in ``orders`` (:data:`RDP_ORDERS` unless a caller needs
    only some of them: each order's value is computed on its own, so a part of the grid holds
    exactly the whole grid's values there)."""
    if step.steps == 0:
        # Opacus multiplies the per-step curve by ``steps``; skip it so that 0 * inf is never nan.
        return np.zeros(len(orders))
    curve = rdp_curve(step.sample_rate, step.noise_multiplier, step.steps, orders)
    # Renyi divergences are >= 0; the log-space series can round a tiny one (tiny q, huge
    # sigma) to a small negative number. Raising it to 0 can only raise epsilon (conservative).
    # A nan (a series that failed) becomes +inf: that order then simply never wins the minimum.
    return np.where(np.isnan(curve), np.inf, np.maximum(curve, 0.0))


def _epsilon_from_curve(
    curve: np.ndarray, delta: float, orders: Sequence[float] = RDP_ORDERS
) -> float:
    """Convert a composed RDP curve to epsilon at ``delta`` (Balle et al. 2020, via Opacus)."""
    return _epsilon_and_order(curve, delta, orders)[0]


def _epsilon_and_order(
    curve: np.ndarray, delta: float, orders: Sequence[float] = RDP_ORDERS
) -> tuple[float, int]:
    """``_epsilon_from_curve``, and the index in ``orders`` of the order that gave it."""
    # Pad both ends with an order whose RDP is +inf: it can never be the minimiser, so Opacus's
    # "optimal order is the smallest/largest alpha" warning does not fire. That warning is about
    # tightness only (every order gives a valid bound); it fires at the largest order whenever
    # epsilon is tiny (huge sigma), and silencing it with warnings.catch_warnings would mutate
    # process-global state (not thread-safe).
    padded = [orders[0] - 0.05, *orders, orders[-1] + 1.0]
    rdp = np.concatenate(([np.inf], curve, [np.inf]))
    eps, order = _opacus_rdp().get_privacy_spent(orders=padded, rdp=rdp, delta=delta)
    eps = float(eps)
    if math.isnan(eps):
        return math.inf, len(orders) // 2
    # Opacus does not clip at 0 (dp_accounting does); a negative epsilon means "no loss".
    return max(0.0, eps), padded.index(float(order)) - 1


def _composed_curve(history: Sequence[GaussianStep]) -> np.ndarray:
    total = np.zeros(len(RDP_ORDERS))
    for step in history:
        total = total + _rdp_curve(step)
    return total


def epsilon_for(history: Sequence[GaussianStep], delta: float) -> float:
    """Epsilon at ``delta`` of the sequential composition of ``history`` (RDP, add/remove one
    person). Heterogeneous steps compose by adding their RDP curves; an empty history is 0."""
    _check_delta(delta)
    for step in history:
        if not isinstance(step, GaussianStep):
            raise SpecError("privacy.history", "must contain only GaussianStep events")
    active = [step for step in history if step.steps > 0]
    if not active:
        # Nothing released. (The conversion of an all-zero curve would not give 0: at the
        # largest order it still leaves (log(1/delta) - log(alpha)) / (alpha - 1) ~ 0.006.)
        return 0.0
    return _epsilon_from_curve(_composed_curve(active), delta)


def epsilon_parallel(parts: Sequence[Sequence[GaussianStep]], delta: float) -> float:
    """Epsilon at ``delta`` of releases made on disjoint sets of persons (parallel
    composition): the largest of the parts' own epsilons.

    Valid when each person's part is fixed by a rule of that person alone (the reader's
    split: a keyed hash of the person's pseudonym), never by who else is in the data. Adding
    or removing one person then changes the input of one part only, and a later part may
    even use an earlier part's output (the evaluation scores the trained model): with the
    other part's persons fixed, that is post-processing. So the whole is
    (max of the parts' epsilons, delta)-DP, where the parts' sequential composition
    (``epsilon_for`` of them all) would add them."""
    return max((epsilon_for(part, delta) for part in parts), default=0.0)


def dpsgd_schedule(n_persons: int, batch_size: int, epochs: int) -> tuple[float, int, int]:
    """``(sample_rate, steps_per_epoch, total_steps)`` for DP-SGD over ``n_persons`` persons.

    The accountant assumes Poisson sampling: each step includes each person independently with
    probability ``sample_rate = batch_size / n_persons`` (Opacus's ``DPDataLoader``), so
    ``batch_size`` is the *expected* batch size and an epoch is ``ceil(n_persons/batch_size)``
    steps."""
    for name, value, low in (
        ("dataset.persons", n_persons, 1),
        ("training.batch_size", batch_size, 1),
        ("training.epochs", epochs, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SpecError(name, f"must be an integer >= {low}")
    if batch_size > n_persons:
        raise SpecError(
            "training.batch_size",
            f"must not exceed the number of persons ({n_persons})",
            "lower training.batch_size",
        )
    sample_rate = batch_size / n_persons
    steps_per_epoch = math.ceil(n_persons / batch_size)
    return sample_rate, steps_per_epoch, steps_per_epoch * epochs


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    fixed: Sequence[GaussianStep] = (),
) -> float:
    """The smallest noise multiplier ``sigma`` (to :data:`CALIBRATION_RELATIVE_TOLERANCE`,
    rounded up) such that ``epsilon_for([*fixed, GaussianStep(sigma, sample_rate, steps)],
    delta) <= target_epsilon``. The returned sigma never overshoots the target: the search keeps
    the feasible end of its bracket and returns it.

    Targets so loose that :data:`NOISE_FLOOR` meets them get the floor.

    ``fixed`` holds releases already charged or reserved on the same persons (e.g. the
    evaluation histogram); they compose with the new step. Raises ``SpecError`` naming
    ``privacy.epsilon`` when no noise up to :data:`NOISE_CEILING` reaches the target."""
    _check_epsilon(target_epsilon)
    _check_delta(delta)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpecError("privacy.steps", "must be an integer >= 1")
    # Validates sample_rate (and fails before any arithmetic if it is out of range).
    GaussianStep(1.0, sample_rate, steps)

    already = epsilon_for(fixed, delta)  # also checks that fixed holds GaussianSteps
    fixed_curve = _composed_curve(fixed)
    rest = _rest_of_epsilon(fixed_curve, delta)  # the same for every sigma tried
    if already >= target_epsilon:
        raise SpecError(
            "privacy.epsilon",
            f"the fixed releases alone spend epsilon {already:.4g} at delta {delta:g}, "
            f"at or above the target {target_epsilon:.4g}",
            "raise privacy.epsilon or charge fewer releases",
        )

    # the best order the last grid answer saw (the middle of the grid at first)
    best = len(RDP_ORDERS) // 2

    def meets_target(sigma: float) -> bool:
        nonlocal best
        step = GaussianStep(sigma, sample_rate, steps)
        # Every order's bound is valid on its own, so a few orders around the last optimum
        # that already meet the target prove that sigma does: the same answer as the whole
        # grid, at a tenth of its cost. Only a "no" must rule out every order (the optimum may
        # have moved): ``_meets_on_grid`` bounds blocks of orders from below first.
        near = slice(max(0, best - CALIBRATION_WINDOW), best + CALIBRATION_WINDOW + 1)
        orders = RDP_ORDERS[near]
        curve = fixed_curve[near] + _rdp_curve(step, orders)
        if _epsilon_from_curve(curve, delta, orders) <= target_epsilon:
            return True
        met, best = _meets_on_grid(step, fixed_curve, rest, delta, target_epsilon)
        return met

    return search_noise(
        meets_target,
        unreachable=SpecError(
            "privacy.epsilon",
            f"target {target_epsilon:.4g} at delta {delta:g} needs a noise multiplier "
            f"above {NOISE_CEILING:g} for {steps} steps at sample rate {sample_rate:.4g}",
            "raise privacy.epsilon, or train for fewer epochs / with a smaller batch",
        ),
    )


def _rest_of_epsilon(fixed_curve: np.ndarray, delta: float) -> np.ndarray:
    """Each order's epsilon less a step's RDP: the fixed curve plus Opacus's conversion terms."""
    grid = np.asarray(RDP_ORDERS)
    return fixed_curve - (np.log(delta) + np.log(grid)) / (grid - 1) + np.log((grid - 1) / grid)


def _meets_on_grid(
    step: GaussianStep, fixed_curve: np.ndarray, rest: np.ndarray, delta: float, target: float
) -> tuple[bool, int]:
    """The whole grid's answer to "does ``fixed + step`` meet the target at some order?",
    and the index of the best order seen. On a block of orders ``a..b`` the step's RDP is at
    least its value at ``a`` (it never decreases with the order) and ``rest`` is exact: a
    block whose lower bound clears the target is out; the others are computed order by order."""
    starts = list(range(0, len(RDP_ORDERS), CALIBRATION_BLOCK))
    at_start = _rdp_curve(step, [RDP_ORDERS[i] for i in starts])
    bar = target * (1 + _BLOCK_MARGIN) + _BLOCK_MARGIN
    best, best_eps = len(RDP_ORDERS) // 2, math.inf
    for start, first in zip(starts, at_start, strict=True):
        block = slice(start, min(start + CALIBRATION_BLOCK, len(RDP_ORDERS)))
        bound = float(first + rest[block].min())
        if math.isfinite(first) and bound > bar:
            if bound < best_eps:  # where the optimum probably is, for the next window
                best, best_eps = start + int(rest[block].argmin()), bound
            continue
        eps, at = _epsilon_and_order(
            fixed_curve[block] + _rdp_curve(step, RDP_ORDERS[block]), delta, RDP_ORDERS[block]
        )
        if eps <= target:
            return True, block.start + at
        if eps < best_eps:
            best, best_eps = block.start + at, eps
    return False, best


def search_noise(meets_target: Callable[[float], bool], *, unreachable: SpecError) -> float:
    """The smallest sigma in [NOISE_FLOOR, NOISE_CEILING], to
    :data:`CALIBRATION_RELATIVE_TOLERANCE` and rounded up, for which ``meets_target`` holds;
    ``unreachable`` is raised when not even the ceiling does.

    Bracket [lo, hi] with hi feasible and lo infeasible by doubling/halving from sigma = 1,
    then bisect geometrically (sigma spans orders of magnitude). Epsilon is decreasing in
    sigma, but the answer's safety does not rest on that: only a checked-feasible sigma is
    ever returned."""
    hi = 1.0
    while not meets_target(hi):
        if hi >= NOISE_CEILING:
            raise unreachable
        hi = min(2.0 * hi, NOISE_CEILING)
    lo = hi
    while hi > NOISE_FLOOR:
        lo = max(hi / 2.0, NOISE_FLOOR)
        if not meets_target(lo):
            break
        hi = lo
    if lo == hi:
        return hi  # the floor itself meets the target
    while hi - lo > CALIBRATION_RELATIVE_TOLERANCE * hi:
        mid = math.sqrt(lo * hi)
        if meets_target(mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class DPSGDPlan:
    """A DP-SGD run and its one DP evaluation release, calibrated together to a target.

    ``epsilon`` is the composed figure of both releases (training + evaluation) at ``delta``,
    from ``accountant``, for the ``neighbouring`` relation and privacy ``unit`` stated, by
    ``composition`` (``dpsgd_epsilon``); it is <= ``target_epsilon``."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    eval_sigma: float
    epsilon: float
    delta: float
    target_epsilon: float
    accountant: Accountant = Accountant.RDP
    composition: Composition = Composition.SEQUENTIAL
    # init=False: no caller can label a plan with a different relation or unit.
    neighbouring: str = field(default=NEIGHBOURING, init=False)
    unit: str = field(default=UNIT, init=False)

    @property
    def training_step(self) -> GaussianStep:
        return GaussianStep(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def eval_step(self) -> GaussianStep:
        """The evaluation histogram: sensitivity 1, everyone counted once, noise eval_sigma."""
        return GaussianStep(self.eval_sigma, 1.0, 1)

    def history(self) -> tuple[GaussianStep, GaussianStep]:
        return (self.training_step, self.eval_step)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accountant"] = self.accountant.value
        out["composition"] = self.composition.value
        return out


def dpsgd_epsilon(
    training: GaussianStep,
    evaluation: GaussianStep | None,
    delta: float,
    composition: Composition | str = Composition.SEQUENTIAL,
) -> float:
    """Epsilon at ``delta`` of a DP-SGD run and its evaluation release (None: none), composed
    as ``composition`` says: the one figure the plan, the worker's report and the charge use."""
    if evaluation is None:
        return epsilon_for([training], delta)
    if Composition(composition) is Composition.PARALLEL:
        return epsilon_parallel([[training], [evaluation]], delta)
    return epsilon_for([training, evaluation], delta)


def plan_dpsgd(
    target_epsilon: float,
    delta: float,
    n_persons: int,
    batch_size: int,
    epochs: int,
    *,
    eval_share: float = 0.1,
    composition: Composition = Composition.SEQUENTIAL,
) -> DPSGDPlan:
    """Calibrate DP-SGD noise for ``epochs`` over ``n_persons`` persons so that training plus
    one DP evaluation release compose to at most ``target_epsilon`` at ``delta``.

    Sequential: the evaluation release (a sensitivity-1 noisy histogram,
    ``GaussianStep(eval_sigma, 1, 1)``) gets noise such that it alone costs at most
    ``eval_share * target_epsilon``; the training noise is then calibrated with that release
    in ``fixed``. Because RDP composes more tightly than adding epsilons, training ends up
    with a little more than ``1 - eval_share`` of the target.

    Parallel (the evaluation's persons are not the training's, ``epsilon_parallel``): each
    is calibrated to the whole target on its own, and ``eval_share`` is not used."""
    _check_epsilon(target_epsilon)
    _check_delta(delta)
    if not (math.isfinite(eval_share) and 0 < eval_share < 1):
        raise SpecError("privacy.eval_share", "must be in (0, 1)", "use e.g. 0.1")
    sample_rate, steps_per_epoch, steps = dpsgd_schedule(n_persons, batch_size, epochs)
    if delta >= 1.0 / n_persons:
        # delta >= 1/n admits mechanisms that publish some person's record outright.
        raise SpecError(
            "privacy.delta",
            f"delta must be below 1/persons ({n_persons})",
            "use e.g. 1e-6",
        )
    composition = Composition(composition)
    if composition is Composition.PARALLEL:
        eval_sigma = calibrate_noise(target_epsilon, delta, 1.0, 1)
        sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps)
    else:
        eval_sigma = calibrate_noise(eval_share * target_epsilon, delta, 1.0, 1)
        sigma = calibrate_noise(
            target_epsilon, delta, sample_rate, steps, fixed=(GaussianStep(eval_sigma, 1.0, 1),)
        )
    epsilon = dpsgd_epsilon(
        GaussianStep(sigma, sample_rate, steps),
        GaussianStep(eval_sigma, 1.0, 1),
        delta,
        composition,
    )
    return DPSGDPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        eval_sigma=eval_sigma,
        epsilon=epsilon,
        delta=delta,
        target_epsilon=target_epsilon,
        composition=composition,
    )
