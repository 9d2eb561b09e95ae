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

How a and g are had (measured on the benchmark's 40-256-256-1 MLP, 2 CPU threads): forward
hooks plus full backward hooks need a normal ``loss.backward()``, which also computes the
unclipped weight gradients we throw away (slowest, ~1.5x non-private); replaying the stack
and asking autograd only for the gradients of the layer outputs skips those (~1.3x); for
Linear/ReLU stacks (what ``build_model`` makes) we skip autograd's graph too and write the
backward out, two ops per layer (~1.2-1.3x on CPU, and the most on a GPU, where these
small kernels cost their launch). Other activations take the autograd route.

The formula holds only when every layer sees one row per sample and nothing mixes samples,
so ``supports`` accepts exactly: an ``nn.Linear``, or an ``nn.Sequential`` (nested allowed)
of ``nn.Linear`` and the parameter-free element-wise activations below, each Linear used
once, no shared or frozen parameters, no buffers. Exact types only: a subclass may override
``forward``. Anything else goes to Opacus (``training.clipping`` chooses).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from foundation.errors import SpecError

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
        # iterating the Sequential itself, not .children(): children() drops a module
        # registered twice, and then the stack we replay would skip its second call
        for child in cast(nn.Sequential, module):
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


def _check_bound(max_grad_norm: float) -> float:
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, int | float):
        raise SpecError("max_grad_norm", "must be a number")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise SpecError("max_grad_norm", "must be a finite number > 0")
    return float(max_grad_norm)


class BookKeepingClipper:
    """``clipped_step`` prepared for one model: the checks run once, then batch after batch.

    The model must not be restructured while the clipper is in use (its weights may change:
    that is what training does).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, max_grad_norm: float) -> None:
        why = _why_unsupported(model)
        leaves = _leaves(model)
        if why is not None or leaves is None:
            raise SpecError(
                "model", f"{why}: book-keeping clipping does not apply", "train it through Opacus"
            )
        reduction = getattr(loss_fn, "reduction", "sum")
        if reduction != "sum":
            # a mean would scale every g_i by 1/B and clip the wrong norm; 'none' is no scalar
            raise SpecError(
                "loss_fn.reduction",
                f"is {reduction!r}",
                "per-sample clipping needs reduction='sum'",
            )
        self._max_grad_norm = _check_bound(max_grad_norm)
        self._loss_fn = loss_fn
        self._leaves = leaves
        self._params = list(model.parameters())
        self._numels = [p.numel() for p in self._params]
        # where each Linear's weight and bias sit in model.parameters() order
        slot = {id(p): i for i, p in enumerate(self._params)}
        self._layers: list[tuple[nn.Linear, int, int | None]] = [
            (m, slot[id(m.weight)], None if m.bias is None else slot[id(m.bias)])
            for m in leaves
            if isinstance(m, nn.Linear)
        ]
        self._by_hand = all(type(m) in (nn.Linear, nn.ReLU, nn.Identity) for m in leaves)

    def _autograd_pass(
        self, X: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]:
        """Each Linear's input and output gradient, for any element-wise activation."""
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        with torch.enable_grad():
            h = X
            for m in self._leaves:
                if isinstance(m, nn.Linear):
                    inputs.append(h.detach())
                    # F.linear, not m(h): the same arithmetic without running hooks someone
                    # else registered on the layer (Opacus leaves its own on wrapped models)
                    h = F.linear(h, m.weight, m.bias)
                    outputs.append(h)
                else:
                    h = m(h)
            loss = self._loss(h, y)
            # Differentiating with respect to the layer outputs only: autograd then skips
            # the weight-gradient products (done once, clipped, by the caller).
            out_grads = torch.autograd.grad(loss, outputs)
        return inputs, out_grads, loss.detach()

    def _relu_pass(
        self, X: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...], torch.Tensor]:
        """The same for Linear/ReLU/Identity stacks (what build_model makes), by hand.

        The forward runs without autograd, and the backward is the two ops per layer that
        autograd would run (input-gradient product, ReLU mask); only the loss goes through
        autograd. Skipping the graph and the engine is most of the overhead per step on a
        GPU, where these small kernels cost their launch, not their arithmetic.
        """
        inputs: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        with torch.no_grad():
            h = X
            for m in self._leaves:
                if isinstance(m, nn.Linear):
                    inputs.append(h)
                    h = F.linear(h, m.weight, m.bias)
                elif isinstance(m, nn.ReLU):
                    h = torch.relu(h)
                outs.append(h)  # nn.Identity: unchanged
        with torch.enable_grad():
            top = h.detach().requires_grad_()
            loss = self._loss(top, y)
            (g,) = torch.autograd.grad(loss, top)
        out_grads: list[torch.Tensor] = []
        with torch.no_grad():
            for m, out in zip(reversed(self._leaves), reversed(outs), strict=True):
                if isinstance(m, nn.ReLU):
                    # autograd's own ReLU backward: g where the ReLU's output is > 0
                    g = torch.ops.aten.threshold_backward(g, out, 0.0)
                elif isinstance(m, nn.Linear):
                    out_grads.append(g)
                    if len(out_grads) == len(self._layers):
                        break  # the first Linear: nothing below it has parameters
                    g = g.mm(m.weight)
        out_grads.reverse()
        return inputs, tuple(out_grads), loss.detach()

    def _loss(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._loss_fn(h, y)
        if loss.dim() != 0:
            raise SpecError("loss_fn", "must return a scalar (the batch's summed loss)")
        return loss

    def __call__(self, X: torch.Tensor, y: torch.Tensor) -> ClippedSum:
        if X.dim() != 2:
            raise SpecError("X", "must be a 2-D [batch, features] tensor", "flatten the features")
        if y.shape[:1] != X.shape[:1]:
            raise SpecError("y", "must have one entry per row of X")
        first = self._params[0]
        batch = int(X.shape[0])
        # all sums in one flat buffer: one allocation, and callers can treat it as a vector;
        # every slot is written below unless the batch is empty
        alloc = torch.empty if batch else torch.zeros
        flat = alloc(sum(self._numels), dtype=first.dtype, device=first.device)
        grads = [v.view_as(p) for v, p in zip(flat.split(self._numels), self._params, strict=True)]
        if batch == 0:
            return ClippedSum(
                tuple(grads), torch.zeros((), dtype=first.dtype, device=first.device), 0
            )

        if self._by_hand:
            inputs, out_grads, loss = self._relu_pass(X, y)
        else:
            inputs, out_grads, loss = self._autograd_pass(X, y)

        with torch.no_grad():
            norm_sq: torch.Tensor | None = None
            for (_, _, bias_slot), a, g in zip(self._layers, inputs, out_grads, strict=True):
                # ||a_i|| ||g_i||, squared into the running sum by addcmul; vector_norm is one
                # fused reduction, faster here than (a * a).sum(1)
                g_norm = torch.linalg.vector_norm(g, dim=1)
                term = torch.linalg.vector_norm(a, dim=1).mul_(g_norm)
                if norm_sq is None:
                    norm_sq = term.square_()
                else:
                    norm_sq.addcmul_(term, term)
                if bias_slot is not None:
                    norm_sq.addcmul_(g_norm, g_norm)  # the bias is a weight on a constant 1
            if norm_sq is None:  # unreachable: supports() demands a Linear
                raise SpecError("model", "has no nn.Linear layer")
            clip = (
                norm_sq.sqrt_()
                .add_(CLIP_EPS)
                .reciprocal_()
                .mul_(self._max_grad_norm)
                .clamp_(max=1.0)
            )
            col = clip.unsqueeze(1)
            for (_, w_slot, bias_slot), a, g in zip(self._layers, inputs, out_grads, strict=True):
                # scale whichever side is narrower; the product is the same
                if a.shape[1] <= g.shape[1]:
                    torch.mm(g.t(), a * col, out=grads[w_slot])
                else:
                    torch.mm((g * col).t(), a, out=grads[w_slot])
                if bias_slot is not None:
                    torch.mv(g.t(), clip, out=grads[bias_slot])
        return ClippedSum(tuple(grads), loss.detach(), batch)


def clipped_step(
    model: nn.Module, loss_fn: LossFn, X: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> ClippedSum:
    """Each sample's gradient of ``loss_fn(model(X), y)`` clipped to ``max_grad_norm``, summed.

    ``loss_fn`` must return the batch's *summed* loss (e.g. ``nn.BCEWithLogitsLoss(
    reduction="sum")``), a sum of one term per row. The model's ``.grad`` fields are neither
    read nor written. An empty batch (Poisson sampling can draw none) gives zeros. For many
    batches on one model, build a ``BookKeepingClipper`` once instead.
    """
    return BookKeepingClipper(model, loss_fn, max_grad_norm)(X, y)


def clipped_grad_sum(
    model: nn.Module, loss_fn: LossFn, X: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> list[torch.Tensor]:
    """The clipped per-sample gradient sum, one tensor per parameter (``clipped_step``)."""
    return list(clipped_step(model, loss_fn, X, y, max_grad_norm).grads)
