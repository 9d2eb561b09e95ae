"""Use a released model outside the zone: one call scores new rows.

A release folder holds ``model.safetensors`` (weights and the model config in its metadata),
``preprocessing.json`` (the feature plan, parameters from the schema contract) and
``model_card.json``. ``ReleasedModel.load(DIR).predict(table)`` applies the same
preprocessing as training and returns probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from connectors.external import read_user_table, write_table
from connectors.ingest_checks import prepare_column
from connectors.ingest_findings import Findings, Violation
from connectors.preprocess import FeaturePlan
from foundation.errors import SchemaError, SpecError
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
