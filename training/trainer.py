"""DP-SGD for binary classifiers on in-memory tensors: the zone's one Opacus user.

One step, exactly as the accountant (``privacy.accountant``) models it:

1. Poisson sampling: every row joins the batch independently with probability
   ``sample_rate`` (an empty batch is a legal draw and gives a noise-only step).
2. Each row's gradient clipped to norm ``max_grad_norm`` (C) and summed. Three exact ways,
   chosen per model (``Clipping``): our book-keeping clipper for stacks of Linear layers
   (``training.fastdp``, the fast path); else Opacus ghost clipping; else Opacus per-sample
   gradients ("hooks") where ghost clipping cannot apply (parameters shared between layers
   or a layer called twice).
3. Gaussian noise N(0, (noise_multiplier * C)^2) added to every coordinate of the sum.
4. Divided by the *expected* batch size q*N (not the realised one, which depends on the
   data drawn) and applied as a plain SGD step.

The privacy unit is the row: callers pass one row per person (``connectors.reader.load_split``
does). The run takes exactly ``cfg.steps`` steps, never more: the ledger charged for that
many, so no job overspends.

Randomness: the accountant's epsilon assumes the analyst cannot know which rows were drawn
nor the noise. A seed the analyst knows gives both away (replay the noise, subtract it, and
the clipped gradient sums are bare). So ``seed=None`` (the default) seeds sampling and noise
from the OS's cryptographic generator, and a fixed seed is for tests, benchmarks and a
steward's replay with a seed only the zone holds. torch's generators themselves are not
cryptographic and the noise is floating point (like Opacus outside its ``secure_mode``).

Opacus's per-sample gradient machinery is used here and nowhere else in the zone.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from foundation.errors import SpecError
from training import fastdp

#: rows per forward pass in ``predict_proba``: bounds activation memory (64k rows x a
#: 4096-wide layer is 1 GiB of float32) while keeping per-call overhead negligible
PREDICT_BATCH_ROWS = 65_536


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"  # the current CUDA device; tensors, model and noise all live there


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


#: gaps drawn per round by the CPU sampler, beyond the expected batch: 8 standard
#: deviations and a margin, so a second round is needed with probability < 1e-15 (and is
#: still exact when it is)
_GAP_SIGMAS, _GAP_MARGIN = 8.0, 16


def _rows_by_uniforms(
    rows: int, sample_rate: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Row numbers kept by one float64 uniform per row: the plain way, used on GPUs, where
    N draws are one cheap kernel. float64 so that P(keep) is q to double precision (float32
    uniforms lie on a 2^-24 grid, which would round q)."""
    keep = torch.rand(rows, generator=generator, device=device, dtype=torch.float64) < sample_rate
    return keep.nonzero().squeeze(1)


def _rows_by_gaps(
    rows: int, sample_rate: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The same law from about q*N draws instead of N, used on CPUs.

    Between consecutive kept rows of independent Bernoulli(q) trials the gaps are
    independent Geometric(q) on {1, 2, ...}; so the running sums of geometric draws are
    the kept (1-based) row numbers, with exactly the distribution of one uniform per row.
    On a CPU the N uniform draws were nearly all of a batch's assembly (at q*N = 512 of
    50,000 rows: ~0.24 ms, 8-17% of a DP step; this takes ~0.05 ms).
    """
    mean = rows * sample_rate
    chunk = int(mean + _GAP_SIGMAS * math.sqrt(mean) + _GAP_MARGIN)
    parts: list[torch.Tensor] = []
    last = 0.0
    while last <= rows:  # until a position falls past the last row
        gaps = torch.empty(chunk, dtype=torch.float64, device=device)
        gaps.geometric_(sample_rate, generator=generator)
        positions = gaps.cumsum_(0).add_(last)  # integers, exact in float64 below 2^53
        parts.append(positions)
        last = float(positions[-1])
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[positions <= rows].long().sub_(1)


def poisson_batch(
    X: torch.Tensor, y: torch.Tensor, sample_rate: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (X, y) each kept independently with probability ``sample_rate`` (Poisson
    sampling, what the accountant assumes), gathered from the in-memory tensors at once.

    Two exact samplers of the same law, each the faster where it runs: one uniform per row
    on a GPU, geometric gaps on a CPU. ``generator`` lives on X's device.
    """
    rows = X.shape[0]
    if sample_rate >= 1.0:
        # every row; and the gap sampler's log1p(-q) would be -inf at q = 1
        idx = torch.arange(rows, device=X.device)
    elif X.device.type == "cpu":
        idx = _rows_by_gaps(rows, sample_rate, generator, X.device)
    else:
        idx = _rows_by_uniforms(rows, sample_rate, generator, X.device)
    return X.index_select(0, idx), y.index_select(0, idx)


# --- clipping backends ---------------------------------------------------------------------
# Each returns (clipped sums for the trainable parameters in model.parameters() order,
# summed loss as a detached 0-d tensor) for a non-empty batch; close() leaves the model as
# it was given (no hooks, no attributes).


class _Clipper(Protocol):
    kind: Clipping

    def __call__(
        self, X: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def close(self) -> None: ...


class _GhostCannotApply(Exception):
    """Raised inside the ghost backend when Opacus refuses the model mid-forward."""


@contextmanager
def _quiet_backward_hooks() -> Iterator[None]:
    # PyTorch warns on each Opacus backward that the full backward hooks fire although the
    # input needs no gradient; that is the expected case here (X is data), not a problem
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Full backward hook is firing", category=UserWarning
        )
        yield


def _bce_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y, reduction="sum")


class _BookKeeping:
    kind = Clipping.BOOK_KEEPING

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        self.clipper = fastdp.BookKeepingClipper(model, _bce_sum, max_grad_norm)

    def __call__(self, X: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = self.clipper(X, y)
        return list(out.grads), out.loss

    def close(self) -> None:
        pass


def _clear_opacus_traces(model: nn.Module) -> None:
    # Opacus's own cleanup removes its hooks and parameter attributes but leaves each
    # layer's (emptied) ``activations`` list and ``max_batch_len``; after a refused forward
    # the list still holds activations of private rows. Drop both.
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(module, attr):
                delattr(module, attr)


class _OpacusGhost:
    kind = Clipping.OPACUS_GHOST

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.gsm = GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="sum",
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )

    def __call__(self, X: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        try:
            out = self.gsm(X)
        except NotImplementedError as exc:  # Opacus: "Parameter tying is not supported ..."
            raise _GhostCannotApply() from exc
        per_row = F.binary_cross_entropy_with_logits(out, y, reduction="none").flatten(1).sum(1)
        for p in self.params:
            p.grad = None
        with _quiet_backward_hooks():
            # pass 1: the hooks compute every row's gradient norm (the weight .grad it
            # also leaves is the unclipped sum, discarded)
            per_row.sum().backward(retain_graph=True)
            coef = self.gsm.get_clipping_coef().detach()
            for p in self.params:
                p.grad = None
            # pass 2: the loss reweighted by each row's clip factor has the clipped sum as
            # its gradient; hooks off so pass 2 does not recompute norms
            self.gsm.disable_hooks()
            try:
                (per_row * coef).sum().backward()
            finally:
                self.gsm.enable_hooks()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return grads, per_row.detach().sum()

    def close(self) -> None:
        model = self.gsm.to_standard_module()
        _clear_opacus_traces(model)


class _OpacusHooks:
    kind = Clipping.OPACUS_HOOKS

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        from opacus import GradSampleModule

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def __call__(self, X: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        batch = X.shape[0]
        for p in self.params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
        loss = _bce_sum(self.gsm(X), y)
        with _quiet_backward_hooks():
            loss.backward()
        samples = [p.grad_sample.reshape(batch, -1) for p in self.params]  # type: ignore[attr-defined]
        norms = torch.stack([torch.linalg.vector_norm(s, dim=1) for s in samples]).norm(dim=0)
        clip = (self.max_grad_norm / (norms + fastdp.CLIP_EPS)).clamp(max=1.0)
        grads = [clip.matmul(s).view_as(p) for s, p in zip(samples, self.params, strict=True)]
        for p in self.params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
        return grads, loss.detach()

    def close(self) -> None:
        model = self.gsm.to_standard_module()
        _clear_opacus_traces(model)


def _shares_parameters(model: nn.Module) -> bool:
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                return True
            seen.add(id(p))
    return False


def _choose_clipping(model: nn.Module, forced: Clipping | None) -> Clipping:
    if forced is Clipping.BOOK_KEEPING and not fastdp.supports(model):
        raise SpecError(
            "dpsgd.clipping",
            "book-keeping applies only to Sequential stacks of Linear layers and activations",
            "leave clipping unset to use Opacus",
        )
    if forced is not None:
        return forced
    if fastdp.supports(model):
        return Clipping.BOOK_KEEPING
    if _shares_parameters(model):
        return Clipping.OPACUS_HOOKS  # ghost clipping refuses tied parameters
    return Clipping.OPACUS_GHOST


def _make_clipper(kind: Clipping, model: nn.Module, max_grad_norm: float) -> _Clipper:
    backends: dict[Clipping, Callable[[nn.Module, float], _Clipper]] = {
        Clipping.BOOK_KEEPING: _BookKeeping,
        Clipping.OPACUS_GHOST: _OpacusGhost,
        Clipping.OPACUS_HOOKS: _OpacusHooks,
    }
    try:
        return backends[kind](model, max_grad_norm)
    except NotImplementedError:
        # Opacus validates on wrapping: a trainable layer with buffers (BatchNorm)
        raise SpecError(
            "model",
            "has a layer DP-SGD cannot clip per sample (e.g. BatchNorm)",
            "use LayerNorm/GroupNorm or none",
        ) from None


# --- the training loop -----------------------------------------------------------------------


def _resolve_device(device: Device) -> torch.device:
    if device is Device.CUDA and not torch.cuda.is_available():
        raise SpecError("dpsgd.device", "CUDA is not available on this machine", "use device='cpu'")
    return torch.device(device.value)


def _generators(seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for sampling and for noise."""
    if seed is None:
        words = [secrets.randbits(64), secrets.randbits(64)]
    else:
        # two independent streams from one seed, so that tests can replay the batches of a
        # run with and without noise
        words = [int(w) for w in np.random.SeedSequence(seed).generate_state(2, dtype=np.uint64)]
    gens = []
    for word in words:
        gen = torch.Generator(device=device)
        gen.manual_seed(word)
        gens.append(gen)
    return gens[0], gens[1]


def _as_tensors(
    X: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.as_tensor(X)
    y = torch.as_tensor(y)
    if X.dim() < 2:
        raise SpecError("X", "must have one row per person and at least one feature column")
    rows = X.shape[0]
    if rows == 0:
        raise SpecError("X", "has no rows")
    if y.numel() != rows or y.shape[0] != rows:
        raise SpecError("y", "must hold one label per row of X")
    # labels as a [rows, 1] column to match the model's one logit
    return X.to(device=device, dtype=dtype), y.reshape(rows, 1).to(device=device, dtype=dtype)


def _check_model(model: nn.Module, X: torch.Tensor) -> None:
    if any(True for _ in model.buffers()):
        # buffers (BatchNorm's running statistics) are updated from raw rows in every
        # forward pass, without clipping or noise: an unprotected release of the data
        raise SpecError(
            "model", "has buffers (e.g. BatchNorm running statistics)", "use LayerNorm or none"
        )
    with torch.no_grad():
        out = model(X[:1])
    if out.dim() != 2 or out.shape[1] != 1:
        raise SpecError(
            "model", "must output one logit per row for binary classification", "use n_outputs=1"
        )


def train_dpsgd(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: DPSGDConfig,
    *,
    progress: Callable[[EpochProgress], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD on rows ``X`` (one per person) and 0/1 labels ``y``.

    The model is moved to ``cfg.device`` and left there, in training mode. Exactly
    ``cfg.steps`` steps are taken. ``progress`` is called once per epoch (``EpochProgress``).
    """
    if not isinstance(cfg, DPSGDConfig):
        raise SpecError("cfg", "must be a DPSGDConfig")
    device = _resolve_device(cfg.device)
    model.to(device)
    model.train()
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SpecError("model", "has no trainable parameters")
    X, y = _as_tensors(X, y, params[0].dtype, device)
    _check_model(model, X)

    rows = X.shape[0]
    q = cfg.sample_rate
    expected_batch = cfg.expected_batch_size if cfg.expected_batch_size is not None else q * rows
    steps_per_epoch = (
        cfg.steps_per_epoch if cfg.steps_per_epoch is not None else max(1, round(1 / q))
    )
    epochs = math.ceil(cfg.steps / steps_per_epoch)
    noise_std = cfg.noise_multiplier * cfg.max_grad_norm
    step_scale = -cfg.lr / expected_batch
    sample_gen, noise_gen = _generators(cfg.seed, device)
    # One buffer for all coordinates, refilled in place each step: a single kernel, and the
    # noise stream does not depend on how the parameters are split into tensors. The
    # multi-tensor (_foreach) adds are what torch.optim uses: one call for all parameters.
    noise = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
    noise_views = [
        v.view_as(p) for v, p in zip(noise.split([p.numel() for p in params]), params, strict=True)
    ]

    kind = _choose_clipping(model, cfg.clipping)
    clipper = _make_clipper(kind, model, cfg.max_grad_norm)
    started = time.perf_counter()
    epoch_loss = torch.zeros((), dtype=params[0].dtype, device=device)
    epoch_rows = 0
    last_loss = math.nan
    epochs_done = 0
    try:
        for step in range(1, cfg.steps + 1):
            Xb, yb = poisson_batch(X, y, q, sample_gen)
            batch = Xb.shape[0]
            grads: list[torch.Tensor] | None = None
            if batch:
                try:
                    grads, loss = clipper(Xb, yb)
                except _GhostCannotApply:
                    if cfg.clipping is Clipping.OPACUS_GHOST:
                        raise SpecError(
                            "dpsgd.clipping",
                            "ghost clipping cannot handle this model (a layer is called twice)",
                            "leave clipping unset",
                        ) from None
                    # nothing from the refused attempt is used: same batch, other backend
                    clipper.close()
                    clipper = _make_clipper(Clipping.OPACUS_HOOKS, model, cfg.max_grad_norm)
                    grads, loss = clipper(Xb, yb)
                epoch_loss += loss
                epoch_rows += batch
            with torch.no_grad():
                if grads is None:  # empty batch: the noise is the whole update
                    if noise_std > 0:
                        noise.normal_(0.0, noise_std, generator=noise_gen)
                        torch._foreach_add_(params, noise_views, alpha=step_scale)
                else:
                    if noise_std > 0:
                        noise.normal_(0.0, noise_std, generator=noise_gen)
                        torch._foreach_add_(grads, noise_views)
                    torch._foreach_add_(params, grads, alpha=step_scale)
            if step % steps_per_epoch == 0 or step == cfg.steps:
                epochs_done += 1
                last_loss = epoch_loss.item() / epoch_rows if epoch_rows else math.nan
                if progress is not None:
                    progress(EpochProgress(epochs_done, epochs, step, cfg.steps, last_loss))
                epoch_loss.zero_()
                epoch_rows = 0
    finally:
        clipper.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(
        steps_taken=cfg.steps,
        sample_rate=q,
        noise_multiplier=cfg.noise_multiplier,
        epochs_done=epochs_done,
        final_loss=last_loss,
        clipping=clipper.kind,
        device=device.type,
        seconds=time.perf_counter() - started,
    )


def predict_proba(model: nn.Module, X: torch.Tensor | np.ndarray) -> np.ndarray:
    """P(label = 1) for each row of ``X`` as a float64 array, on the model's device.

    Not a release by itself: scores on private rows go through ``privacy.dp_metrics``.
    """
    param = next(model.parameters(), None)
    if param is None:
        raise SpecError("model", "has no parameters")
    X = torch.as_tensor(X)
    was_training = model.training
    model.eval()
    parts: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, X.shape[0], PREDICT_BATCH_ROWS):
                chunk = X[start : start + PREDICT_BATCH_ROWS].to(
                    device=param.device, dtype=param.dtype
                )
                logits = model(chunk)
                if logits.dim() != 2 or logits.shape[1] != 1:
                    raise SpecError("model", "must output one logit per row", "use n_outputs=1")
                parts.append(torch.sigmoid(logits[:, 0]).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
