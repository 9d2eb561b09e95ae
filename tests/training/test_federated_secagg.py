"""SecAgg+ (Flower's legacy path) gives the plain fixed-order average, up to quantisation.

Why the tolerance. One round from the same initial model: every site trains exactly as
without SecAgg+ (same secret-seeded noise), so only the aggregation differs. Flower's
SecAgg+ (clipping range c = 8, Q = 2^22 levels) has each site i send
``quantize(r'_i * x_i)`` with ``r'_i = round(Q n_i / max_n) / Q`` and stochastic rounding
(an error of less than one level, 2c/Q, per coordinate), and the server divides the
unmasked sum by ``sum_i r'_i``. So, per coordinate, against the exact n-weighted average:

* rounding: |error| < m (2c/Q) / sum_i r'_i for m sites;
* the weights r'_i differ from n_i / max_n by at most 1/(2Q) each, which moves the average
  by at most (m / (2Q)) * 2c / sum_i r'_i (|x| <= c after clipping);
* the float32 cast of a value of size <= c: half a unit in the last place, 2^-24 * c.

Summed: tol = 2 m (2c/Q) / sum_i r'_i + 2^-24 c (about 1e-5 here). A wrong mask, a wrong
weight or a dropped site would be off by orders of magnitude more.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federated_harness.reference import run_reference

from connectors.cohort import cohort_contract, generate_cohort
from connectors.ingest import ingest_table
from training.federated.config import FederatedConfig
from training.federated.payload import FederatedPayload
from training.federated.weights import load_weights
from training.models import ModelConfig

SITES = ("hospital-a", "hospital-b", "hospital-c")
CLIP_RANGE, LEVELS = 8.0, 2**22  # SecAggPlusWorkflow's defaults, which server.py uses


def secagg_tolerance(ns: list[int]) -> float:
    m, top = len(ns), max(ns)
    ratio_sum = sum(round(LEVELS * n / top) / LEVELS for n in ns)
    step = 2 * CLIP_RANGE / LEVELS
    return 2 * m * step / ratio_sum + 2.0**-24 * CLIP_RANGE


# slow: two federated simulations, plain and SecAgg+ (~75 s); CI runs it (make test-slow)
@pytest.mark.slow
@pytest.mark.ray
def test_secagg_gives_the_plain_model_within_quantisation(tmp_path: Path, ray_local: Any) -> None:
    from training.federated.simulation import run_federated_simulation

    contract = cohort_contract()
    ingest_table(generate_cohort(3000, seed=11), contract, tmp_path / "ds", secrets.token_bytes(32))
    config = FederatedConfig(
        rounds=1,
        sites=SITES,
        label="readmitted_30d",
        features=(
            "age",
            "sex",
            "diabetes",
            "hba1c",
            "creatinine",
            "prior_admissions",
            "length_of_stay",
        ),
        model=ModelConfig("mlp", (16,)),
        epsilon=1.0,
        delta=1e-6,
        max_grad_norm=1.0,
        batch_size=64,
        lr=0.5,
        seed=3,
        secure_aggregation=True,
    )
    payload = FederatedPayload(
        job_id="job-secagg",
        dataset="cohort",
        dataset_path=tmp_path / "ds",
        contract=contract,
        config=config,
        out_dir=tmp_path / "out",
        noise_secret_hex=secrets.token_hex(32),
    )
    path = payload.write(tmp_path / "payload.json")
    result = run_federated_simulation(path, timeout_s=240, zone_dir=tmp_path / "zone")
    summary = json.loads(result.summary_path.read_text())
    assert summary["status"] == "completed" and summary["secure_aggregation"] is True
    (line,) = [json.loads(x) for x in result.rounds_path.read_text().splitlines()]
    assert line["trained"] == list(SITES)
    secure = load_weights(result.weights_path)
    plain = run_reference(path)  # the same sites, the same local models, plain average
    tol = secagg_tolerance([summary["sites"][s]["n"] for s in SITES])
    assert 1e-6 < tol < 1e-4
    worst = max(float(np.max(np.abs(secure[k] - plain[k]))) for k in plain)
    assert worst <= tol, (worst, tol)
    # and the site's privacy figures do not depend on how the server adds the models
    for site in SITES:
        assert summary["sites"][site]["epsilon"] <= config.epsilon
