"""What one site (hospital) does in a federated job, with no Flower and no Ray in sight.

The Flower ClientApp (``client.py``) and the in-process reference loop (``reference.py``)
both call these functions, so the reference runs exactly the simulation's local training.

Privacy, per site (patient-level, add/remove one person, RDP accountant):

* **Setup** reads the site's training split once to count its persons ``n`` (a public
  figure, like the dataset card's rows per site: ``dataset_summary`` publishes the same
  counts from the footer) and calibrates one plan with ``privacy.accountant.plan_dpsgd``
  for ``rounds x local_epochs`` epochs of DP-SGD on ``n`` persons plus one DP evaluation
  release (``EVAL_SHARE`` of the budget). A site in every round therefore ends at or
  below ``epsilon``; sampling of sites is public, so no amplification is claimed for it.
* **Each round** takes ``steps_per_round`` DP-SGD steps (Poisson sampling, per-person
  clipping, Gaussian noise; ``training.trainer.train_dpsgd``) with the plan's noise, each
  privatized gradient applied by the job's optimizer (``config.optimizer``: Adam, AdamW or
  SGD; post-processing, started afresh each round from the global model). The
  site's spend so far (``SiteLedger``: steps and evaluations) travels between rounds in
  Flower's ``context.state`` (docs/engines.md: a fresh accountant per round under-reports) and
  its epsilon is always ``epsilon_for`` over the whole history. Before it opens any row a
  site checks that the round (and the evaluation still to come) fits its budget, and
  refuses to train if not.
* **Failure**: a site that raises after it opened its data is charged the round as
  planned (the zone's rule: touching data spends); one that failed before is not.
* **Evaluation** of the final global model on the site's test split: one noisy histogram
  (``training.federated.metrics``), charged as ``GaussianStep(eval_sigma, 1.0, 1)``. With
  ``evaluate`` off (the spec's ``privacy.evaluate = false``) the plan has no evaluation
  (``eval_sigma`` None, no ``EVAL_SHARE``: the whole budget goes to DP-SGD), nothing is
  reserved for it and a site asked to evaluate refuses without reading a row.

Randomness: every DP draw is seeded from the job's secret mixed with the site name, the
round and the purpose (``payload.derive_seed``); the public seed only fixes the initial
model and the train/test split. The training loss of a site is never returned.

The plan and the ledger themselves (``SitePlan``, ``SiteLedger``, ``make_plan``) are
``site_plan.py``'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import SpecError, ZoneError
from training.federated.payload import FederatedPayload, derive_seed
from training.federated.site_plan import SiteLedger, SitePlan, make_plan


class SiteStatus(StrEnum):
    """What a site's step ended in."""

    #: setup done: the site has a plan and takes part
    READY = "ready"
    #: left out before training (too few persons, or no plan reaches its budget)
    EXCLUDED = "excluded"
    #: trained this round and sent its model
    TRAINED = "trained"
    #: released its evaluation histogram
    EVALUATED = "evaluated"
    #: did not train: the round would take it over its budget (no row was read)
    REFUSED = "refused"
    #: raised; ``touched`` says whether it had opened its rows first
    FAILED = "failed"


@dataclass(frozen=True)
class SiteSetup:
    site: str
    status: SiteStatus
    plan: SitePlan | None
    touched: bool
    #: why the site is left out or failed; names fields and sites, never a value
    reason: str = ""


@dataclass(frozen=True)
class TrainOutcome:
    site: str
    status: SiteStatus
    ledger: SiteLedger
    touched: bool
    #: the site's model after local training (None unless TRAINED)
    state: dict[str, np.ndarray] | None = field(default=None, repr=False)
    reason: str = ""


@dataclass(frozen=True)
class EvalOutcome:
    site: str
    status: SiteStatus
    ledger: SiteLedger
    touched: bool
    #: the noisy (2, bins) histogram (None unless EVALUATED)
    histogram: np.ndarray | None = field(default=None, repr=False)
    metrics: dict[str, Any] | None = None
    reason: str = ""


def _reason(exc: BaseException) -> str:
    # our errors name fields and sites only; anything else may quote a value: type only
    if isinstance(exc, ZoneError):
        return str(exc)
    return f"unexpected {type(exc).__name__} in the site's code"


@contextlib.contextmanager
def _torch_threads(num_cpus: float) -> Iterator[None]:
    """Run with as many torch threads as the site's CPUs: matmul results depend on the
    thread count, and Ray gives an actor OMP_NUM_THREADS = its CPUs, so the in-process
    reference must use the same number to get bit-identical models."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Reader:
    """Opens one site's rows through ``connectors`` only, and remembers if it did."""

    def __init__(self, payload: FederatedPayload, site: str, data_path: Path | None) -> None:
        from connectors.dataset_handle import DatasetHandle
        from connectors.preprocess import FeaturePlan

        self.payload = payload
        self.site = site
        self.plan = FeaturePlan.from_contract(payload.contract, payload.config.features)
        self.handle = DatasetHandle(
            name=payload.dataset,
            path=data_path if data_path is not None else payload.data_path(site),
            contract=payload.contract,
            authorization=payload.job_id,
        )

    @property
    def touched(self) -> bool:
        return self.handle.opened

    def split(self, part: str) -> tuple[Any, Any]:
        from connectors.reader import Split, load_split

        cfg = self.payload.config
        # sites=[site] even on a site's own file: a file holding other sites' rows by mistake
        # still yields only this site's persons
        return load_split(
            self.handle, self.plan, cfg.label, Split(part), seed=cfg.seed, sites=[self.site]
        )


def _check_site(payload: FederatedPayload, site: str) -> None:
    if site not in payload.config.sites:
        raise SpecError("site", f"{site!r} is not one of the job's sites", "check the node config")


def setup_site(payload: FederatedPayload, site: str, data_path: Path | None = None) -> SiteSetup:
    """Count the site's training persons and plan its DP-SGD, or leave it out (and say why)."""
    reader: _Reader | None = None
    try:
        _check_site(payload, site)
        reader = _Reader(payload, site, data_path)
        X, _ = reader.split("train")
        n = int(X.shape[0])
        cfg = payload.config
        if n < cfg.min_site_rows:
            return SiteSetup(
                site,
                SiteStatus.EXCLUDED,
                None,
                reader.touched,
                f"site {site!r} has fewer training persons than federated.min_site_rows "
                f"({cfg.min_site_rows}); it is left out of the job",
            )
        if n < cfg.batch_size:
            return SiteSetup(
                site,
                SiteStatus.EXCLUDED,
                None,
                reader.touched,
                f"site {site!r} has fewer training persons than federated.batch_size "
                f"({cfg.batch_size}); it is left out (lower batch_size to include it)",
            )
        try:
            plan = make_plan(payload, site, n)
        except SpecError as exc:  # e.g. delta >= 1/n, or no noise reaches the budget
            return SiteSetup(
                site,
                SiteStatus.EXCLUDED,
                None,
                reader.touched,
                f"site {site!r} is left out: {exc}",
            )
        return SiteSetup(site, SiteStatus.READY, plan, reader.touched)
    except Exception as exc:  # a site's failure must not stop the others
        touched = reader.touched if reader is not None else False
        return SiteSetup(site, SiteStatus.FAILED, None, touched, _reason(exc))


def _model(payload: FederatedPayload, state: Mapping[str, np.ndarray]) -> Any:
    from connectors.preprocess import FeaturePlan
    from training.federated.weights import load_state
    from training.models import build_model

    cfg = payload.config
    n_inputs = FeaturePlan.from_contract(payload.contract, cfg.features).n_outputs
    model = build_model(cfg.model, n_inputs, seed=cfg.seed)
    load_state(model, state)
    return model


def initial_state(payload: FederatedPayload) -> dict[str, np.ndarray]:
    """The global model before round 1: ``build_model`` with the public seed."""
    from connectors.preprocess import FeaturePlan
    from training.federated.weights import model_state
    from training.models import build_model

    cfg = payload.config
    n_inputs = FeaturePlan.from_contract(payload.contract, cfg.features).n_outputs
    return model_state(build_model(cfg.model, n_inputs, seed=cfg.seed))


def _device(payload: FederatedPayload) -> Any:
    import torch

    from training.dpsgd_config import Device

    use_gpu = payload.config.num_gpus > 0 and torch.cuda.is_available()
    return Device.CUDA if use_gpu else Device.CPU


def _local_training(
    payload: FederatedPayload, plan: SitePlan, server_round: int, model: Any, X: Any, y: Any
) -> None:
    import torch

    from training.dpsgd_config import DPSGDConfig, Optimizer
    from training.trainer import make_optimizer, train_dpsgd

    cfg = payload.config
    device = _device(payload)

    def config(steps: int, seed: int, steps_per_epoch: int) -> DPSGDConfig:
        return DPSGDConfig(
            sample_rate=plan.sample_rate,
            steps=steps,
            lr=cfg.lr,
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=plan.noise_multiplier,
            seed=seed,
            device=device,
            steps_per_epoch=steps_per_epoch,
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
        )

    fedprox = cfg.mu != 0
    optimizer = None
    if fedprox and cfg.optimizer is not Optimizer.SGD:
        # FedProx's one-step calls (below) share one optimizer, so Adam's moments run over
        # the round: a fresh Adam in every call would take sign-like steps of size lr
        optimizer = make_optimizer(list(model.parameters()), config(1, 0, 1))

    def run(steps: int, seed: int, steps_per_epoch: int) -> None:
        train_dpsgd(model, X, y, config(steps, seed, steps_per_epoch), optimizer=optimizer)

    if not fedprox:
        run(
            plan.steps_per_round,
            derive_seed(payload.secret, "train", plan.site, server_round),
            plan.steps_per_epoch,
        )
        return
    # FedProx: after each DP-SGD step, the proximal operator of mu/2 ||w - w_global||^2,
    # w <- w_global + (w - w_global) / (1 + lr mu). It uses only the public global model and
    # the step's DP output, so it is post-processing: the privacy cost is the DP-SGD steps'.
    # train_dpsgd has no per-step hook, so the steps run one call each (each with its own
    # secret-derived seed; the same Poisson sampling and noise law as one long call).
    anchor = [p.detach().clone().to(device) for p in model.parameters()]
    shrink = 1.0 / (1.0 + cfg.lr * cfg.mu)
    for step in range(plan.steps_per_round):
        run(1, derive_seed(payload.secret, "train", plan.site, server_round, step), 1)
        with torch.no_grad():
            for p, a in zip(model.parameters(), anchor, strict=True):
                p.sub_(a).mul_(shrink).add_(a)


def train_round(
    payload: FederatedPayload,
    plan: SitePlan,
    ledger: SiteLedger,
    server_round: int,
    global_state: Mapping[str, np.ndarray],
    data_path: Path | None = None,
) -> TrainOutcome:
    """One round of local DP-SGD from ``global_state``; returns the site's model and spend."""
    from training.federated.weights import check_like, model_state

    site = plan.site
    after = replace(
        ledger, train_steps=ledger.train_steps + plan.steps_per_round, rounds=ledger.rounds + 1
    )
    # the evaluation still to come is reserved too, so training can never crowd it out
    if not plan.fits(after.train_steps, max(ledger.evals, 1 if plan.evaluates else 0)):
        return TrainOutcome(
            site,
            SiteStatus.REFUSED,
            ledger,
            False,
            reason=f"site {site!r} would exceed its epsilon budget ({plan.target_epsilon:g}) "
            "with another round; it stops training",
        )
    reader: _Reader | None = None
    try:
        _check_site(payload, site)
        reader = _Reader(payload, site, data_path)
        X, y = reader.split("train")
        if payload.config.plan_size(site, int(X.shape[0])) != plan.n_train:
            raise SpecError(
                "site", f"site {site!r}'s plan is not the one its payload and split make"
            )
        model = _model(payload, global_state)
        with _torch_threads(payload.config.num_cpus):
            _local_training(payload, plan, server_round, model, X, y)
        state = model_state(model.to("cpu"))
        check_like(state, global_state, "site model")
        return TrainOutcome(site, SiteStatus.TRAINED, after, True, state=state)
    except Exception as exc:
        touched = reader.touched if reader is not None else False
        # opened its rows, then failed: charged as planned (touching data spends)
        return TrainOutcome(
            site, SiteStatus.FAILED, after if touched else ledger, touched, reason=_reason(exc)
        )


def evaluate_site(
    payload: FederatedPayload,
    plan: SitePlan,
    ledger: SiteLedger,
    global_state: Mapping[str, np.ndarray],
    data_path: Path | None = None,
) -> EvalOutcome:
    """The DP evaluation of ``global_state`` on the site's test split (one noisy histogram)."""
    from training.federated.metrics import site_evaluation
    from training.scoring import predict_proba

    site = plan.site
    if not plan.evaluates:
        # the job runs no evaluation (privacy.evaluate = false): nothing read, nothing charged
        return EvalOutcome(
            site,
            SiteStatus.REFUSED,
            ledger,
            False,
            reason=f"site {site!r} runs no evaluation in this job (privacy.evaluate = false)",
        )
    after = replace(ledger, evals=ledger.evals + 1)
    if not plan.fits(after.train_steps, after.evals):
        return EvalOutcome(
            site,
            SiteStatus.REFUSED,
            ledger,
            False,
            reason=f"site {site!r} would exceed its epsilon budget ({plan.target_epsilon:g}) "
            "with the evaluation; it is not evaluated",
        )
    reader: _Reader | None = None
    try:
        _check_site(payload, site)
        reader = _Reader(payload, site, data_path)
        X, y = reader.split("test")
        model = _model(payload, global_state)
        with _torch_threads(payload.config.num_cpus):
            scores = predict_proba(model, X)
        seed = derive_seed(payload.secret, "eval", site)
        labels = y.numpy().astype(np.int64)
        metrics, hist = site_evaluation(scores, labels, float(plan.eval_sigma or 0.0), seed)
        return EvalOutcome(
            site, SiteStatus.EVALUATED, after, True, histogram=hist, metrics=metrics.to_dict()
        )
    except Exception as exc:
        touched = reader.touched if reader is not None else False
        return EvalOutcome(
            site, SiteStatus.FAILED, after if touched else ledger, touched, reason=_reason(exc)
        )


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """JSON-safe DP metrics (nan -> None)."""
    if metrics is None:
        return None
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
