"""Use a released model outside the zone: one call scores new rows.

A release folder holds ``model.safetensors`` (weights and the model config in its metadata),
``preprocessing.json`` (the feature plan, parameters from the schema contract) and
``model_card.json``. ``ReleasedModel.load(DIR).predict(table)`` applies the same
preprocessing as training and returns probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from connectors.external import read_user_table, write_table
from connectors.preprocess import FeaturePlan
from foundation.errors import SpecError
from training.models import ModelConfig, ModelKind, build_model


@dataclass(frozen=True)
class ReleasedModel:
    model: torch.nn.Module
    plan: FeaturePlan
    card: dict[str, Any]

    @classmethod
    def load(cls, folder: Path) -> ReleasedModel:
        weights = folder / "model.safetensors"
        prep = folder / "preprocessing.json"
        if not weights.exists() or not prep.exists():
            raise SpecError(
                "DIR",
                f"{folder} is not a released model",
                "use the folder from `sandbox jobs result ID --out DIR`",
            )
        with safe_open(str(weights), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["model"])
        cfg = ModelConfig(kind=ModelKind(meta["kind"]), hidden=tuple(meta["hidden"]))
        plan = FeaturePlan.from_dict(json.loads(prep.read_text()))
        model = build_model(cfg, plan.n_outputs, seed=0)
        model.load_state_dict(load_file(str(weights)))
        model.eval()
        card_path = folder / "model_card.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        return cls(model=model, plan=plan, card=card)

    @property
    def features(self) -> list[str]:
        return list(self.card.get("features") or self.plan.to_dict().get("features", []))

    def predict(self, table: pa.Table) -> np.ndarray:
        X = torch.from_numpy(self.plan.transform(table))
        with torch.no_grad():
            return torch.sigmoid(self.model(X).reshape(-1)).numpy()


def predict_file(folder: Path, source: Path, out: Path) -> int:
    """Score ``source`` (CSV/Parquet) with the release in ``folder``; write ``out``. Returns rows."""
    released = ReleasedModel.load(folder)
    table = read_user_table(source, released.features)
    scores = released.predict(table)
    write_table(out, pa.table({"score": pa.array(scores, type=pa.float32())}))
    return len(scores)
