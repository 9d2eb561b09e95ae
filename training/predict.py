"""Use a released model outside the zone: one call scores new rows.

A release folder holds ``model.safetensors`` (weights and the model config in its metadata),
``preprocessing.json`` (the feature plan, parameters from the schema contract) and
``model_card.json``. ``ReleasedModel.load(DIR).predict(table)`` applies the same
preprocessing as training and returns probabilities.

Scoring needs no torch: every model the zone trains is an ``nn.Sequential`` of Linear layers
with a ReLU between each two (``training.models.build_model``), so the weights are read as
NumPy arrays and the forward pass is a few matrix products. A researcher's machine scores
without the training stack, and ``sandbox model predict`` starts in a fraction of the time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from safetensors import safe_open
from safetensors.numpy import load_file

from connectors.external import read_user_table, write_table
from connectors.ingest_checks import prepare_column
from connectors.ingest_findings import Findings, Violation
from connectors.preprocess import FeaturePlan
from foundation.errors import SchemaError, SpecError
from training.model_config import ModelConfig, ModelKind, linear_shapes

#: one Linear layer: its weight [out, in] and its bias [out], float32
Layer = tuple[np.ndarray, np.ndarray]


def _layers(weights: dict[str, np.ndarray], cfg: ModelConfig, n_inputs: int) -> tuple[Layer, ...]:
    """The Linear layers ``build_model(cfg, n_inputs)`` holds, in order, from its state dict
    (keys ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ...: a ReLU sits at each odd index).
    Anything else (a missing or extra tensor, a shape the metadata's model does not have) is
    refused: the file is not the model it says it is."""
    want = linear_shapes(cfg, n_inputs)
    have = {k: tuple(v.shape) for k, v in weights.items()}
    if have != want:
        raise SpecError(
            "DIR",
            "model.safetensors does not hold the model its metadata and preprocessing.json "
            f"describe ({cfg.kind.value}, hidden {list(cfg.hidden)}, {n_inputs} inputs)",
            "use the folder `sandbox jobs result ID --out DIR` wrote, unchanged",
        )
    return tuple(
        (
            np.asarray(weights[f"{2 * i}.weight"], dtype=np.float32),
            np.asarray(weights[f"{2 * i}.bias"], dtype=np.float32),
        )
        for i in range(len(want) // 2)
    )


@dataclass(frozen=True)
class ReleasedModel:
    layers: tuple[Layer, ...]
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
        with safe_open(str(weights), framework="np") as fh:
            meta = json.loads((fh.metadata() or {})["model"])
        cfg = ModelConfig(kind=ModelKind(meta["kind"]), hidden=tuple(meta["hidden"]))
        plan = FeaturePlan.from_dict(json.loads(prep.read_text()))
        layers = _layers(load_file(str(weights)), cfg, plan.n_outputs)
        card_path = folder / "model_card.json"
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        return cls(layers=layers, plan=plan, card=card)

    @property
    def features(self) -> list[str]:
        return list(self.card.get("features") or self.plan.to_dict().get("features", []))

    def predict(self, table: pa.Table) -> np.ndarray:
        """Probabilities, float32: the network's forward pass, then the logistic function."""
        x = np.asarray(self.plan.transform(table), dtype=np.float32)
        last = len(self.layers) - 1
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight.T + bias
            if i < last:
                x = np.maximum(x, np.float32(0))
        logit = x.reshape(-1)
        # 1 / (1 + e^-z) without overflow for large |z|
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def looks_like_id(name: str) -> bool:
    """``id``, ``patient_id``, ``visit-id``, ``patientId``, ``MRN``: copied beside scores."""
    low = name.strip().lower()
    return (
        low in ("id", "mrn")
        or low.endswith(("_id", "-id", " id"))
        or (name.endswith(("Id", "ID")) and len(name) > 2)
    )


@dataclass(frozen=True)
class Scored:
    """What ``predict_file`` did: rows read and scored, and what it noticed (counts only)."""

    rows: int
    scored: int
    out: Path
    passed_through: tuple[str, ...]
    #: rows ingest would have refused (left unscored), per column: a ``Violation`` each
    not_scored: tuple[Violation, ...]
    #: what the contract's declared cleaning changed: column -> what -> rows
    cleaned: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "scored": self.scored,
            "out": str(self.out),
            "passed_through": list(self.passed_through),
            "not_scored": [v.to_dict() for v in self.not_scored],
            "cleaned": {c: dict(a) for c, a in self.cleaned.items()},
        }


def predict_file(folder: Path, source: Path, out: Path, ids: Sequence[str] | None = None) -> Scored:
    """Score ``source`` (CSV/Parquet) with the release in ``folder``; write ``out``.

    The input is checked as ingest checked the training data, from the contract's
    declarations the release carries (``preprocessing.json``): declared missing text,
    category spellings and out-of-domain values are cleaned as declared and counted; a row
    that ingest would have refused (a number outside the domain with ``outside = "reject"``,
    text that does not parse) is written with no score, and counted. Unknown categories are
    scored as "other", as in training, and counted. ``ids`` are columns copied from the
    input beside each score; by default those named like an identifier (``looks_like_id``),
    else a ``row`` column numbering the input's data rows from 1. Other columns (a name, a
    phone number) are never copied unless named.
    """
    released = ReleasedModel.load(folder)
    features = released.features
    table = read_user_table(source, None)
    missing = [c for c in features if c not in table.column_names]
    if missing:
        raise SchemaError(
            f"column {missing[0]!r}, a feature of the model, is missing from {source.name}",
            column=missing[0],
        )
    keep = [c for c in table.column_names if looks_like_id(c)] if ids is None else list(ids)
    unknown = [c for c in keep if c not in table.column_names]
    if unknown:
        raise SpecError(
            "--id", f"{unknown[0]!r} is not a column of {source.name}", "name a column it has"
        )
    found = Findings(rows=table.num_rows)
    checked = pa.table(
        {
            step.name: prepare_column(table.column(step.name), step.input_spec(), (), found)
            for step in released.plan.steps
        }
    )
    scores = released.predict(checked)
    rejected = found.rejected if found.rejected is not None else np.zeros(len(scores), bool)
    score = pa.array(scores, type=pa.float32(), mask=rejected)
    passed = {c: table.column(c) for c in keep} or {"row": pa.array(range(1, len(scores) + 1))}
    write_table(out, pa.table({**passed, "score": score}))
    return Scored(
        rows=table.num_rows,
        scored=int(len(scores) - rejected.sum()),
        out=out,
        passed_through=tuple(passed),
        not_scored=tuple(found.violations),
        cleaned={c: dict(a) for c, a in found.cleaned.items()},
    )
