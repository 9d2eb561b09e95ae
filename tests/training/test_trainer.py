"""DP-SGD trainer: learning, exact step count, noise, sampling edge cases, Opacus fallbacks.

References are independent of the code under test: a per-row Python loop with plain autograd
for clipped SGD, sklearn for AUROC, and the Gaussian's own moments for the noise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from foundation.errors import SpecError
from training import trainer
from training.dpsgd_config import Clipping, Device, DPSGDConfig, EpochProgress
from training.models import ModelConfig, ModelKind, build_model
from training.scoring import predict_proba
from training.trainer import poisson_batch, train_dpsgd

N_IN = 5


def logistic_task(rows: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from a known logistic model: AUROC of the true scores is about 0.9."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, N_IN, generator=gen)
    w = torch.tensor([1.0, -1.0, 0.5, 0.0, 0.8])
    y = (torch.rand(rows, generator=gen) < torch.sigmoid(scale * X @ w)).float()
    return X, y


def mlp(seed: int = 0, hidden: tuple[int, ...] = (16,)) -> nn.Module:
    return build_model(ModelConfig(ModelKind.MLP, hidden), N_IN, seed=seed)


def cfg(**overrides) -> DPSGDConfig:
    base = dict(sample_rate=0.05, steps=50, lr=0.5, max_grad_norm=1.0, noise_multiplier=1.0, seed=7)
    base.update(overrides)
    return DPSGDConfig(**base)


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def clipped_sgd_reference(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, C: float, lr: float, steps: int
) -> None:
    """Full-batch clipped SGD, one row at a time with plain autograd (no fastdp, no Opacus)."""
    rows = X.shape[0]
    for _ in range(steps):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for i in range(rows):
            model.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(X[i : i + 1]), y[i : i + 1].view(1, 1)
            )
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
            factor = min(1.0, C / (norm + 1e-6))
            total = [t + factor * g for t, g in zip(total, grads, strict=True)]
        with torch.no_grad():
            for p, t in zip(model.parameters(), total, strict=True):
                p -= lr * t / rows
    model.zero_grad(set_to_none=True)


def test_learns_a_logistic_task_under_weak_noise() -> None:
    X, y = logistic_task(6000, seed=0)
    Xtest, ytest = logistic_task(2000, seed=1)
    model = build_model(ModelConfig(ModelKind.LOGISTIC), N_IN, seed=0)
    result = train_dpsgd(
        model, X, y, cfg(sample_rate=0.05, steps=300, lr=1.0, noise_multiplier=0.5)
    )
    auroc = roc_auc_score(ytest.numpy(), predict_proba(model, Xtest))
    assert auroc > 0.85, auroc  # the true model scores ~0.9; chance is 0.5
    assert result.clipping is Clipping.BOOK_KEEPING
    assert result.steps_taken == 300 and result.device == "cpu"
    assert result.epochs_done == 15  # 300 steps / round(1 / 0.05)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    X, y = logistic_task(500, seed=2)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        model = mlp(seed=0)
        train_dpsgd(model, X, y, cfg(seed=seed, steps=20))
        runs[name] = weights(model)
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.allclose(runs["a"], runs["c"])


def test_unseeded_runs_draw_fresh_randomness() -> None:
    X, y = logistic_task(200, seed=2)
    a, b = mlp(seed=0), mlp(seed=0)
    train_dpsgd(a, X, y, cfg(seed=None, steps=3))
    train_dpsgd(b, X, y, cfg(seed=None, steps=3))
    assert not torch.equal(weights(a), weights(b))


def test_zero_noise_full_batch_is_clipped_sgd_for_exactly_the_steps_asked() -> None:
    """q = 1 draws every row each step, so the batches are known; with no noise the run must
    equal the per-row reference step for step, and 3 steps must not be 2 or 4."""
    X, y = logistic_task(40, seed=5)
    X = X * 3  # large inputs so that most rows are clipped at C = 0.5
    seen: list[EpochProgress] = []
    model = mlp(seed=1)
    result = train_dpsgd(
        model,
        X,
        y,
        cfg(sample_rate=1.0, steps=3, lr=0.3, max_grad_norm=0.5, noise_multiplier=0.0),
        progress=seen.append,
    )
    assert result.steps_taken == 3 and [p.step for p in seen] == [1, 2, 3]

    ref = mlp(seed=1)
    clipped_sgd_reference(ref, X, y, C=0.5, lr=0.3, steps=3)
    torch.testing.assert_close(weights(model), weights(ref), rtol=1e-4, atol=1e-6)
    short = mlp(seed=1)
    clipped_sgd_reference(short, X, y, C=0.5, lr=0.3, steps=2)
    assert not torch.allclose(weights(model), weights(short), rtol=1e-4, atol=1e-6)


def test_progress_once_per_epoch_with_a_partial_last_epoch() -> None:
    X, y = logistic_task(300, seed=6)
    seen: list[EpochProgress] = []
    result = train_dpsgd(mlp(), X, y, cfg(steps=7, steps_per_epoch=3), progress=seen.append)
    assert [(p.epoch, p.epochs, p.step, p.steps) for p in seen] == [
        (1, 3, 3, 7),
        (2, 3, 6, 7),
        (3, 3, 7, 7),
    ]
    assert result.steps_taken == 7 and result.epochs_done == 3
    assert all(p.loss > 0 for p in seen) and result.final_loss == seen[-1].loss


def test_huge_noise_moves_the_weights_as_the_gaussian_says() -> None:
    """With sigma * C far above any clipped sum the update is the noise: each coordinate
    moves by -lr * N(0, (sigma C)^2) / (q N)."""
    X, y = logistic_task(400, seed=8)
    sigma, lr, q, C = 1e4, 0.01, 0.1, 1.0
    deltas = []
    for seed in (1, 2):
        model = mlp(seed=0, hidden=(32,))
        before = weights(model)
        train_dpsgd(
            model,
            X,
            y,
            cfg(sample_rate=q, steps=1, lr=lr, max_grad_norm=C, noise_multiplier=sigma, seed=seed),
        )
        deltas.append((weights(model) - before) / (lr * sigma * C / (q * 400)))
    for d in deltas:  # 225 coordinates: the std estimate is within ~5% of 1
        assert 0.85 < float(d.std()) < 1.15 and abs(float(d.mean())) < 0.2
    corr = float(torch.corrcoef(torch.stack(deltas))[0, 1])
    assert abs(corr) < 0.3  # two seeds, independent noise


def test_empty_poisson_batches_are_noise_only_steps() -> None:
    X, y = logistic_task(10, seed=9)
    for model in (mlp(), _conv_model()):
        seen: list[EpochProgress] = []
        before = weights(model)
        result = train_dpsgd(
            model, X, y, cfg(sample_rate=0.001, steps=20, steps_per_epoch=5), progress=seen.append
        )
        assert result.steps_taken == 20
        assert not torch.equal(before, weights(model))  # the noise still moved the weights
        assert any(math.isnan(p.loss) for p in seen)  # epochs that drew no row at all


def test_noise_only_steps_divide_by_the_expected_batch_not_the_drawn_one() -> None:
    """Dividing by the realised batch size would leak it (and divide by zero here)."""
    X, y = logistic_task(10, seed=9)
    q, steps, sigma, lr = 1e-5, 20, 2.0, 0.1
    model = mlp(seed=0, hidden=(32,))
    before = weights(model)
    seen: list[EpochProgress] = []
    train_dpsgd(
        model,
        X,
        y,
        cfg(sample_rate=q, steps=steps, steps_per_epoch=1, lr=lr, noise_multiplier=sigma),
        progress=seen.append,
    )
    assert all(math.isnan(p.loss) for p in seen)  # this seed drew no row in any step
    z = (weights(model) - before) / (lr * sigma * 1.0 / (q * 10) * math.sqrt(steps))
    assert 0.85 < float(z.std()) < 1.15 and abs(float(z.mean())) < 0.2


def test_poisson_batch_keeps_rows_with_the_sample_rate() -> None:
    X = torch.arange(20_000, dtype=torch.float32).view(-1, 1)
    y = X.clone()
    gen = torch.Generator().manual_seed(0)
    Xb, yb = poisson_batch(X, y, 0.1, gen)
    assert torch.equal(Xb, yb)  # rows stay paired with their labels
    assert abs(Xb.shape[0] - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9)
    assert Xb.shape[0] == torch.unique(Xb).shape[0]  # without replacement
    assert poisson_batch(X, y, 1.0, gen)[0].shape[0] == 20_000


@pytest.mark.parametrize(
    "sampler",
    ["gaps", "gaps-many-rounds", "uniforms"],
    ids=["gaps", "gaps-many-rounds", "uniforms"],
)
def test_samplers_are_independent_bernoulli_per_row(sampler: str, monkeypatch) -> None:
    """Both samplers (CPU: geometric gaps; GPU: one uniform per row, run here on the CPU)
    must match Bernoulli(q) per row, independently: each row's inclusion rate, the batch
    size's mean and variance, and neighbouring rows' joint inclusion (where a wrong gap law
    would show first). Every bound is 5 standard errors."""
    if sampler == "gaps-many-rounds":  # ~q*N gaps per round: most batches need a second
        monkeypatch.setattr(trainer, "_GAP_SIGMAS", 0.0)
        monkeypatch.setattr(trainer, "_GAP_MARGIN", 1)
    draw = trainer._rows_by_uniforms if sampler == "uniforms" else trainer._rows_by_gaps
    rows, q, draws = 40, 0.3, 4000
    gen = torch.Generator().manual_seed(1)
    hits = torch.zeros(draws, rows)
    for t in range(draws):
        hits[t, draw(rows, q, gen, torch.device("cpu"))] = 1.0
    rate_se = math.sqrt(q * (1 - q) / draws)
    assert (hits.mean(0) - q).abs().max() < 5 * rate_se
    sizes = hits.sum(1)
    assert abs(float(sizes.mean()) - rows * q) < 5 * math.sqrt(rows * q * (1 - q) / draws)
    assert abs(float(sizes.var()) / (rows * q * (1 - q)) - 1) < 5 * math.sqrt(2 / draws)
    both = (hits[:, :-1] * hits[:, 1:]).mean()
    assert abs(float(both) - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (draws * (rows - 1)))


# --- Opacus fallbacks ---------------------------------------------------------------------


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (1, N_IN)), nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(9, 1)
    )


class _TwiceThrough(nn.Module):
    """Calls one Linear twice: ghost clipping refuses it at the first forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(N_IN, 8)
        self.hidden = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.hidden(h))
        return self.out(torch.relu(self.hidden(h)))


def _tied() -> nn.Module:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    return nn.Sequential(nn.Linear(N_IN, 8), nn.ReLU(), a, nn.ReLU(), b, nn.ReLU(), nn.Linear(8, 1))


def _no_opacus_traces(model: nn.Module) -> bool:
    for module in model.modules():
        if module._forward_hooks or module._backward_hooks:
            return False
        if any(
            hasattr(module, a)
            for a in ("activations", "max_batch_len", "autograd_grad_sample_hooks")
        ):
            return False
    return not any(
        hasattr(p, a)
        for p in model.parameters()
        for a in ("grad_sample", "_norm_sample", "_forward_counter")
    )


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (_conv_model, Clipping.OPACUS_GHOST),
        (_TwiceThrough, Clipping.OPACUS_HOOKS),
        (_tied, Clipping.OPACUS_HOOKS),
    ],
    ids=["conv1d-ghost", "reused-layer-hooks", "tied-weights-hooks"],
)
def test_opacus_fallback_runs_and_cleans_up(factory, expected: Clipping) -> None:
    X, y = logistic_task(600, seed=10)
    model = factory()
    before = weights(model)
    result = train_dpsgd(model, X, y, cfg(steps=40, lr=1.0, noise_multiplier=0.3))
    assert result.clipping is expected
    assert result.steps_taken == 40
    assert not torch.equal(before, weights(model))
    assert _no_opacus_traces(model)
    assert 0.0 <= predict_proba(model, X).min() and predict_proba(model, X).max() <= 1.0


def test_all_three_clippers_take_the_same_steps() -> None:
    X, y = logistic_task(64, seed=11)
    X = X * 3
    finals = {}
    for kind in Clipping:
        model = mlp(seed=2, hidden=(12, 6))
        result = train_dpsgd(
            model,
            X,
            y,
            cfg(
                sample_rate=1.0,
                steps=3,
                lr=0.3,
                max_grad_norm=0.5,
                noise_multiplier=0.0,
                clipping=kind,
            ),
        )
        assert result.clipping is kind
        finals[kind] = weights(model)
    for kind in (Clipping.OPACUS_GHOST, Clipping.OPACUS_HOOKS):
        torch.testing.assert_close(
            finals[kind], finals[Clipping.BOOK_KEEPING], rtol=1e-4, atol=1e-6
        )


def test_forcing_book_keeping_on_a_model_it_cannot_clip_is_refused() -> None:
    X, y = logistic_task(50, seed=12)
    with pytest.raises(SpecError) as err:
        train_dpsgd(_conv_model(), X, y, cfg(clipping=Clipping.BOOK_KEEPING))
    assert err.value.field == "dpsgd.clipping"


def test_batchnorm_is_refused_before_any_step() -> None:
    """BatchNorm's running statistics mix rows and are an unnoised release of them."""
    X, y = logistic_task(50, seed=12)
    model = nn.Sequential(nn.Linear(N_IN, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(SpecError) as err:
        train_dpsgd(model, X, y, cfg())
    assert err.value.field == "model"


def test_forcing_ghost_on_a_reused_layer_is_refused() -> None:
    X, y = logistic_task(50, seed=12)
    model = _TwiceThrough()
    with pytest.raises(SpecError) as err:
        train_dpsgd(model, X, y, cfg(sample_rate=0.5, clipping=Clipping.OPACUS_GHOST))
    assert err.value.field == "dpsgd.clipping"
    assert _no_opacus_traces(model)


# --- inputs and configuration ---------------------------------------------------------------


def test_refuses_a_model_with_two_outputs_and_mismatched_labels() -> None:
    X, y = logistic_task(50, seed=13)
    two = build_model(ModelConfig(ModelKind.MLP, (4,)), N_IN, n_outputs=2, seed=0)
    with pytest.raises(SpecError) as err:
        train_dpsgd(two, X, y, cfg())
    assert err.value.field == "model"
    with pytest.raises(SpecError) as err:
        train_dpsgd(mlp(), X, y[:-1], cfg())
    assert err.value.field == "y"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("sample_rate", float("nan")),
        ("steps", 0),
        ("steps", 2.0),
        ("steps", True),
        ("lr", 0.0),
        ("lr", float("inf")),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1.0),
        ("noise_multiplier", -0.1),
        ("noise_multiplier", float("nan")),
        ("seed", -1),
        ("seed", 1.5),
        ("device", "tpu"),
        ("steps_per_epoch", 0),
        ("expected_batch_size", 0.0),
        ("clipping", "fast"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SpecError) as err:
        cfg(**{field: value})
    assert err.value.field == f"dpsgd.{field}"


def test_config_is_frozen_and_coerces_strings_to_enums() -> None:
    c = cfg(device="cpu", clipping="opacus-hooks")
    assert c.device is Device.CPU and c.clipping is Clipping.OPACUS_HOOKS
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.steps = 10  # type: ignore[misc]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_spec_error() -> None:
    X, y = logistic_task(50, seed=14)
    with pytest.raises(SpecError) as err:
        train_dpsgd(mlp(), X, y, cfg(device="cuda"))
    assert err.value.field == "dpsgd.device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_reproducibly() -> None:
    X, y = logistic_task(4000, seed=15)
    Xtest, ytest = logistic_task(1000, seed=16)
    runs = []
    for _ in range(2):
        model = build_model(ModelConfig(ModelKind.LOGISTIC), N_IN, seed=0)
        result = train_dpsgd(
            model, X, y, cfg(device="cuda", steps=200, lr=1.0, noise_multiplier=0.5)
        )
        assert result.device == "cuda" and next(model.parameters()).is_cuda
        runs.append(weights(model))
    assert torch.equal(runs[0], runs[1])
    assert roc_auc_score(ytest.numpy(), predict_proba(model, Xtest)) > 0.85


def test_predict_proba_shapes_inputs_and_mode() -> None:
    model = mlp()
    model.train()
    X, _ = logistic_task(30, seed=17)
    p = predict_proba(model, X.numpy())
    assert isinstance(p, np.ndarray) and p.shape == (30,) and p.dtype == np.float64
    assert ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(p, torch.sigmoid(model(X)).detach().numpy()[:, 0], rtol=1e-6)
    assert model.training  # mode restored
    assert predict_proba(model, torch.zeros(0, N_IN)).shape == (0,)
