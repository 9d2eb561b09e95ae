"""Book-keeping clipping (training.fastdp) against independent references.

The reference is Opacus's per-sample gradients (GradSampleModule, hooks mode), each row's
gradient clipped with the same formula and summed here: a different code path that
materialises what ours never does.

Tolerance rtol=1e-4, atol=1e-5 in float32: both sides add the same products in different
orders (one matrix product of clip-scaled rows vs per-row outer products then a sum), so
they differ by a few ulps (1.2e-7) times sqrt(rows x width), about 1e-6 relative. A formula
error (a wrong norm, a row clipped with another row's factor, a missing bias term) moves the
result by 1e-2 or more. The float64 test pins the same to 1e-10.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from torch import nn

from foundation.errors import SpecError
from training.fastdp import CLIP_EPS, clipped_grad_sum, clipped_step, supports
from training.models import ModelConfig, ModelKind, build_model

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

RTOL, ATOL = 1e-4, 1e-5
N_IN = 6


def bce_sum() -> nn.Module:
    return nn.BCEWithLogitsLoss(reduction="sum")


def opacus_reference(
    model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor, C: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(clipped sums per parameter, per-row gradient norms) from Opacus's per-sample grads."""
    copy_ = copy.deepcopy(model)
    gsm = GradSampleModule(copy_, batch_first=True, loss_reduction="sum")
    loss_fn(gsm(X), y).backward()
    rows = X.shape[0]
    samples = [p.grad_sample.reshape(rows, -1) for p in copy_.parameters()]
    norms = torch.stack([s.norm(dim=1) for s in samples]).norm(dim=0)
    clip = (C / (norms + CLIP_EPS)).clamp(max=1.0)
    sums = [
        (clip[:, None] * s).sum(0).view_as(p)
        for s, p in zip(samples, copy_.parameters(), strict=True)
    ]
    gsm.to_standard_module()
    return sums, norms


def _binary(rows: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(rows, 1, generator=gen) < 0.5).float()


def case(name: str, gen: torch.Generator) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(model, summed loss, labels for 64 rows) for each layer combination claimed."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    rows = 64
    if name == "linear-bias":
        return nn.Linear(N_IN, 1), bce_sum(), _binary(rows, gen)
    if name == "linear-no-bias":
        return nn.Linear(N_IN, 1, bias=False), bce_sum(), _binary(rows, gen)
    if name == "logistic":
        return (
            build_model(ModelConfig(ModelKind.LOGISTIC), N_IN, seed=3),
            bce_sum(),
            _binary(rows, gen),
        )
    if name == "mlp-relu":
        model = build_model(ModelConfig(ModelKind.MLP, (16, 8)), N_IN, seed=4)
        return model, bce_sum(), _binary(rows, gen)
    if name == "mlp-tanh-mixed-bias":
        model = nn.Sequential(
            nn.Linear(N_IN, 12), nn.Tanh(), nn.Linear(12, 7, bias=False), nn.ReLU(), nn.Linear(7, 1)
        )
        return model, bce_sum(), _binary(rows, gen)
    if name == "multi-output-ce":
        model = nn.Sequential(nn.Linear(N_IN, 10), nn.ReLU(), nn.Linear(10, 3))
        return (
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            torch.randint(0, 3, (rows,), generator=gen),
        )
    if name == "nested-gelu-mse":
        model = nn.Sequential(nn.Sequential(nn.Linear(N_IN, 9), nn.GELU()), nn.Linear(9, 4))
        return model, nn.MSELoss(reduction="sum"), torch.randn(rows, 4, generator=gen)
    raise AssertionError(name)


CASES = [
    "linear-bias",
    "linear-no-bias",
    "logistic",
    "mlp-relu",
    "mlp-tanh-mixed-bias",
    "multi-output-ce",
    "nested-gelu-mse",
]


@pytest.mark.parametrize("name", CASES)
def test_matches_opacus_per_sample_clipping(name: str) -> None:
    gen = torch.Generator().manual_seed(CASES.index(name))
    model, loss_fn, y = case(name, gen)
    # rows at different scales so that the batch's gradient norms spread widely
    X = (
        torch.randn(y.shape[0], N_IN, generator=gen)
        * torch.linspace(0.05, 3.0, y.shape[0])[:, None]
    )
    _, norms = opacus_reference(model, loss_fn, X, y, 1.0)
    C = float(norms.median())
    assert (norms < C * 0.9).sum() >= 5 and (norms > C * 1.1).sum() >= 5, (
        "want rows on both sides of C"
    )

    ours = clipped_grad_sum(model, loss_fn, X, y, C)
    ref, _ = opacus_reference(model, loss_fn, X, y, C)
    assert len(ours) == len(list(model.parameters()))
    for got, want, p in zip(ours, ref, model.parameters(), strict=True):
        assert got.shape == p.shape
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_matches_opacus_in_float64_to_rounding() -> None:
    gen = torch.Generator().manual_seed(11)
    model, loss_fn, y = case("mlp-tanh-mixed-bias", gen)
    model = model.double()
    X = torch.randn(y.shape[0], N_IN, generator=gen, dtype=torch.float64)
    y = y.double()
    ours = clipped_grad_sum(model, loss_fn, X, y, 0.3)
    ref, _ = opacus_reference(model, loss_fn, X, y, 0.3)
    for got, want in zip(ours, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_large_bound_gives_the_plain_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    model, loss_fn, y = case("mlp-relu", gen)
    X = torch.randn(y.shape[0], N_IN, generator=gen)
    ours = clipped_grad_sum(model, loss_fn, X, y, 1e9)
    loss_fn(model(X), y).backward()
    for got, p in zip(ours, model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=RTOL, atol=ATOL)


def test_empty_batch_gives_zeros() -> None:
    model = build_model(ModelConfig(ModelKind.MLP, (8,)), N_IN, seed=0)
    out = clipped_step(model, bce_sum(), torch.zeros(0, N_IN), torch.zeros(0, 1), 1.0)
    assert out.batch_size == 0 and float(out.loss) == 0.0
    for g, p in zip(out.grads, model.parameters(), strict=True):
        assert g.shape == p.shape and not g.any()


def test_leaves_grad_fields_alone() -> None:
    model = build_model(ModelConfig(ModelKind.MLP, (8,)), N_IN, seed=0)
    out = clipped_step(model, bce_sum(), torch.randn(10, N_IN), torch.ones(10, 1), 1.0)
    assert all(p.grad is None for p in model.parameters())
    assert out.batch_size == 10 and out.loss.requires_grad is False


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=0, max_size=2),
    rows=st.integers(1, 12),
    bound=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_each_row_moves_the_sum_by_at_most_the_bound(
    widths: list[int], rows: int, bound: float, seed: int
) -> None:
    """The privacy invariant itself: one row's contribution has norm <= C, and the batch's
    sum is the sum of its rows' contributions (no row is clipped with another's factor)."""
    kind = ModelKind.MLP if widths else ModelKind.LOGISTIC
    model = build_model(ModelConfig(kind, tuple(widths)), N_IN, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, N_IN, generator=gen) * 5
    y = _binary(rows, gen)
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(rows):
        one = clipped_grad_sum(model, bce_sum(), X[i : i + 1], y[i : i + 1], bound)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in one))
        assert norm <= bound * (1 + 1e-5)
        total = [t + g for t, g in zip(total, one, strict=True)]
    batch = clipped_grad_sum(model, bce_sum(), X, y, bound)
    for got, want in zip(batch, total, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(N_IN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0))  # mixes rows: book-keeping must refuse such a module


class _LinearSubclass(nn.Linear):
    pass


def _shared() -> nn.Module:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(nn.Linear(N_IN, 4), a, nn.ReLU(), b, nn.Linear(4, 1))


def _frozen() -> nn.Module:
    model = build_model(ModelConfig(ModelKind.MLP, (4,)), N_IN, seed=0)
    model[0].weight.requires_grad_(False)
    return model


def _reused() -> nn.Module:
    hidden = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(N_IN, 4), hidden, nn.ReLU(), hidden, nn.Linear(4, 1))


@pytest.mark.parametrize(
    "model",
    [
        build_model(ModelConfig(ModelKind.LOGISTIC), N_IN, seed=0),
        build_model(ModelConfig(ModelKind.MLP, (8, 8)), N_IN, seed=0),
        nn.Linear(N_IN, 2),
        nn.Sequential(nn.Linear(N_IN, 3), nn.SiLU(), nn.Sequential(nn.Linear(3, 1), nn.Identity())),
    ],
)
def test_supports_linear_stacks(model: nn.Module) -> None:
    assert supports(model)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 1)),
        lambda: nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1)),
        lambda: nn.Sequential(nn.Linear(N_IN, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)),
        lambda: nn.Sequential(nn.Linear(N_IN, 4), nn.ReLU(inplace=True), nn.Linear(4, 1)),
        lambda: nn.Sequential(nn.Linear(N_IN, 4), nn.Dropout(0.1), nn.Linear(4, 1)),
        lambda: nn.Sequential(nn.Linear(N_IN, 4), nn.LayerNorm(4), nn.Linear(4, 1)),
        lambda: nn.Sequential(nn.ReLU()),
        _Custom,
        lambda: _LinearSubclass(N_IN, 1),
        _shared,
        _frozen,
        _reused,
    ],
    ids=[
        "conv",
        "embedding",
        "batchnorm",
        "inplace",
        "dropout",
        "layernorm",
        "no-linear",
        "custom-forward",
        "linear-subclass",
        "shared-param",
        "frozen",
        "reused-layer",
    ],
)
def test_refuses_what_the_formula_does_not_cover(factory) -> None:
    model = factory()
    assert not supports(model)
    with pytest.raises(SpecError) as err:
        clipped_grad_sum(model, bce_sum(), torch.randn(4, N_IN), torch.ones(4, 1), 1.0)
    assert err.value.field == "model"


def test_refuses_a_mean_loss_a_bad_bound_and_3d_input() -> None:
    model = build_model(ModelConfig(ModelKind.MLP, (4,)), N_IN, seed=0)
    X, y = torch.randn(4, N_IN), torch.ones(4, 1)
    with pytest.raises(SpecError) as err:
        clipped_grad_sum(model, nn.BCEWithLogitsLoss(), X, y, 1.0)
    assert err.value.field == "loss_fn.reduction"
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(SpecError) as err:
            clipped_grad_sum(model, bce_sum(), X, y, bad)
        assert err.value.field == "max_grad_norm"
    with pytest.raises(SpecError) as err:
        clipped_grad_sum(model, bce_sum(), X.view(4, 1, N_IN), y.view(4, 1, 1), 1.0)
    assert err.value.field == "X"


def test_relu_stacks_by_hand_equal_the_autograd_pass() -> None:
    """build_model's Linear/ReLU stacks take the hand-written backward; LeakyReLU(0) is the
    same function but goes through autograd: the two must agree."""
    hand = build_model(ModelConfig(ModelKind.MLP, (16, 8)), N_IN, seed=4)
    via_autograd = nn.Sequential(
        *[nn.LeakyReLU(0.0) if isinstance(m, nn.ReLU) else m for m in copy.deepcopy(hand)]
    )
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(64, N_IN, generator=gen) * 2
    y = _binary(64, gen)
    a = clipped_step(hand, bce_sum(), X, y, 0.2)
    b = clipped_step(via_autograd, bce_sum(), X, y, 0.2)
    torch.testing.assert_close(a.loss, b.loss)
    for got, want in zip(a.grads, b.grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
