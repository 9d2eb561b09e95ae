"""The model families a DP-SGD job may train, and how they are built.

Only ``nn.Linear`` layers and ReLU: every layer treats each sample on its own, which is
what per-sample clipping assumes. No BatchNorm (its running statistics mix samples and
are themselves an unnoised release of the data), no dropout (its randomness would come
from the global generator and break a seed's reproducibility).

``build_model`` draws the initial weights from its own generator seeded by ``seed``: the
same config and seed give bit-identical weights, and the global torch RNG is neither read
nor advanced.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from foundation.errors import SpecError
from training.model_config import MAX_HIDDEN, ModelConfig, ModelKind

__all__ = ["MAX_HIDDEN", "ModelConfig", "ModelKind", "build_model"]


def _check_count(field: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(field, "must be a whole number >= 1")


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    # The same distribution as torch's default Linear init (kaiming_uniform with a=sqrt(5)
    # gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias uses the same bound), drawn from
    # our generator so the global RNG stays untouched.
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=gen)


def build_model(cfg: ModelConfig, n_inputs: int, n_outputs: int = 1, *, seed: int) -> nn.Module:
    """Build ``cfg``'s network for ``n_inputs`` features and ``n_outputs`` logits on the CPU.

    Always an ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` (the shape the book-keeping
    clipper in ``training.fastdp`` accepts); ``state_dict`` keys are ``"0.weight"``, ...
    """
    if not isinstance(cfg, ModelConfig):
        raise SpecError("model", "must be a ModelConfig")
    _check_count("n_inputs", n_inputs)
    _check_count("n_outputs", n_outputs)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SpecError("seed", "must be a whole number")

    widths = (n_inputs, *cfg.hidden, n_outputs)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        # built on the meta device so construction draws nothing from the global RNG
        layers.append(nn.Linear(fan_in, fan_out, device="meta"))
        if i < len(widths) - 2:
            # not in-place: the book-keeping clipper keeps each Linear's output for backward
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to_empty(device="cpu")

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            _init_linear(layer, gen)
    return model
