"""What runs on a Ray worker for one DP-SGD job.

The worker gets a payload the service built after policy allowed the job and the ledger
reserved its epsilon. It opens the dataset through ``connectors`` only (the handle carries
the job id as its authorization and records ``data_opened`` before the first row is read),
trains with DP-SGD (``training``), evaluates with a DP histogram (``privacy.dp_metrics``),
and writes the artefacts into the job's folder inside the zone. It returns the accountant's
figures; the service commits them to the ledger and only then may anything be released.

It never prints or logs a row value: its result holds only DP outputs and plan figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from connectors.errors import SpecError

#: share of the job's epsilon spent on the DP evaluation histogram: DP-SGD's accuracy barely
#: moves between 0.8 and 0.9 of the budget, while the evaluation's noise halves from 0.1 to 0.2
EVAL_SHARE = 0.2


def derive_noise_seed(zone_root: Path, label: str) -> int:
    """A 63-bit seed from the zone's secret: replayable inside the zone, unguessable outside."""
    import hashlib
    import hmac

    secret = (zone_root / "secret.key").read_bytes()
    digest = hmac.new(secret, f"dp-noise:{label}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def run_dpsgd_job(payload: dict[str, Any]) -> dict[str, Any]:
    # heavy imports live here: this runs in a Ray worker process
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from connectors.engine_env import configure_engine_env
    from connectors.preprocess import FeaturePlan
    from connectors.reader import DatasetHandle, Split, load_split
    from connectors.schema import SchemaContract
    from privacy.accountant import GaussianStep, epsilon_for, plan_dpsgd
    from privacy.dp_metrics import dp_binary_metrics
    from privacy.sql import make_engine
    from sandbox.jobs import JobState, JobStore
    from sandbox.jobspec import parse_job_spec
    from training.models import build_model
    from training.trainer import DPSGDConfig, EpochProgress, predict_proba, train_dpsgd

    zone_root = Path(payload["zone_root"])
    configure_engine_env(zone_root)
    job_id: str = payload["job_id"]
    jobs = JobStore(make_engine(payload["db_url"]))
    jobs.move(job_id, JobState.RUNNING)

    spec = parse_job_spec(payload["spec"])
    contract = SchemaContract.from_dict(payload["contract"])
    plan = FeaturePlan.from_contract(contract, spec.features)
    handle = DatasetHandle(
        name=spec.dataset,
        path=Path(payload["dataset_path"]),
        contract=contract,
        authorization=job_id,
        on_open=lambda: jobs.mark_data_opened(job_id),
    )
    seed = spec.training.seed
    # DP noise (and the Poisson draws) must be unpredictable to the researcher, who knows
    # the spec's seed: derive them from the zone's secret and the spec. The same spec in the
    # same zone replays exactly (an operator can reproduce a release); no one outside can.
    noise_seed = derive_noise_seed(zone_root, spec.spec_hash())
    X_train, y_train = load_split(handle, plan, spec.label, Split.TRAIN, seed=seed)
    X_test, y_test = load_split(handle, plan, spec.label, Split.TEST, seed=seed)
    n_train = int(X_train.shape[0])
    if n_train < spec.training.batch_size:
        raise SpecError(
            "training.batch_size",
            "is larger than the training split",
            "lower batch_size (the dataset card shows the person count)",
        )

    dp = plan_dpsgd(
        spec.privacy.epsilon,
        spec.privacy.delta,
        n_train,
        spec.training.batch_size,
        spec.training.epochs,
        eval_share=EVAL_SHARE,
    )
    want_gpu = spec.resources.gpus > 0
    device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
    model = build_model(spec.model, plan.n_outputs, seed=seed)
    cfg = DPSGDConfig(
        sample_rate=dp.sample_rate,
        steps=dp.steps,
        steps_per_epoch=dp.steps_per_epoch,
        lr=spec.training.lr,
        max_grad_norm=spec.privacy.max_grad_norm,
        noise_multiplier=dp.noise_multiplier,
        seed=noise_seed,
        device=device,
    )

    def on_epoch(p: EpochProgress) -> None:
        # the loss is a function of the private data: it stays in the zone's job record
        # (never shown to the researcher), only the epoch counter is progress
        jobs.set_progress(
            job_id, {"epoch": p.epoch, "epochs": p.epochs, "step": p.step, "steps": p.steps}
        )

    result = train_dpsgd(model, X_train, y_train, cfg, progress=on_epoch)
    model = model.to("cpu")

    scores = predict_proba(model, X_test)
    rng = np.random.default_rng([noise_seed, 1])
    # a dry run's test rows are dummy or already-released synthetic rows: no noise needed
    eval_sigma = 0.0 if payload.get("dry_run") else dp.eval_sigma
    metrics = dp_binary_metrics(scores, y_test.numpy(), eval_sigma, rng)

    history = [
        GaussianStep(dp.noise_multiplier, dp.sample_rate, result.steps_taken),
        GaussianStep(dp.eval_sigma, 1.0, 1),
    ]
    epsilon_spent = epsilon_for(history, spec.privacy.delta)

    out = zone_root / "jobs" / job_id
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(
        state,
        str(out / "model.safetensors"),
        metadata={
            "model": json.dumps({"kind": str(spec.model.kind), "hidden": list(spec.model.hidden)})
        },
    )
    (out / "preprocessing.json").write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
    # no timings in the result: how long training took depends on the data (PRIVACY.md)
    return {
        "kind": "dp-sgd",
        # a dry run (dummy or released synthetic data) touched no real row and charges nothing
        "dry_run": payload.get("dry_run"),
        "epsilon": epsilon_spent,
        "delta": spec.privacy.delta,
        "plan": dp.to_dict(),
        "steps_taken": result.steps_taken,
        "epochs_done": result.epochs_done,
        "clipping": result.clipping,
        "device": result.device,
        "metrics": metrics.to_dict(),
        "n_features": plan.n_outputs,
        "feature_names": list(plan.output_names),
    }
