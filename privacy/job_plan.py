"""The plans the service makes before a job runs: ``plan_job`` (DP-SGD, with or without its
DP evaluation release) and ``plan_synth`` (a DP synthesizer's releases).

The service charges from these plans, never from a figure a worker reports: the worker
runs the plan and reports what it ran, and the service checks the report against the plan
(``sandbox.mechanisms.plans``).

With the evaluation, the plan is ``privacy.accountant.plan_dpsgd``'s (training plus one
evaluation histogram, ``privacy.dp_metrics``). When the evaluation's persons are not the
training's (the reader's person split), the two compose in parallel and each is calibrated
to the whole target; otherwise the histogram takes ``eval_share`` of it. A job that does not
want the evaluation plans without it (``evaluate=False``): a ``TrainingOnlyPlan``, no
histogram, no charge, the whole epsilon goes to training.
"""

from __future__ import annotations

import functools
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
        from privacy.accountant import NEIGHBOURING, UNIT, Accountant, Composition

        out = asdict(self)
        out.update(accountant=Accountant.RDP.value, neighbouring=NEIGHBOURING, unit=UNIT)
        # one release: nothing to compose (the key keeps every plan's shape the same)
        out["composition"] = Composition.SEQUENTIAL.value
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
    disjoint_eval: bool = False,
) -> DPSGDPlan | TrainingOnlyPlan:
    """``plan_dpsgd`` (training + one evaluation release) when ``evaluate``; otherwise a
    :class:`TrainingOnlyPlan` calibrated with the same checks for training alone.
    (``plan_dpsgd`` refuses ``eval_share = 0``: it always plans the evaluation release.)

    ``disjoint_eval``: the evaluation reads only persons the training never reads (the
    reader's split by pseudonym), so the two compose in parallel and each gets the whole
    target; otherwise sequentially, the evaluation taking ``eval_share`` of it.

    A pure function of its arguments, memoised: the service makes the same plan at
    admission, when it checks a worker's report and when it charges (plans are frozen)."""
    return _plan_job(
        target_epsilon, delta, n_persons, batch_size, epochs, evaluate, eval_share, disjoint_eval
    )


@functools.lru_cache(maxsize=512)
def _plan_job(
    target_epsilon: float,
    delta: float,
    n_persons: int,
    batch_size: int,
    epochs: int,
    evaluate: bool,
    eval_share: float,
    disjoint_eval: bool,
) -> DPSGDPlan | TrainingOnlyPlan:
    from privacy import accountant as acc

    if evaluate:
        composition = acc.Composition.PARALLEL if disjoint_eval else acc.Composition.SEQUENTIAL
        return acc.plan_dpsgd(
            target_epsilon,
            delta,
            n_persons,
            batch_size,
            epochs,
            eval_share=eval_share,
            composition=composition,
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


@dataclass(frozen=True)
class SynthPlan:
    """A DP synthesizer's releases, planned from the contract alone, and their epsilon.

    The DP engines (``privacy.synth.marginals``, ``privacy.synth.copula``) make a fixed
    sequence of sensitivity-1 Gaussian releases whose number and noise follow from the codec
    (the contract's columns and domains), the target and delta, never from rows. So the
    service can plan them before the job runs, charge :attr:`epsilon`, and check the steps a
    worker reports against :attr:`steps` (a worker that reports other steps fails its job)."""

    method: str
    steps: tuple[GaussianStep, ...]
    delta: float
    target_epsilon: float

    @property
    def epsilon(self) -> float:
        from privacy.accountant import epsilon_for

        return epsilon_for(self.steps, self.delta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "steps": [s.to_dict() for s in self.steps],
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthPlan:
        from privacy.accountant import GaussianStep

        return cls(
            method=str(data["method"]),
            steps=tuple(
                GaussianStep(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]))
                for s in data["steps"]
            ),
            delta=float(data["delta"]),
            target_epsilon=float(data["target_epsilon"]),
        )


def plan_synth(method: str, contract: Any, epsilon: float, delta: float) -> SynthPlan:
    """The releases DP synthesis ``method`` makes on ``contract``'s columns at
    ``(epsilon, delta)``, in the engine's order (see :class:`SynthPlan`).

    The layout is read from the engines' own shares and root rule (not copied), so a change
    to an engine's budget split moves the plan with it; a change to its *number* of releases
    must be mirrored here (``tests/privacy/test_synth_plan.py`` pins plan == fit)."""
    from privacy.accountant import GaussianStep
    from privacy.synth.codec import Codec, SynthMethod, parse_method, plan_sigmas

    kind = parse_method(method)
    codec = Codec.from_contract(contract)
    d = len(codec.columns)
    layout: list[tuple[float, int]]
    if kind is SynthMethod.MST:
        # the engine's own module: its shares and its root rule are the layout's source
        from privacy.synth import marginals

        root = marginals._root_index(codec)
        others = [j for j in range(d) if j != root]
        rounds = max(len(others) - 1, 0)
        layout = [
            (marginals.ANCHOR_SHARE, max(len(others), 1)),  # anchors (or the label alone)
            (marginals.SELECT_SHARE, rounds),  # one exponential mechanism per Kruskal round
            (marginals.TREE_SHARE, rounds),  # one 3-way table per tree edge
        ]
    elif kind is SynthMethod.DP_COPULA:
        from privacy.synth import copula

        layout = [(copula.MARGINAL_SHARE, d), (copula.CORRELATION_SHARE, 1 if d > 1 else 0)]
    else:
        raise SpecError(
            "--method",
            f"{kind.value} is not differentially private: it has no plan to charge",
            "choose mst or dp-copula",
        )
    sigmas = plan_sigmas(epsilon, delta, tuple(layout))
    steps = tuple(
        GaussianStep(sigma, 1.0, 1)
        for sigma, (_, count) in zip(sigmas, layout, strict=True)
        for _ in range(count)
    )
    return SynthPlan(kind.value, steps, float(delta), float(epsilon))
