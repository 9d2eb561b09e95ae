"""A DP-SGD job's plan, with or without its DP evaluation release: ``plan_job``.

With the evaluation, the plan is ``privacy.accountant.plan_dpsgd``'s (training plus one
evaluation histogram taking ``eval_share`` of the target; ``privacy.dp_metrics`` makes that
release). A job that does not want the evaluation plans without it (``evaluate=False``): a
``TrainingOnlyPlan``, no histogram, no charge, the whole epsilon goes to training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from foundation.errors import SpecError

if TYPE_CHECKING:
    from privacy.accountant import DPSGDPlan, GaussianStep


@dataclass(frozen=True)
class TrainingOnlyPlan:
    """A DP-SGD plan with no evaluation release: the whole target goes to training.

    The same figures (and ``to_dict`` keys) as ``privacy.accountant.DPSGDPlan``, with
    ``eval_sigma`` None; :meth:`history` holds the training step only."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    steps_per_epoch: int
    epsilon: float
    delta: float
    target_epsilon: float
    eval_sigma: None = None

    @property
    def training_step(self) -> GaussianStep:
        from privacy.accountant import GaussianStep

        return GaussianStep(self.noise_multiplier, self.sample_rate, self.steps)

    def history(self) -> tuple[GaussianStep, ...]:
        return (self.training_step,)

    def to_dict(self) -> dict[str, Any]:
        from privacy.accountant import NEIGHBOURING, UNIT, Accountant

        out = asdict(self)
        out.update(accountant=Accountant.RDP.value, neighbouring=NEIGHBOURING, unit=UNIT)
        return out


def plan_job(
    target_epsilon: float,
    delta: float,
    n_persons: int,
    batch_size: int,
    epochs: int,
    *,
    evaluate: bool,
    eval_share: float,
) -> DPSGDPlan | TrainingOnlyPlan:
    """``plan_dpsgd`` (training + one evaluation release taking ``eval_share`` of the
    target) when ``evaluate``; otherwise a :class:`TrainingOnlyPlan` calibrated with the
    same checks for training alone. (``plan_dpsgd`` refuses ``eval_share = 0``: it always
    plans the evaluation release.)"""
    from privacy import accountant as acc

    if evaluate:
        return acc.plan_dpsgd(
            target_epsilon, delta, n_persons, batch_size, epochs, eval_share=eval_share
        )
    acc._check_epsilon(target_epsilon)
    acc._check_delta(delta)
    sample_rate, steps_per_epoch, steps = acc.dpsgd_schedule(n_persons, batch_size, epochs)
    if delta >= 1.0 / n_persons:
        # as plan_dpsgd: delta >= 1/n admits mechanisms that publish some person's record
        raise SpecError(
            "privacy.delta", f"delta must be below 1/persons ({n_persons})", "use e.g. 1e-6"
        )
    sigma = acc.calibrate_noise(target_epsilon, delta, sample_rate, steps)
    epsilon = acc.epsilon_for([acc.GaussianStep(sigma, sample_rate, steps)], delta)
    return TrainingOnlyPlan(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        epsilon=epsilon,
        delta=delta,
        target_epsilon=target_epsilon,
    )
