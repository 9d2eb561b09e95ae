"""Attack: make a free run draw the charged run's noise, then subtract the two models.

Before each run had a secret of its own, DP-SGD's noise and Poisson sample were seeded from
the zone's secret and the spec's hash: a free dry run of the same spec (``submit --on dummy``,
every point of ``quote --curve``) drew exactly the charged job's noise, and subtracting the
two released models cancelled it (the clipped gradient sums, and from them exact counts,
came out bare).

The attack here, through the installed CLI: the same spec run twice for free on the same
dummy rows, and once charged on the real rows. With one step over everyone (sample rate 1,
so no sampling randomness is left) two runs that shared their noise would release the SAME
model; with fresh noise per run the two free models differ by exactly the DP noise, whose
scale the plan states: the difference must look like noise of that scale, not like zero.
The charged model, differenced against its free twin, likewise keeps a noise-sized residual.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_runner import ok, sandbox

pytestmark = pytest.mark.ray

PATIENTS = 2000
FEATURES = ["age", "sex", "dx_chapter", "diabetes", "chf", "hba1c", "creatinine"]
LR = 1.0
CLIP = 1.0


def _zone(root: Path) -> str:
    """Set-up not under attack, in-process (each CLI start costs seconds)."""
    from sandbox.backend import InProcessBackend
    from sandbox.service import Service

    svc, op = Service.init_zone(root, InProcessBackend())
    operator = svc.authenticate(op)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, rita = svc.authenticate(st), svc.authenticate(rt)
    svc.ingest_demo(steward, "cohort", PATIENTS, seed=5)
    svc.create_project(rita, "readmission", "risk")
    req = svc.request_access(
        rita, "readmission", "cohort", [*FEATURES, "readmitted_30d"], ["dp-sgd"], 2.0, 1e-5
    )
    svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=5))
    svc.close()
    return rt


def _spec(path: Path, batch_size: int) -> Path:
    feats = ", ".join(f'"{f}"' for f in FEATURES)
    path.write_text(
        f"""project = "readmission"
dataset = "cohort"
label = "readmitted_30d"
features = [{feats}]
[model]
kind = "logistic"
hidden = []
[privacy]
epsilon = 0.5
delta = 1e-6
max_grad_norm = {CLIP}
[training]
epochs = 1
batch_size = {batch_size}
lr = {LR}
optimizer = "sgd"
seed = 7
[resources]
gpus = 0
""",
        encoding="utf-8",
    )
    return path


def _weights(zone: Path, token: str, job: str, out: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    ok(sandbox("jobs", "result", job, "--out", str(out), "--json", zone=zone, token=token))
    tensors = load_file(str(out / "model.safetensors"))
    return np.concatenate([tensors[k].ravel() for k in sorted(tensors)]).astype(np.float64)


def test_free_twins_never_share_the_charged_runs_noise(tmp_path: Path, ray_local: Any) -> None:
    zone = tmp_path / "zone"
    rita = _zone(zone)
    # the CLI attaches to the test session's Ray (a cluster by address, as an operator's
    # would be) rather than starting one per command
    ray = ("--ray-address", ray_local.get_runtime_context().gcs_address)
    # (nearly) everyone in one batch, from the quote's training-split estimate (the demo's
    # counts are public); 95% so that the exact split is never smaller than the batch
    quote = ok(
        sandbox(
            "quote",
            str(_spec(tmp_path / "q.toml", 64)),
            "--out",
            str(tmp_path / "q"),
            "--json",
            zone=zone,
            token=rita,
        )
    )
    n_train = int(quote["n_train_estimate"])
    spec = _spec(tmp_path / "job.toml", int(0.95 * n_train))

    twins = []
    for i in range(2):
        rec = ok(
            sandbox("submit", str(spec), "--on", "dummy", *ray, "--json", zone=zone, token=rita)
        )
        assert rec["state"] == "succeeded"
        plan = rec["result"]["plan"]
        twins.append((_weights(zone, rita, rec["id"], tmp_path / f"twin{i}"), plan))
    charged = ok(sandbox("submit", str(spec), *ray, "--json", zone=zone, token=rita))
    assert charged["state"] == "succeeded"
    w_real = _weights(zone, rita, charged["id"], tmp_path / "real")

    (w1, plan), (w2, _) = twins
    # a step or two over (nearly) the whole training split: each SGD step adds -lr/B (sum +
    # noise), and the noise of k steps adds up to sqrt(k) times one step's
    steps = int(plan["steps"])
    assert steps <= 2
    sigma = float(plan["noise_multiplier"])
    expected_batch = float(plan["sample_rate"]) * n_train
    noise_sd = math.sqrt(steps) * LR * sigma * CLIP / expected_batch
    diff = w1 - w2
    # shared noise would make the two free models identical, coordinate for coordinate
    assert np.count_nonzero(diff == 0.0) == 0
    # what is left is the difference of two independent noise draws, sd = sqrt(2) * noise_sd
    # (plus a little from the two Poisson samples, which differ in ~5% of the rows)
    measured = float(np.std(diff))
    assert 0.5 < measured / (math.sqrt(2) * noise_sd) < 3.0, (measured, noise_sd)
    # the charged model minus its free twin keeps at least that much noise: nothing cancels
    residual = w_real - w1
    assert float(np.std(residual)) > 0.5 * math.sqrt(2) * noise_sd
