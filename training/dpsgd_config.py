"""The values of a DP-SGD run: its config, its progress reports and its result.

``DPSGDConfig`` carries the accountant's plan (``sample_rate``, ``steps``,
``noise_multiplier``) and the run's settings; ``training.trainer.train_dpsgd`` takes one and
returns a ``TrainResult``, reporting an ``EpochProgress`` once per epoch. ``Device`` and
``Clipping`` are the choices a config can name (``training.clipping`` holds the clipping
backends themselves). Validation errors name ``dpsgd.<field>``.

``Optimizer`` is what the trainer does with the privatized gradient (the clipped sum plus
its Gaussian noise, divided by the expected batch): a plain SGD step, or Adam / AdamW on it.
Whatever it is, it only post-processes that gradient, so it does not change epsilon; the
job spec's default is Adam (``DEFAULT_LR`` has each optimizer's default learning rate),
while ``DPSGDConfig``'s is SGD so that a caller's ``lr`` keeps its meaning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from foundation.errors import SpecError


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"  # the current CUDA device; tensors, model and noise all live there


class Optimizer(StrEnum):
    """The update rule applied to each step's privatized gradient (post-processing)."""

    #: w <- w - lr * g: the step the accountant's literature writes; its utility hangs on lr
    SGD = "sgd"
    #: Adam (Kingma & Ba) on the noisy gradient (DP-Adam): per-coordinate steps of about lr,
    #: normalised by the (noise-dominated) second moment, so the lr that suits it does not
    #: hang on the scale of the gradient, the features or the clipping norm
    ADAM = "adam"
    #: AdamW: Adam with decoupled weight decay (``weight_decay``)
    ADAMW = "adamw"


#: the learning rate a job spec gets for each optimizer when it writes none. Adam's step is
#: about lr per coordinate whatever the gradient's scale (under DP noise it is close to
#: sign-like), so what suits it depends on the number of steps more than on the features'
#: scale; SGD's step is lr times the averaged clipped gradient (at most max_grad_norm in norm).
#: Measured on synthetic tabular tasks and the demo cohort (features in [0, 1] as the
#: contract scales them; logistic and MLPs [16] to [64, 64]; epsilon 1-3; 80-500 steps):
#: Adam at 0.03 was within ~0.025 AUROC of the best of 0.003-0.1 on each, where 0.01 lost up
#: to 0.28 on a disc-shaped boundary at 320 steps (too little travel) and 0.1 fell apart at
#: epsilon 1. Long runs want less: at 3,000 steps 0.003 beat 0.03 by 0.08 (write lr then).
#: SGD at 1.0 was within ~0.02 of the best of 0.05-2.0 (0.05, a usual first guess, lost
#: 0.05-0.2).
DEFAULT_LR: dict[Optimizer, float] = {
    Optimizer.SGD: 1.0,
    Optimizer.ADAM: 0.03,
    Optimizer.ADAMW: 0.03,
}
#: AdamW's decoupled weight decay when the spec writes none
DEFAULT_WEIGHT_DECAY = 0.01
#: Adam's moment decay rates and its epsilon (torch's defaults, the paper's)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Clipping(StrEnum):
    #: training.fastdp: per-sample norms from layer inputs and output gradients, one
    #: clipped matrix product per layer; Sequential stacks of Linear + activations
    BOOK_KEEPING = "book-keeping"
    #: Opacus ghost clipping (norms without per-sample gradients for Linear/Embedding,
    #: per-sample gradients for other layers), then a second, reweighted backward pass
    OPACUS_GHOST = "opacus-ghost"
    #: Opacus per-sample gradients for every parameter, clipped and summed here; handles
    #: shared parameters and layers called more than once
    OPACUS_HOOKS = "opacus-hooks"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class DPSGDConfig:
    """One DP-SGD run. ``sample_rate``, ``steps`` and ``noise_multiplier`` come from the
    accountant's plan; changing any of them changes the epsilon spent."""

    #: q: each row's probability of joining a step's batch, in (0, 1]
    sample_rate: float
    #: steps to take, exactly (>= 1)
    steps: int
    lr: float
    #: C: each row's gradient is clipped to this L2 norm (> 0)
    max_grad_norm: float
    #: noise standard deviation as a multiple of C (>= 0; 0 is not private)
    noise_multiplier: float
    #: None: sampling and noise seeded from the OS's cryptographic generator (jobs). An
    #: int (>= 0) makes the run reproducible; never one the analyst chose or can see.
    seed: int | None = None
    device: Device = Device.CPU
    #: steps between progress reports; None: round(1 / sample_rate), one expected pass
    steps_per_epoch: int | None = None
    #: the divisor of the noisy sum; None: sample_rate * rows. Post-processing only: it
    #: does not change epsilon
    expected_batch_size: float | None = None
    #: None: the fastest exact way for the model (book-keeping, else ghost, else hooks)
    clipping: Clipping | None = None
    #: the update rule applied to the privatized gradient (post-processing: no privacy cost)
    optimizer: Optimizer = Optimizer.SGD
    #: AdamW's decoupled weight decay (>= 0); must be 0 for the other optimizers
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not _is_number(self.sample_rate) or not 0 < self.sample_rate <= 1:
            raise SpecError("dpsgd.sample_rate", "must be a number in (0, 1]")
        if not _is_int(self.steps) or self.steps < 1:
            raise SpecError("dpsgd.steps", "must be a whole number >= 1")
        if not _is_number(self.lr) or self.lr <= 0:
            raise SpecError("dpsgd.lr", "must be a finite number > 0")
        if not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0:
            raise SpecError("dpsgd.max_grad_norm", "must be a finite number > 0")
        if not _is_number(self.noise_multiplier) or self.noise_multiplier < 0:
            raise SpecError("dpsgd.noise_multiplier", "must be a finite number >= 0")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise SpecError("dpsgd.seed", "must be a whole number >= 0, or None")
        try:
            object.__setattr__(self, "device", Device(self.device))
        except ValueError:
            raise SpecError(
                "dpsgd.device", "is not a known device", "use 'cpu' or 'cuda'"
            ) from None
        if self.steps_per_epoch is not None and (
            not _is_int(self.steps_per_epoch) or self.steps_per_epoch < 1
        ):
            raise SpecError("dpsgd.steps_per_epoch", "must be a whole number >= 1, or None")
        if self.expected_batch_size is not None and (
            not _is_number(self.expected_batch_size) or self.expected_batch_size <= 0
        ):
            raise SpecError("dpsgd.expected_batch_size", "must be a finite number > 0, or None")
        if self.clipping is not None:
            try:
                object.__setattr__(self, "clipping", Clipping(self.clipping))
            except ValueError:
                raise SpecError(
                    "dpsgd.clipping",
                    "is not a known clipping method",
                    f"use one of: {', '.join(c.value for c in Clipping)}, or None",
                ) from None
        try:
            object.__setattr__(self, "optimizer", Optimizer(self.optimizer))
        except ValueError:
            raise SpecError(
                "dpsgd.optimizer",
                "is not a known optimizer",
                f"use one of: {', '.join(o.value for o in Optimizer)}",
            ) from None
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise SpecError("dpsgd.weight_decay", "must be a finite number >= 0")
        if self.weight_decay and self.optimizer is not Optimizer.ADAMW:
            raise SpecError(
                "dpsgd.weight_decay", "is only used with optimizer adamw", "set it to 0"
            )


@dataclass(frozen=True)
class EpochProgress:
    """Reported once per epoch. ``loss`` is the mean training loss over the rows drawn in
    the epoch, computed from raw rows without noise: not a DP release. Show it inside the
    zone only (a steward's view), never to the analyst."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps done so far
    steps: int
    loss: float  # nan if the epoch drew no rows


@dataclass(frozen=True)
class TrainResult:
    steps_taken: int
    sample_rate: float
    noise_multiplier: float
    #: epochs reported; the last may be partial when steps_per_epoch does not divide steps
    epochs_done: int
    #: the last epoch's mean loss: not a DP release (see EpochProgress)
    final_loss: float
    clipping: Clipping
    device: str
    seconds: float
    #: the update rule the config names (``train_dpsgd``'s ``optimizer=``, when a caller
    #: passes its own, is not named here)
    optimizer: Optimizer = Optimizer.SGD
