"""Scores of a trained model on in-memory rows, inside the zone: ``predict_proba``.

Scores on private rows are not a release: they go through ``privacy.dp_metrics``. (Scoring
a released model outside the zone is ``training.predict``.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from foundation.errors import SpecError

#: rows per forward pass in ``predict_proba``: bounds activation memory (64k rows x a
#: 4096-wide layer is 1 GiB of float32) while keeping per-call overhead negligible
PREDICT_BATCH_ROWS = 65_536


def predict_proba(model: nn.Module, X: torch.Tensor | np.ndarray) -> np.ndarray:
    """P(label = 1) for each row of ``X`` as a float64 array, on the model's device.

    Not a release by itself: scores on private rows go through ``privacy.dp_metrics``.
    """
    param = next(model.parameters(), None)
    if param is None:
        raise SpecError("model", "has no parameters")
    X = torch.as_tensor(X)
    was_training = model.training
    model.eval()
    parts: list[np.ndarray] = []
    try:
        with torch.inference_mode():
            for start in range(0, X.shape[0], PREDICT_BATCH_ROWS):
                chunk = X[start : start + PREDICT_BATCH_ROWS].to(
                    device=param.device, dtype=param.dtype
                )
                logits = model(chunk)
                if logits.dim() != 2 or logits.shape[1] != 1:
                    raise SpecError("model", "must output one logit per row", "use n_outputs=1")
                parts.append(torch.sigmoid(logits[:, 0]).double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
