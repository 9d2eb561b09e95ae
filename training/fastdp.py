"""Book-keeping per-sample clipping for stacks of ``nn.Linear`` layers.

DP-SGD bounds each person's influence on a step by clipping that person's gradient to norm
C before summing. Materialising per-sample gradients costs batch x parameters memory and
time; for Linear layers it is not needed:

    a Linear layer z = a W^T + b, with sample i's input a_i and output gradient g_i = dL/dz_i
    (the loss is a *sum* over samples, so g_i depends on sample i alone), has per-sample
    weight gradient g_i a_i^T, a rank-one matrix whose squared norm is
    ||a_i||^2 ||g_i||^2, and per-sample bias gradient g_i.

So one forward pass (keeping each layer's a) and one backward pass to the layer outputs
(giving each layer's g, and skipping the weight gradients) yield every sample's total
norm ||grad_i||^2 = sum over layers of (||a_i||^2 + 1) ||g_i||^2. With the clip factors
c_i = min(1, C / (||grad_i|| + 1e-6)) (Opacus's formula), the clipped sum per layer is
one matrix product, sum_i c_i g_i a_i^T = (c * g)^T a, and the bias sum is g^T c.
Total cost: the non-private forward and backward plus two row norms and one scaling per
layer, and no batch x parameters tensor anywhere.

The formula holds only when every layer sees one row per sample and nothing mixes samples,
so ``supports`` accepts exactly: an ``nn.Linear``, or an ``nn.Sequential`` (nested allowed)
of ``nn.Linear`` and the parameter-free element-wise activations below, each Linear used
once, no shared or frozen parameters, no buffers. Exact types only: a subclass may override
``forward``. Anything else goes to Opacus (``training.trainer`` chooses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from connectors.errors import SpecError

#: activations that act on each element alone, so each sample's row stays its own; exact
#: types, and never in-place (see ``_in_place``)
_ELEMENTWISE: frozenset[type[nn.Module]] = frozenset(
    {nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity}
)

#: added to the norm before dividing, as Opacus does, so a zero gradient gives c = 1, not nan
CLIP_EPS = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClippedSum:
    """One batch's clipped gradient sum, before noise."""

    #: sum over the batch of each sample's gradient clipped to max_grad_norm; one tensor per
    #: parameter, in ``model.parameters()`` order
    grads: tuple[torch.Tensor, ...]
    #: the batch's summed loss (0-d, detached). Computed from raw rows without noise: not a
    #: DP release; keep it inside the zone
    loss: torch.Tensor
    batch_size: int


def _leaves(module: nn.Module) -> list[nn.Module] | None:
    """The modules a call of ``module`` applies, in order; None if it is not a plain stack."""
    kind = type(module)
    if kind is nn.Sequential:
        out: list[nn.Module] = []
        for child in module:
            sub = _leaves(child)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if kind is nn.Linear or kind in _ELEMENTWISE:
        return [module]
    return None


def _in_place(module: nn.Module) -> bool:
    # an in-place activation overwrites the Linear output we differentiate against, and
    # autograd would then hand back the gradient of the activation's output instead
    return bool(getattr(module, "inplace", False))


def _why_unsupported(model: nn.Module) -> str | None:
    leaves = _leaves(model)
    if leaves is None:
        return "holds a layer other than nn.Linear and element-wise activations"
    linears = [m for m in leaves if type(m) is nn.Linear]
    if not linears:
        return "has no nn.Linear layer"
    if len({id(m) for m in linears}) != len(linears):
        return "uses the same nn.Linear twice"
    if any(_in_place(m) for m in leaves):
        return "has an in-place activation"
    from_layers = [p for m in linears for p in m.parameters()]
    if len({id(p) for p in from_layers}) != len(from_layers):
        return "shares a parameter between layers"
    if any(not p.requires_grad for p in from_layers):
        return "has a frozen parameter"
    if any(True for _ in model.buffers()):
        return "has buffers"
    return None


def supports(model: nn.Module) -> bool:
    """True if ``clipped_grad_sum`` computes ``model``'s exact clipped gradient sum."""
    return _why_unsupported(model) is None


def _check_inputs(
    model: nn.Module, loss_fn: LossFn, X: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> list[nn.Module]:
    why = _why_unsupported(model)
    if why is not None:
        raise SpecError("model", f"{why}: book-keeping clipping does not apply", "train it through Opacus")
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, int | float):
        raise SpecError("max_grad_norm", "must be a number")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise SpecError("max_grad_norm", "must be a finite number > 0")
    reduction = getattr(loss_fn, "reduction", "sum")
    if reduction != "sum":
        # a mean would scale every g_i by 1/B and clip the wrong norm; 'none' is not a scalar
        raise SpecError("loss_fn.reduction", f"is {reduction!r}", "per-sample clipping needs reduction='sum'")
    if X.dim() != 2:
        raise SpecError("X", "must be a 2-D [batch, features] tensor", "flatten the features")
    if y.shape[:1] != X.shape[:1]:
        raise SpecError("y", "must have one entry per row of X")
    return _leaves(model) or []  # never empty here: _why_unsupported found a Linear


def clipped_step(
    model: nn.Module, loss_fn: LossFn, X: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> ClippedSum:
    """Each sample's gradient of ``loss_fn(model(X), y)`` clipped to ``max_grad_norm``, summed.

    ``loss_fn`` must return the batch's *summed* loss (e.g. ``nn.BCEWithLogitsLoss(
    reduction="sum")``), a sum of one term per row. The model's ``.grad`` fields are neither
    read nor written. An empty batch (Poisson sampling can draw none) gives zeros.
    """
    leaves = _check_inputs(model, loss_fn, X, y, max_grad_norm)
    params = list(model.parameters())
    batch = int(X.shape[0])
    if batch == 0:
        zeros = tuple(torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params)
        return ClippedSum(zeros, torch.zeros((), dtype=X.dtype, device=X.device), 0)

    linears: list[nn.Linear] = []
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    with torch.enable_grad():
        h = X
        for m in leaves:
            if type(m) is nn.Linear:
                linears.append(m)  # type: ignore[arg-type]
                inputs.append(h.detach())
                # F.linear, not m(h): the same arithmetic without running hooks someone
                # else registered on the layer (Opacus leaves its own on wrapped models)
                h = F.linear(h, m.weight, m.bias)
                outputs.append(h)
            else:
                h = m(h)
        loss = loss_fn(h, y)
        if loss.dim() != 0:
            raise SpecError("loss_fn", "must return a scalar (the batch's summed loss)")
        # Differentiating with respect to the layer outputs only: autograd then skips the
        # weight-gradient products (we do them once, clipped) and the AccumulateGrad nodes.
        out_grads = torch.autograd.grad(loss, outputs)

    with torch.no_grad():
        norm_sq = torch.zeros(batch, dtype=out_grads[0].dtype, device=out_grads[0].device)
        for layer, a, g in zip(linears, inputs, out_grads, strict=True):
            # vector_norm(...)^2 is one fused reduction, faster here than (a * a).sum(1)
            a_sq = torch.linalg.vector_norm(a, dim=1).square_()
            if layer.bias is not None:
                a_sq.add_(1.0)  # the bias is a weight on a constant input 1
            term = a_sq.mul_(torch.linalg.vector_norm(g, dim=1).square_())
            norm_sq.add_(term)
        clip = norm_sq.sqrt_().add_(CLIP_EPS).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)

        by_param: dict[int, torch.Tensor] = {}
        for layer, a, g in zip(linears, inputs, out_grads, strict=True):
            col = clip.unsqueeze(1)
            # scale whichever side is narrower; the product is the same
            if a.shape[1] <= g.shape[1]:
                w = g.t().mm(a * col)
            else:
                w = (g * col).t().mm(a)
            by_param[id(layer.weight)] = w
            if layer.bias is not None:
                by_param[id(layer.bias)] = g.t().mv(clip)
    return ClippedSum(tuple(by_param[id(p)] for p in params), loss.detach(), batch)


def clipped_grad_sum(
    model: nn.Module, loss_fn: LossFn, X: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> list[torch.Tensor]:
    """The clipped per-sample gradient sum, one tensor per parameter (``clipped_step``)."""
    return list(clipped_step(model, loss_fn, X, y, max_grad_norm).grads)
