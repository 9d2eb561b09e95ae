"""The rule that picks DP-SGD hyperparameters nobody wrote: a prior, a small grid around it,
and how the search's scores choose among them (``docs/tuning.md``).

Pure functions of public numbers: the training split's size ``n`` the zone plans with (the
dataset's public count, or a fixed assumption when counts are private: never the exact
private count), epsilon, delta, the optimizer, and the values the spec did write. No data
goes in; the search (``sandbox.mechanisms.tuning``) trains each candidate on free data and
hands the scores back to :func:`choose`.

Where the rule comes from (the DP-SGD literature's recipes; ``docs/tuning.md`` says more):

* **Large batches, steps enough** (De et al. 2022, "Unlocking high-accuracy differentially
  private image classification through scale"; Ponomareva et al. 2023, "How to DP-fy ML").
  At a fixed epsilon, what the noise does to the averaged gradient is about the same for
  every batch size once the number of steps is fixed (Sander et al. 2023, "TAN without a
  burn: scaling laws of DP-SGD": the noise-to-batch ratio sigma/B at fixed steps), while a
  larger batch means a larger sigma (amplification by sampling works best there) and less
  sampling noise. So the rule fixes a number of steps (:data:`TARGET_STEPS`) and takes the
  batch large, ``8 sqrt(n)`` within ``[MIN_BATCH, n / MIN_STEPS_PER_EPOCH]``; the epochs
  follow (few on large tables, many on small ones). Measured on the demo cohort (800 and
  6,400 training persons, epsilon 1 and 3, MLP [64], Adam, 2 seeds): the best runs all made
  ~40 passes with batches of n/8 to n/3 (160-320 steps); 100-800 steps at 15-40 epochs were
  within ~0.02 AUROC of the best, 5 epochs lost 0.03-0.06 and 20-60 steps up to 0.1. On
  five public clinical tables of 345 to 5,200 training persons (``benchmarks/
  bench_utility.py``'s, features scaled by declared typical ranges, epsilon 1, 3 and 8, 3
  seeds) 600 steps beat 300 by 0.006 AUROC on average (0.02-0.04 on the smallest tables),
  so the rule aims at 600.
* **Clipping norm against the noise** (Ponomareva et al. 2023; Andrew et al. 2021,
  "Differentially private learning with adaptive clipping"; Li et al. 2022, "Large language
  models can be strong differentially private learners"). The noise is ``sigma C`` whatever
  the gradients: a C far above the per-person gradient norms adds noise and no signal, one
  far below turns every gradient into its direction alone, which biases the fit (each
  well-fitted person pulls as hard as a badly fitted one). Adam's step does not depend on
  C's scale, only on which gradients it clips, so the prior is 1.0 (about the median
  per-person norm of our models on features scaled to [0, 1], where adaptive clipping puts
  it; De et al.'s value) and the search tries 0.3 (most gradients clipped, towards Li et
  al.'s small norms). On the cohort, 0.1 lost 0.01-0.03 AUROC to 1.0 (0.17 for a logistic
  model on synthetic rows), so the grid does not go that low.
* **Adam's learning rate against the number of steps** (``training.dpsgd_config.DEFAULT_LR``
  was measured at 80-500 steps; long runs want less): ``0.01 sqrt(TARGET_STEPS / steps)``
  within ``[0.003, 0.1]`` (0.01 at 600 steps beat 0.03 by 0.01-0.07 AUROC on every one of
  the five tables above, and 0.003 on all but one; a logistic model, whose weights must
  grow larger to move its logits as far, starts from 0.03: :data:`ADAM_LR_LINEAR`), and a
  third and three times it. SGD's step is lr times a clipped mean of norm at most C, so its
  prior keeps ``lr C = 1`` (``DEFAULT_LR[SGD]`` at C = 1).
* **Choosing** (Papernot & Steinke 2022, "Hyperparameter tuning with Renyi differential
  privacy": tuning on the real rows is itself a release, so the scores come from free data
  only). The best AUROC wins unless the prior is within one standard error of it (the
  one-standard-error rule, Hastie, Tibshirani & Friedman, "The Elements of Statistical
  Learning", 7.10); when no candidate's AUROC is above chance by two standard errors (dummy
  data: its labels carry no signal), the free data says nothing and the prior is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from training.dpsgd_config import Optimizer

#: the steps the rule aims at (the epochs follow from the batch and n)
TARGET_STEPS = 600
#: the smallest batch the rule picks (a smaller table gets its whole split)
MIN_BATCH = 64
#: the batch is at most n / this: at least this many steps per epoch
MIN_STEPS_PER_EPOCH = 8
#: batch = BATCH_PER_ROOT_N * sqrt(n) before the bounds (so the batch is n / 8 up to
#: n = 4096 and grows as sqrt(n) beyond: large tables get large batches and few epochs)
BATCH_PER_ROOT_N = 8.0
#: the epochs the rule may pick
EPOCH_RANGE = (1, 100)
#: Adam's (and AdamW's) learning rate at TARGET_STEPS, and its bounds
ADAM_LR, ADAM_LR_RANGE = 0.01, (0.003, 0.1)
#: ... for a linear model (logistic: no hidden layer), which needs larger weights to move its
#: logits as far: at 600 steps, 0.03 beat 0.01 by 0.045 AUROC on the demo cohort (features
#: scaled by their domains) and tied it (within 0.02) on three public tables with typical
#: ranges, where an MLP [64, 64] lost 0.06-0.07 at 0.03 on the cohort
ADAM_LR_LINEAR = 0.03
#: the prior clipping norm and the other value the search tries
CLIP_PRIOR, CLIP_SMALL = 1.0, 0.3
#: SGD's prior keeps lr * C at this (``DEFAULT_LR[SGD]`` was measured at C = 1)
SGD_LR_TIMES_CLIP = 1.0
#: the largest learning rate a spec may hold (``training.lr``'s bound)
LR_MAX = 100.0
#: the factor between a learning rate the grid tries and the prior
LR_FACTOR = 3.0
#: a candidate "learned" on the free data when its AUROC is this many SEs above 0.5
LEARNED_SES = 2.0

#: the hyperparameters the rule knows, by their spec field names
FIELDS = ("training.lr", "training.epochs", "training.batch_size", "privacy.max_grad_norm")


@dataclass(frozen=True)
class Hyper:
    """One candidate: the four hyperparameters, every one a value."""

    lr: float
    epochs: int
    batch_size: int
    max_grad_norm: float

    def value(self, field: str) -> float | int:
        value: float | int = getattr(self, field.split(".")[1])
        return value

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def steps_of(n: int, batch_size: int, epochs: int) -> int:
    """The accountant's steps for this schedule (``privacy.accountant.dpsgd_schedule``)."""
    return math.ceil(n / batch_size) * epochs


def prior_batch(n: int) -> int:
    """Large: ``8 sqrt(n)``, at least ``MIN_BATCH`` and at most ``n / MIN_STEPS_PER_EPOCH``
    (never above n)."""
    b = round(BATCH_PER_ROOT_N * math.sqrt(n))
    b = min(b, n // MIN_STEPS_PER_EPOCH)
    return max(1, min(n, max(b, MIN_BATCH)))


def prior_epochs(n: int, batch_size: int) -> int:
    """The epochs that reach about ``TARGET_STEPS`` steps at this batch."""
    per_epoch = math.ceil(n / batch_size)
    lo, hi = EPOCH_RANGE
    return max(lo, min(hi, round(TARGET_STEPS / per_epoch)))


def prior_lr(
    optimizer: Optimizer, steps: int, max_grad_norm: float, *, linear: bool = False
) -> float:
    """Adam/AdamW: ``ADAM_LR sqrt(TARGET_STEPS / steps)`` (``ADAM_LR_LINEAR`` for a
    ``linear`` model) within ``ADAM_LR_RANGE``; SGD: ``SGD_LR_TIMES_CLIP / C``. Rounded to 2
    significant digits (a value a person writes)."""
    if optimizer is Optimizer.SGD:
        return _round2(SGD_LR_TIMES_CLIP / max_grad_norm)
    lo, hi = ADAM_LR_RANGE
    base = ADAM_LR_LINEAR if linear else ADAM_LR
    return _round2(max(lo, min(hi, base * math.sqrt(TARGET_STEPS / max(steps, 1)))))


def _round2(x: float) -> float:
    """A learning rate as a person writes it: 2 significant digits, within the spec's bound."""
    return float(f"{min(x, LR_MAX):.2g}")


def prior(
    n: int,
    optimizer: Optimizer,
    written: Mapping[str, float | int] | None = None,
    *,
    linear: bool = False,
) -> Hyper:
    """The rule's own choice for the fields not in ``written`` (spec field name -> value the
    spec wrote); the written ones are kept as they are. ``linear``: the model has no hidden
    layer (its learning rate's prior is ``ADAM_LR_LINEAR``)."""
    w = dict(written or {})
    batch = int(w.get("training.batch_size", prior_batch(n)))
    epochs = int(w.get("training.epochs", prior_epochs(n, min(batch, n))))
    clip = float(w.get("privacy.max_grad_norm", CLIP_PRIOR))
    steps = steps_of(n, min(batch, n), epochs)
    lr = float(w.get("training.lr", prior_lr(optimizer, steps, clip, linear=linear)))
    return Hyper(lr=lr, epochs=epochs, batch_size=batch, max_grad_norm=clip)


@dataclass(frozen=True)
class Candidate:
    """A grid point: its hyperparameters and the field it moves from the prior ("" for the
    prior itself, "combined" for the search's last candidate)."""

    hyper: Hyper
    moves: str = ""


def candidates(
    n: int,
    optimizer: Optimizer,
    auto: Sequence[str],
    written: Mapping[str, float | int] | None = None,
    *,
    linear: bool = False,
) -> tuple[Candidate, ...]:
    """The prior first, then one change at a time along each field in ``auto``: half and
    twice the epochs (or, when the epochs are written, half and twice the batch; a learning
    rate the rule picks follows the candidate's steps), the small clipping norm, a third and
    three times the learning rate. Duplicates and batches above n are left out; the written
    fields never move. At most 6 candidates."""
    unknown = sorted(set(auto) - set(FIELDS))
    if unknown:
        raise ValueError(f"not a hyperparameter the rule knows: {unknown[0]}")
    w = {k: v for k, v in (written or {}).items() if k not in auto}
    base = prior(n, optimizer, w, linear=linear)
    out = [Candidate(base)]

    def add(h: Hyper, moves: str) -> None:
        if 1 <= h.batch_size <= n and h not in [c.hyper for c in out]:
            out.append(Candidate(h, moves))

    if "training.batch_size" in auto and "training.epochs" not in auto:
        # the batch is the schedule's lever only when the epochs are written: with both
        # free, the batch stays large and the epochs move (Ponomareva et al. 2023's order;
        # on the cohort, batches of n/20 to n/3 at the same epochs were within ~0.01)
        for b in (base.batch_size // 2, base.batch_size * 2):
            h = replace(base, batch_size=max(1, min(n, b)))
            add(_follow(h, n, optimizer, auto, linear=linear), "training.batch_size")
    if "training.epochs" in auto:
        lo, hi = EPOCH_RANGE
        for e in (max(lo, base.epochs // 2), min(hi, base.epochs * 2)):
            add(
                _follow(replace(base, epochs=e), n, optimizer, auto, linear=linear),
                "training.epochs",
            )
    if "privacy.max_grad_norm" in auto:
        h = replace(base, max_grad_norm=CLIP_SMALL)
        add(_follow(h, n, optimizer, auto, linear=linear), "privacy.max_grad_norm")
    if "training.lr" in auto:
        for f in (1 / LR_FACTOR, LR_FACTOR):
            add(replace(base, lr=_round2(base.lr * f)), "training.lr")
    return tuple(out)


def _follow(
    h: Hyper, n: int, optimizer: Optimizer, auto: Sequence[str], *, linear: bool = False
) -> Hyper:
    """A learning rate the rule picks follows the candidate's steps and clipping norm."""
    if "training.lr" not in auto:
        return h
    steps = steps_of(n, h.batch_size, h.epochs)
    return replace(h, lr=prior_lr(optimizer, steps, h.max_grad_norm, linear=linear))


def combined(
    grid: Sequence[Candidate],
    scores: Sequence[float | None],
    n: int,
    optimizer: Optimizer,
    auto: Sequence[str],
    *,
    linear: bool = False,
) -> Hyper:
    """Each moved field at its best-scoring move where that move beat the prior, else at the
    prior's value; a learning rate the rule picks follows the result's steps, times the
    best learning-rate move's factor: the one candidate the search adds after the grid."""
    base = grid[0].hyper
    top: dict[str, tuple[float, Hyper]] = {}
    for c, s in zip(grid[1:], scores[1:], strict=True):
        if s is None or (scores[0] is not None and s <= scores[0]):
            continue
        if c.moves not in top or s > top[c.moves][0]:
            top[c.moves] = (s, c.hyper)
    h = base
    for f in ("training.batch_size", "training.epochs", "privacy.max_grad_norm"):
        if f in top:
            key = f.split(".")[1]
            h = replace(h, **{key: getattr(top[f][1], key)})
    h = _follow(h, n, optimizer, auto, linear=linear)
    if "training.lr" in top:
        h = replace(h, lr=_round2(h.lr * top["training.lr"][1].lr / base.lr))
    return h


def auroc_se(auroc: float, positives: int, negatives: int) -> float:
    """The AUROC's standard error (Hanley & McNeil 1982)."""
    if positives < 1 or negatives < 1:
        return math.inf
    a = min(max(auroc, 1e-9), 1 - 1e-9)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    return math.sqrt(max(var, 0.0))


@dataclass(frozen=True)
class Choice:
    index: int
    #: why: "best", "prior within one SE of the best", "no signal in the free data"
    reason: str


def learned(scores: Sequence[float | None], ses: Sequence[float]) -> bool:
    """Some candidate's AUROC is above chance by ``LEARNED_SES`` standard errors: the free
    rows carry the label's signal (dummy rows never do)."""
    return any(
        s is not None and s - LEARNED_SES * se > 0.5 for s, se in zip(scores, ses, strict=True)
    )


def choose(scores: Sequence[float | None], ses: Sequence[float]) -> Choice:
    """Which candidate wins (index 0 is the prior; see the module docstring)."""
    scored = [
        (i, s, se) for i, (s, se) in enumerate(zip(scores, ses, strict=True)) if s is not None
    ]
    if not learned(scores, ses):
        return Choice(0, "no candidate beat chance on the free data: the rule's prior is kept")
    i, best, se = max(scored, key=lambda t: (t[1], -t[0]))
    first = scores[0]
    if i != 0 and first is not None and first >= best - se:
        return Choice(0, "the prior is within one standard error of the best: the prior is kept")
    return Choice(i, "the best AUROC on the free data")
