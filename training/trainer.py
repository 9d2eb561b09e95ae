"""DP-SGD for binary classifiers on in-memory tensors: Poisson sampling and the loop.

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
   data drawn): the privatized gradient.
5. Applied by the config's optimizer (``cfg.optimizer``): a plain SGD step, or Adam/AdamW
   (``torch.optim``) with the privatized gradient placed in each parameter's ``.grad``. The
   optimizer sees nothing but the privatized gradients (its moments are functions of them
   alone), so whatever it does is post-processing and the epsilon is the accountant's for
   steps 1-3. A caller may pass its own ``torch.optim.Optimizer`` (``optimizer=``): FedProx
   keeps one across its one-step calls, and tests record what it is handed.

The privacy unit is the row: callers pass one row per person (``connectors.reader.load_split``
does). The run takes exactly ``cfg.steps`` steps, never more: the ledger charged for that
many, so no job overspends.

Randomness: the accountant's epsilon assumes the analyst cannot know which rows were drawn
nor the noise. A seed the analyst knows gives both away (replay the noise, subtract it, and
the clipped gradient sums are bare). So ``seed=None`` (the default) seeds sampling and noise
from the OS's cryptographic generator, and a fixed seed is for tests, benchmarks and a
steward's replay with a seed only the zone holds. torch's generators themselves are not
cryptographic and the noise is floating point (like Opacus outside its ``secure_mode``).

Each row's gradient is clipped by a backend of ``training.clipping``; the config and result
types are ``training.dpsgd_config``'s and scoring a trained model is ``training.scoring``'s.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from foundation.errors import SpecError
from training.clipping import GhostCannotApply, choose_clipping, make_clipper
from training.dpsgd_config import (
    ADAM_BETAS,
    ADAM_EPS,
    Clipping,
    Device,
    DPSGDConfig,
    EpochProgress,
    Optimizer,
    TrainResult,
)

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


def make_optimizer(params: list[torch.Tensor], cfg: DPSGDConfig) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``cfg`` names, over ``params`` (for Adam and AdamW the
    trainer builds one itself; FedProx builds one to keep across its one-step calls).

    Adam and AdamW use torch's fused kernels where the parameters' device has them (on a
    CPU ~0.13 ms a step for the benchmark's 77k-parameter MLP, against ~0.37 ms for the
    multi-tensor path), else the multi-tensor path."""
    if cfg.optimizer is Optimizer.SGD:
        return torch.optim.SGD(params, lr=cfg.lr, foreach=True)

    def build(**kernel: bool) -> torch.optim.Optimizer:
        if cfg.optimizer is Optimizer.ADAM:
            return torch.optim.Adam(params, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, **kernel)
        return torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=ADAM_BETAS,
            eps=ADAM_EPS,
            weight_decay=cfg.weight_decay,
            **kernel,
        )

    try:
        return build(fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return build(foreach=True)


def _check_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SpecError("optimizer", "must be a torch.optim.Optimizer", "or leave it unset")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) not in held for p in params):
        # a parameter the optimizer does not hold would never be updated
        raise SpecError(
            "optimizer", "does not hold every trainable parameter of the model", "build it on them"
        )


def train_dpsgd(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    cfg: DPSGDConfig,
    *,
    progress: Callable[[EpochProgress], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainResult:
    """Train ``model`` in place with DP-SGD on rows ``X`` (one per person) and 0/1 labels ``y``.

    The model is moved to ``cfg.device`` and left there, in training mode. Exactly
    ``cfg.steps`` steps are taken. ``progress`` is called once per epoch (``EpochProgress``).

    Each step's privatized gradient goes to ``cfg.optimizer`` (SGD in place, Adam/AdamW
    through ``torch.optim``), or to ``optimizer`` when given: a ``torch.optim.Optimizer``
    over the model's parameters (on ``cfg.device``), whose ``step()`` finds the privatized
    gradient in each parameter's ``.grad`` and which keeps its state across calls. The
    trainer sets ``.grad`` before each ``step()`` and clears it after.
    """
    if not isinstance(cfg, DPSGDConfig):
        raise SpecError("cfg", "must be a DPSGDConfig")
    device = _resolve_device(cfg.device)
    model.to(device)
    model.train()
    params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SpecError("model", "has no trainable parameters")
    if optimizer is not None:
        _check_optimizer(optimizer, params)
    elif cfg.optimizer is not Optimizer.SGD:
        optimizer = make_optimizer(params, cfg)
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

    kind = choose_clipping(model, cfg.clipping)
    clipper = make_clipper(kind, model, cfg.max_grad_norm)
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
                except GhostCannotApply:
                    if cfg.clipping is Clipping.OPACUS_GHOST:
                        raise SpecError(
                            "dpsgd.clipping",
                            "ghost clipping cannot handle this model (a layer is called twice)",
                            "leave clipping unset",
                        ) from None
                    # nothing from the refused attempt is used: same batch, other backend
                    clipper.close()
                    clipper = make_clipper(Clipping.OPACUS_HOOKS, model, cfg.max_grad_norm)
                    grads, loss = clipper(Xb, yb)
                epoch_loss += loss
                epoch_rows += batch
            with torch.no_grad():
                if optimizer is not None:
                    # noise once, then the average: the privatized gradient, all the
                    # optimizer is ever handed
                    if noise_std > 0:
                        noise.normal_(0.0, noise_std, generator=noise_gen)
                    if grads is None:  # empty batch: the noise is the whole gradient
                        grads = (
                            noise_views if noise_std > 0 else [torch.zeros_like(p) for p in params]
                        )
                    elif noise_std > 0:
                        torch._foreach_add_(grads, noise_views)
                    torch._foreach_mul_(grads, 1.0 / expected_batch)
                    _step(optimizer, params, grads)
                elif grads is None:  # plain SGD, empty batch: the noise is the whole update
                    if noise_std > 0:
                        noise.normal_(0.0, noise_std, generator=noise_gen)
                        torch._foreach_add_(params, noise_views, alpha=step_scale)
                else:  # plain SGD: the sum, its noise and the step in place
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
        optimizer=cfg.optimizer,
    )


def _step(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]
) -> None:
    """One ``optimizer.step()`` on the privatized gradient ``grads``, placed in ``.grad`` (and
    taken away after: nothing of it stays on the model)."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    try:
        optimizer.step()
    finally:
        for p in params:
            p.grad = None
