"""Per-row gradient clipping for DP-SGD: three exact backends, chosen per model.

``training.trainer.train_dpsgd`` asks ``choose_clipping`` which backend fits the model and
``make_clipper`` for it:

- ``Clipping.BOOK_KEEPING``: our book-keeping clipper (``training.fastdp``) for Sequential
  stacks of Linear layers and activations, the fast path;
- ``Clipping.OPACUS_GHOST``: Opacus ghost clipping (norms without per-sample gradients,
  then a second, reweighted backward pass);
- ``Clipping.OPACUS_HOOKS``: Opacus per-sample gradients for every parameter, where ghost
  clipping cannot apply (parameters shared between layers, or a layer called twice).

Opacus's per-sample gradient machinery is used here and nowhere else in the zone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from foundation.errors import SpecError
from training import fastdp
from training.dpsgd_config import Clipping


class Clipper(Protocol):
    """A clipping backend. Each returns (clipped sums for the trainable parameters in
    model.parameters() order, summed loss as a detached 0-d tensor) for a non-empty batch;
    close() leaves the model as it was given (no hooks, no attributes)."""

    kind: Clipping

    def __call__(
        self, X: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def close(self) -> None: ...


class GhostCannotApply(Exception):
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
            raise GhostCannotApply() from exc
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


def choose_clipping(model: nn.Module, forced: Clipping | None) -> Clipping:
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


def make_clipper(kind: Clipping, model: nn.Module, max_grad_norm: float) -> Clipper:
    backends: dict[Clipping, Callable[[nn.Module, float], Clipper]] = {
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
