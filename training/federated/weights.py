"""Model weights as plain numpy: aggregation in a fixed order, client-level DP, saving.

The simulation's ServerApp and the in-process reference loop both aggregate with these
functions, so the same local models give bit-identical global weights in both.

Why a fixed order: floating-point addition is not associative, and Flower hands a strategy
its replies in arrival order, which changes from run to run (docs/engines.md: 1e-7..1e-4 apart
after 10 rounds). Sorting the sites' updates by site name before summing makes the sum, and
so the global model, a function of the updates alone. Sums run in float64 and the result is
cast once to float32 (the model's dtype).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from foundation.errors import SpecError
from training.federated.config import ClientDPConfig
from training.model_config import ModelConfig

#: parameter name -> float32 array, in the model's state_dict order
State = dict[str, np.ndarray]


@dataclass(frozen=True)
class SiteUpdate:
    """One site's locally trained model and its FedAvg weight (its training persons)."""

    site: str
    weight: float
    state: Mapping[str, np.ndarray] = field(repr=False)


def model_state(model: object) -> State:
    """A torch module's state_dict as float32 numpy copies (the unwrapped module's keys)."""
    sd = model.state_dict()  # type: ignore[attr-defined]
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in sd.items()}


def load_state(model: object, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into a torch module (strict: the same keys and shapes)."""
    import torch

    tensors = {
        k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()
    }
    model.load_state_dict(tensors, strict=True)  # type: ignore[attr-defined]


def check_like(state: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray], what: str) -> None:
    """Refuse a model whose parameter names or shapes differ from the global model's."""
    if set(state) != set(like):
        raise SpecError(what, "has different parameter names than the global model")
    for key, value in state.items():
        if np.shape(value) != np.shape(like[key]):
            raise SpecError(what, f"parameter {key!r} has a different shape than the global model")
        if not np.isfinite(value).all():
            raise SpecError(what, f"parameter {key!r} is not finite")


def _sorted(updates: Sequence[SiteUpdate]) -> list[SiteUpdate]:
    sites = [u.site for u in updates]
    if len(set(sites)) != len(sites):
        raise SpecError("aggregation", "received two updates from one site")
    return sorted(updates, key=lambda u: u.site)


def weighted_average(updates: Sequence[SiteUpdate]) -> State:
    """FedAvg: sum_i w_i x_i / sum_i w_i over the sites in name order (float64 sums)."""
    if not updates:
        raise SpecError("aggregation", "has no site updates to average")
    ordered = _sorted(updates)
    total = math.fsum(u.weight for u in ordered)
    if not total > 0:
        raise SpecError("aggregation", "the sites' weights sum to zero")
    out: State = {}
    for key in ordered[0].state:
        acc = np.zeros(np.shape(ordered[0].state[key]), dtype=np.float64)
        for u in ordered:
            acc += (u.weight / total) * np.asarray(u.state[key], dtype=np.float64)
        out[key] = acc.astype(np.float32)
    return out


def _flat(state: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in state.values()])


def _unflat(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> State:
    out: State = {}
    at = 0
    for key, value in like.items():
        size = int(np.size(value))
        out[key] = vector[at : at + size].reshape(np.shape(value)).astype(np.float32)
        at += size
    return out


def clipped_delta(
    state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], norm: float
) -> np.ndarray:
    """The update ``state - base`` as one float64 vector, scaled to L2 norm <= ``norm``."""
    delta = _flat(state) - _flat(base)
    length = float(np.linalg.norm(delta))
    if length > norm:
        delta *= norm / length
    return delta


def dp_average(
    updates: Sequence[SiteUpdate],
    base: Mapping[str, np.ndarray],
    dp: ClientDPConfig,
    sampled: int,
    rng: np.random.Generator,
) -> State:
    """DP-FedAvg's server step: ``base + (sum of clipped updates + N(0, (z C)^2)) / sampled``.

    Equal weights and a fixed denominator (the number of sites the round *sampled*, known
    before any reply) bound one site's influence on the result by ``C / sampled`` whatever
    the others send or whether they answer; n-weighted averaging would not. The noise is
    one draw per coordinate from ``rng`` (seeded from the job's secret by the caller).
    """
    if sampled < 1:
        raise SpecError("aggregation", "sampled sites must be >= 1")
    total = np.zeros(sum(int(np.size(v)) for v in base.values()), dtype=np.float64)
    for u in _sorted(updates):
        total += clipped_delta(u.state, base, dp.clipping_norm)
    total += rng.normal(0.0, dp.noise_multiplier * dp.clipping_norm, size=total.shape)
    return _unflat(_flat(base) + total / sampled, base)


def save_weights(path: Path, state: Mapping[str, np.ndarray], model: ModelConfig) -> Path:
    """Write the global model as safetensors (metadata "model" = {"kind", "hidden"} JSON,
    what ``training.predict.ReleasedModel`` reads), atomically."""
    from safetensors.numpy import save_file

    meta = {"model": json.dumps({"kind": model.kind.value, "hidden": list(model.hidden)})}
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weights-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(path: Path) -> State:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))
