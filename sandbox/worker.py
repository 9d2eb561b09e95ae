"""What runs on a Ray worker for one DP-SGD job.

The worker gets a payload the service built after policy allowed the job and the ledger
reserved its epsilon, with the service's plan (``PLAN_KEY``: noise multiplier, sample rate,
steps, evaluation noise; ``privacy.job_plan.plan_job``). It opens the dataset through
``connectors`` only (the handle carries the job id as its authorization and records
``data_opened`` before the first row is read), trains with DP-SGD (``training``) exactly as
planned, evaluates with a DP histogram (``privacy.dp_metrics``), and writes the artefacts
into the job's folder inside the zone. It does not plan: it runs the plan and reports what
it ran (``DpsgdResult.run``). The service checks that report against its plan and charges
the plan's epsilon (``sandbox.mechanisms.plans``); only then may anything be released.

It never prints or logs a row value: its result holds only DP outputs and plan figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.errors import IntegrityError, SpecError
from sandbox.results import DpsgdResult

#: share of the job's epsilon spent on the DP evaluation histogram: DP-SGD's accuracy barely
#: moves between 0.8 and 0.9 of the budget, while the evaluation's noise halves from 0.1 to 0.2
EVAL_SHARE = 0.2


#: payload key of the per-run noise secret (hex); the service makes it, nothing returns it
NOISE_SECRET_KEY = "noise_secret"
#: payload key of the service's plan (``plan_job(...).to_dict()``); None when the service
#: could not plan for a private size, and then ``PLAN_ERROR_KEY`` holds the error to raise
#: after reading (a refusal before reading would be a free oracle on the exact size)
PLAN_KEY = "plan"
PLAN_ERROR_KEY = "plan_error"


def new_noise_secret() -> str:
    """A fresh secret for one run (job, dry run, quote point or retry), from OS randomness."""
    import secrets

    return secrets.token_hex(32)


def noise_seed(payload: dict[str, Any], label: str) -> int:
    """A 63-bit seed for ``label`` (``"dp-sgd"``, ``"eval"``, ``"synth"``) from the run's secret.

    The secret is made by the service for this run alone and never leaves the zone, so two
    runs of the same spec (a charged job and its free dry run, a retry) never share noise:
    subtracting one model from another cannot cancel the Gaussian noise.
    """
    import hashlib
    import hmac

    secret = payload.get(NOISE_SECRET_KEY)
    if not isinstance(secret, str) or len(secret) < 32:
        raise IntegrityError("the job has no noise secret; the service makes one for every run")
    digest = hmac.new(bytes.fromhex(secret), f"dp-noise:{label}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def run_dpsgd_job(payload: dict[str, Any]) -> DpsgdResult:
    # heavy imports live here: this runs in a Ray worker process
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from connectors.dataset_handle import DatasetHandle
    from connectors.preprocess import FeaturePlan
    from connectors.reader import Split, load_split
    from connectors.schema import SchemaContract
    from foundation.engine_env import configure_engine_env
    from foundation.sql import make_engine
    from privacy.accountant import GaussianStep, dpsgd_epsilon
    from privacy.dp_metrics import dp_binary_metrics
    from sandbox.jobs import JobStore
    from sandbox.jobspec import parse_stored_spec
    from sandbox.spec_fields import resolved
    from training.dpsgd_config import Device, DPSGDConfig, EpochProgress
    from training.models import build_model
    from training.scoring import predict_proba
    from training.trainer import train_dpsgd

    # DP noise and the Poisson draws come from the run's own secret, never from the spec:
    # the researcher knows the spec's seed, and a free dry run of the same spec must not
    # draw the charged job's noise (differencing the two would cancel it). Checked first:
    # a payload without its secret never reaches the data.
    dp_seed = noise_seed(payload, "dp-sgd")
    zone_root = Path(payload["zone_root"])
    configure_engine_env(zone_root)
    job_id: str = payload["job_id"]
    jobs = JobStore(make_engine(payload["db_url"]))

    # the payload's spec is the stored form (a payload queued before training.optimizer
    # existed meant SGD)
    spec = parse_stored_spec(payload["spec"])
    # the service resolved every "auto" hyperparameter before it planned the job: one still
    # "auto" is refused here, before a row is read
    batch_size = resolved(spec.training.batch_size, "training.batch_size")
    lr = resolved(spec.training.lr, "training.lr")
    max_grad_norm = resolved(spec.privacy.max_grad_norm, "privacy.max_grad_norm")
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
    X_train, y_train = load_split(handle, plan, spec.label, Split.TRAIN, seed=seed)
    X_test, y_test = load_split(handle, plan, spec.label, Split.TEST, seed=seed)
    n_train = int(X_train.shape[0])
    dp = _payload_plan(payload)
    if n_train < batch_size:
        raise SpecError(
            "training.batch_size",
            "is larger than the training split",
            "lower batch_size (the dataset card shows the person count)",
        )

    want_gpu = spec.resources.gpus > 0
    device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
    model = build_model(spec.model, plan.n_outputs, seed=seed)
    cfg = DPSGDConfig(
        sample_rate=dp.sample_rate,
        steps=dp.steps,
        steps_per_epoch=dp.steps_per_epoch,
        lr=lr,
        optimizer=spec.training.optimizer,
        weight_decay=spec.training.weight_decay,
        max_grad_norm=max_grad_norm,
        noise_multiplier=dp.noise_multiplier,
        seed=dp_seed,
        device=Device(device),
    )

    def on_epoch(p: EpochProgress) -> None:
        # the loss is a function of the private data: it stays in the zone's job record
        # (never shown to the researcher), only the epoch counter is progress
        jobs.set_progress(
            job_id, {"epoch": p.epoch, "epochs": p.epochs, "step": p.step, "steps": p.steps}
        )

    result = train_dpsgd(model, X_train, y_train, cfg, progress=on_epoch)
    model = model.to("cpu")

    rng = np.random.default_rng(noise_seed(payload, "eval"))
    training = GaussianStep(result.noise_multiplier, result.sample_rate, result.steps_taken)
    # a skipped evaluation (privacy.evaluate = false) releases nothing and is not charged;
    # a dry run still evaluates: its test rows are dummy or already-released synthetic rows
    # (no noise needed, nothing charged) and its figures are what a quote's curve plots
    dry_run = bool(payload.get("dry_run"))
    metrics: dict[str, Any] = {}
    if dp.eval_sigma is not None or dry_run:
        scores = predict_proba(model, X_test)
        eval_sigma = 0.0 if dry_run or dp.eval_sigma is None else dp.eval_sigma
        # every figure comes with its 95% interval and the unreliable flag (dp_metrics)
        metrics = dp_binary_metrics(scores, y_test.numpy(), eval_sigma, rng).to_dict()
    released_sigma = None if dry_run else dp.eval_sigma
    evaluation = None if released_sigma is None else GaussianStep(released_sigma, 1.0, 1)
    # the worker's own figure travels for display only: the service charges its plan's
    epsilon_spent = dpsgd_epsilon(training, evaluation, spec.privacy.delta, dp.composition)

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
    # no timings in the result: how long training took depends on the data (docs/privacy-model.md)
    return DpsgdResult(
        # a dry run (dummy or released synthetic data) touched no real row and charges nothing
        dry_run=payload.get("dry_run"),
        epsilon=epsilon_spent,
        delta=spec.privacy.delta,
        plan=dict(payload[PLAN_KEY]),
        steps_taken=result.steps_taken,
        epochs_done=result.epochs_done,
        clipping=result.clipping,
        device=result.device,
        evaluation="skipped" if dp.eval_sigma is None and not dry_run else "dp-histogram",
        metrics=metrics,
        n_features=plan.n_outputs,
        feature_names=list(plan.output_names),
        # what ran, as the trainer and the evaluation used it: the service checks each figure
        run={
            "noise_multiplier": result.noise_multiplier,
            "sample_rate": result.sample_rate,
            "steps": result.steps_taken,
            "max_grad_norm": cfg.max_grad_norm,
            "eval_sigma": released_sigma,
            "delta": spec.privacy.delta,
        },
    )


def _payload_plan(payload: dict[str, Any]) -> _Plan:
    """The service's plan from the payload, read after the rows were (so a plan the service
    could not make for a private size fails charged, like a batch larger than the split)."""
    plan = payload.get(PLAN_KEY)
    if plan is None:
        error = payload.get(PLAN_ERROR_KEY)
        if isinstance(error, dict):
            raise SpecError(str(error["field"]), str(error["problem"]), str(error.get("fix", "")))
        raise IntegrityError("the job has no plan from the service; the worker does not plan")
    eval_sigma = plan["eval_sigma"]
    return _Plan(
        noise_multiplier=float(plan["noise_multiplier"]),
        sample_rate=float(plan["sample_rate"]),
        steps=int(plan["steps"]),
        steps_per_epoch=int(plan["steps_per_epoch"]),
        eval_sigma=None if eval_sigma is None else float(eval_sigma),
        composition=str(plan.get("composition", "sequential")),
    )


@dataclass(frozen=True)
class _Plan:
    """The planned figures a worker runs (``plan_job(...).to_dict()``'s; nothing is
    recomputed here)."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    #: None: no evaluation release is planned (``privacy.evaluate = false``)
    eval_sigma: float | None
    #: how training and the evaluation compose (``privacy.accountant.Composition``)
    composition: str = "sequential"
