"""A site's DP budget in a federated job: its plan (``SitePlan``), its spend (``SiteLedger``).

``make_plan`` calibrates one plan per site (``privacy.job_plan.plan_job``) for
``rounds x local_epochs`` epochs of DP-SGD on the site's ``n`` training persons (the size
the service gave the site in the config, ``FederatedConfig.plan_sizes``, when it did; the
persons the site counted otherwise) plus, when
the job evaluates, one DP evaluation release (``EVAL_SHARE`` of the budget). Patient-level
privacy: add/remove one person, RDP accountant.

The ledger counts the site's releases (DP-SGD steps, evaluations, rounds), never a running
epsilon: ``SitePlan.epsilon`` recomputes the site's epsilon over its whole history every
time (docs/engines.md: a fresh accountant per round under-reports). Both travel between
rounds as Flower records (``to_record``/``from_record``) in the ClientApp's
``context.state``. What a site does with them is ``training.federated.site``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from foundation.errors import SpecError
from training.federated.config import EVAL_SHARE, FederatedConfig
from training.federated.payload import FederatedPayload


@functools.lru_cache(maxsize=1024)
def _step_curve(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """The RDP curve of one sampled-Gaussian step (read-only; a pure function, memoised)."""
    from privacy.accountant import GaussianStep, _rdp_curve

    curve = _rdp_curve(GaussianStep(noise_multiplier, sample_rate, 1))
    curve.setflags(write=False)
    return curve


@dataclass(frozen=True)
class SitePlan:
    """A site's DP-SGD plan for the whole job (public figures: n, noise, rates, steps)."""

    site: str
    n_train: int
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    steps_per_round: int
    #: None: the job runs no DP evaluation (nothing planned, reserved or charged for it)
    eval_sigma: float | None
    target_epsilon: float
    delta: float

    @property
    def evaluates(self) -> bool:
        return self.eval_sigma is not None

    def _check_evals(self, evals: int) -> None:
        if evals > 0 and self.eval_sigma is None:
            raise SpecError("federated.evaluate", "the plan has no evaluation to charge")

    def history(self, train_steps: int, evals: int) -> list[Any]:
        """The site's releases as accountant events: its DP-SGD steps, its evaluations."""
        from privacy.accountant import GaussianStep

        self._check_evals(evals)
        steps = [GaussianStep(self.noise_multiplier, self.sample_rate, train_steps)]
        if self.eval_sigma is not None:
            steps.append(GaussianStep(self.eval_sigma, 1.0, evals))
        return steps

    def epsilon(self, train_steps: int, evals: int) -> float:
        """The site's epsilon at ``delta`` after these releases: exactly
        ``privacy.accountant.epsilon_for(self.history(train_steps, evals), delta)``.

        Why not call it: it recomputes the sampled Gaussian's RDP curve (~60 ms) every time,
        and the server asks for every site's epsilon every round. The curve of ``k`` steps
        is ``k`` times the curve of one (Opacus's ``compute_rdp`` multiplies the same way),
        so the one-step curves are cached and scaled; the conversion to epsilon is the
        accountant's own. The tests pin equality with ``epsilon_for``."""
        from privacy import accountant

        accountant._check_delta(self.delta)
        self._check_evals(evals)
        parts = []
        if train_steps > 0:
            parts.append(train_steps * _step_curve(self.noise_multiplier, self.sample_rate))
        if evals > 0 and self.eval_sigma is not None:
            parts.append(evals * _step_curve(self.eval_sigma, 1.0))
        if not parts:
            return 0.0
        total = np.zeros(len(accountant.RDP_ORDERS))
        for part in parts:
            total = total + part
        return accountant._epsilon_from_curve(total, self.delta)

    @property
    def planned_evals(self) -> int:
        """Evaluation releases the plan holds for the whole job: one, or none."""
        return 1 if self.evaluates else 0

    def planned_steps(self, rounds: int) -> int:
        """DP-SGD steps the plan holds for a site in every one of ``rounds`` rounds."""
        return rounds * self.steps_per_round

    def planned_epsilon(self, rounds: int) -> float:
        """The plan's full figure: every round trained and the evaluation released. What the
        service charges a site that took part (a site that trained fewer rounds is still
        charged this: the service does not take a site's count of its own steps on trust).
        At or below ``target_epsilon`` (the plan was calibrated for exactly these)."""
        return self.epsilon(self.planned_steps(rounds), self.planned_evals)

    def fits(self, train_steps: int, evals: int) -> bool:
        """Whether these releases stay within the target. No slack: the plan's noise was
        checked against the same RDP arithmetic, so the planned total is <= target exactly."""
        return self.epsilon(train_steps, evals) <= self.target_epsilon

    def to_record(self) -> dict[str, Any]:
        rec = {
            "site": self.site,
            "n": self.n_train,
            "noise-multiplier": self.noise_multiplier,
            "sample-rate": self.sample_rate,
            "steps-per-epoch": self.steps_per_epoch,
            "steps-per-round": self.steps_per_round,
            "target-epsilon": self.target_epsilon,
            "delta": self.delta,
        }
        # Flower's records hold no None: a plan without evaluation has no "eval-sigma"
        if self.eval_sigma is not None:
            rec["eval-sigma"] = self.eval_sigma
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> SitePlan:
        return cls(
            site=str(rec["site"]),
            n_train=int(rec["n"]),
            noise_multiplier=float(rec["noise-multiplier"]),
            sample_rate=float(rec["sample-rate"]),
            steps_per_epoch=int(rec["steps-per-epoch"]),
            steps_per_round=int(rec["steps-per-round"]),
            eval_sigma=float(rec["eval-sigma"]) if "eval-sigma" in rec else None,
            target_epsilon=float(rec["target-epsilon"]),
            delta=float(rec["delta"]),
        )

    def card(self) -> dict[str, Any]:
        return {
            "n": self.n_train,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps_per_round,
            "eval_sigma": self.eval_sigma,
            "target_epsilon": self.target_epsilon,
        }


@dataclass(frozen=True)
class SiteLedger:
    """What a site has spent so far in this job: counts of releases, never a running epsilon
    (the epsilon is recomputed from these and the plan each time)."""

    train_steps: int = 0
    evals: int = 0
    rounds: int = 0

    def merged(self, other: SiteLedger) -> SiteLedger:
        """The larger of two views of the same site's spend (the site's own, the server's)."""
        return SiteLedger(
            max(self.train_steps, other.train_steps),
            max(self.evals, other.evals),
            max(self.rounds, other.rounds),
        )

    def to_record(self) -> dict[str, int]:
        return {"train-steps": self.train_steps, "evals": self.evals, "rounds": self.rounds}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> SiteLedger:
        return cls(int(rec["train-steps"]), int(rec["evals"]), int(rec["rounds"]))


def make_plan(payload: FederatedPayload, site: str, counted: int) -> SitePlan:
    """The site's plan, having counted ``counted`` training persons: on the service's size
    for the site when the config carries one (``FederatedConfig.plan_size``), so the site
    runs the plan the quote showed and the service charges (deterministic: same inputs,
    same plan)."""
    cfg = payload.config
    return plan_for(cfg, site, cfg.plan_size(site, counted))


def plan_for(cfg: FederatedConfig, site: str, n_train: int) -> SitePlan:
    """``make_plan`` from the job's config alone: the service rebuilds each site's plan with
    it, from the config it made at admission, to check what the site reports it ran."""
    from privacy.job_plan import plan_job

    dp = plan_job(
        cfg.epsilon,
        cfg.delta,
        n_train,
        cfg.batch_size,
        cfg.local_training_epochs,
        evaluate=cfg.evaluate,
        eval_share=EVAL_SHARE,
    )
    return SitePlan(
        site=site,
        n_train=n_train,
        noise_multiplier=dp.noise_multiplier,
        sample_rate=dp.sample_rate,
        steps_per_epoch=dp.steps_per_epoch,
        steps_per_round=dp.steps_per_epoch * cfg.local_epochs,
        eval_sigma=dp.eval_sigma,
        target_epsilon=cfg.epsilon,
        delta=cfg.delta,
    )
