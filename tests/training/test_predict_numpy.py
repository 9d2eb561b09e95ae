"""Scoring a released model needs no torch: ``training.predict`` runs the network in NumPy.

The reference is torch's own forward pass of the same weights (``training.models``, what the
zone trains), never the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import FEATURES

from connectors.cohort import cohort_contract
from connectors.dummy import dummy_table
from connectors.preprocess import FeaturePlan
from foundation.errors import SpecError
from training.model_config import ModelConfig, ModelKind
from training.predict import ReleasedModel

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _release(folder: Path, cfg: ModelConfig, *, seed: int, scale: float = 1.0) -> FeaturePlan:
    """A release folder as the DP-SGD worker writes it, of a model built by the zone's
    ``build_model`` (weights scaled by ``scale`` to reach large logits)."""
    from training.models import build_model

    plan = FeaturePlan.from_contract(cohort_contract(), list(FEATURES))
    model = build_model(cfg, plan.n_outputs, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessing.json").write_text(json.dumps(plan.to_dict()))
    meta = {"model": json.dumps({"kind": cfg.kind.value, "hidden": list(cfg.hidden)})}
    safetensors_torch.save_file(
        model.state_dict(), str(folder / "model.safetensors"), metadata=meta
    )
    return plan


def _torch_scores(folder: Path, cfg: ModelConfig, plan: FeaturePlan, rows) -> np.ndarray:
    from training.models import build_model

    model = build_model(cfg, plan.n_outputs, seed=0)
    model.load_state_dict(safetensors_torch.load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        x = torch.from_numpy(plan.transform(rows))
        return torch.sigmoid(model(x).reshape(-1)).numpy()


@pytest.mark.parametrize(
    ("kind", "hidden", "scale"),
    [("logistic", (), 1.0), ("mlp", (16,), 1.0), ("mlp", (32, 8), 1.0), ("mlp", (16,), 40.0)],
)
def test_numpy_scores_are_torch_s_forward_pass(
    tmp_path: Path, kind: str, hidden: tuple[int, ...], scale: float
) -> None:
    cfg = ModelConfig(kind=ModelKind(kind), hidden=hidden)
    plan = _release(tmp_path, cfg, seed=5, scale=scale)
    rows = dummy_table(cohort_contract(), 400, seed=2).select(list(FEATURES))
    got = ReleasedModel.load(tmp_path).predict(rows)
    want = _torch_scores(tmp_path, cfg, plan, rows)
    assert got.dtype == np.float32 and got.shape == (400,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if scale > 1:  # saturated logits stay probabilities, no overflow warning turned error
        assert ((got == 0) | (got == 1)).any() and np.all((got >= 0) & (got <= 1))


def test_a_weights_file_that_is_not_the_model_it_names_is_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(kind=ModelKind.MLP, hidden=(16,))
    _release(tmp_path, cfg, seed=1)
    # the metadata now says one hidden layer of 8: the tensors do not fit it
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file(
        tensors,
        str(tmp_path / "model.safetensors"),
        metadata={"model": json.dumps({"kind": "mlp", "hidden": [8]})},
    )
    with pytest.raises(SpecError, match=r"DIR: model\.safetensors does not hold the model"):
        ReleasedModel.load(tmp_path)


def test_scoring_imports_no_torch(tmp_path: Path) -> None:
    cfg = ModelConfig(kind=ModelKind.MLP, hidden=(16,))
    _release(tmp_path / "release", cfg, seed=3)
    rows = dummy_table(cohort_contract(), 50, seed=1).select(list(FEATURES))
    import pyarrow.parquet as pq

    pq.write_table(rows, tmp_path / "rows.parquet")
    code = (
        "import sys; from pathlib import Path\n"
        "from training.predict import predict_file\n"
        f"r = predict_file(Path({str(tmp_path / 'release')!r}), Path({str(tmp_path / 'rows.parquet')!r}),"
        f" Path({str(tmp_path / 'scores.parquet')!r}))\n"
        "assert r.scored == 50, r\n"
        "print('torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
