"""The service's plan of a job, and the check of a worker's report against it.

Why: a worker runs in a Python process the service does not fully control (a Ray worker, a
Flower actor), so nothing it says about privacy is taken on trust. The service plans every
release at admission (DP-SGD: ``privacy.job_plan.plan_job``; synthetic data:
``privacy.job_plan.plan_synth``; federated: each site's ``SitePlan``) and hands it to the
worker in the payload. The plan is a pure function of what the service itself persisted
with the job (the job's spec in its row, the dataset's record in the store), so the service
makes it again, identically, when it checks the report and when it charges, in this process
or another (a later settle reads the same plan), and nothing a worker wrote enters it. The
service charges the accountant's epsilon *for that plan*. The worker reports what it ran (noise
multiplier, sample rate, steps, clipping norm, evaluation noise, delta); the service compares
the report with its plan, and any figure that differs beyond float tolerance, more steps than
planned, or a figure missing from the report fails the job with :class:`ReportMismatch` (an
``IntegrityError``). The worker read rows before it reported, so every reservation of such a
job is committed in full, never released (``JobMechanism.settle_failed``).

A worker's own epsilon may still travel in its result, for display; the service overwrites
it with the plan's figure before anything is stored, shown or written to a card.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from foundation.errors import IntegrityError

#: floats travel from the service to the worker and back by pickle or JSON, both exact; the
#: tolerance only absorbs a worker that recomputes a figure in a different order
REL_TOL = 1e-9
ABS_TOL = 1e-12

_FIX = (
    "the worker did not run the plan the service made; ask the zone operator to check the "
    "workers' Python environment"
)


class ReportMismatch(IntegrityError):
    """A worker's report differs from the service's plan: the job fails, charged in full."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(
            f"the worker reported {problem}; the job fails and its reservation is charged in "
            f"full ({_FIX})"
        )


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def same(planned: Any, reported: Any) -> bool:
    """Whether a reported figure is the planned one (None only equals None)."""
    if planned is None or reported is None:
        return planned is None and reported is None
    if isinstance(reported, bool) or not isinstance(reported, int | float):
        return False
    return math.isclose(float(planned), float(reported), rel_tol=REL_TOL, abs_tol=ABS_TOL)


def check_figures(
    planned: Mapping[str, Any],
    reported: Mapping[str, Any] | None,
    fields: Iterable[str],
    *,
    show: bool,
    at_most: Iterable[str] = (),
    label: str = "",
) -> None:
    """Raise :class:`ReportMismatch` naming the first of ``fields`` the report gets wrong.

    ``at_most`` fields may be reported below the plan (e.g. a federated site's steps: it was
    not sampled every round), never above; every other field must equal the plan's. With
    ``show`` False (the dataset's counts are private) the figures are left out of the
    message: most of them are functions of the exact training size."""
    limits = set(at_most)
    where = f"{label} " if label else ""
    for name in fields:
        want = planned.get(name)
        if reported is None or name not in reported:
            raise ReportMismatch(
                name,
                f"no {where}{name}" + (f", the plan says {_shown(want)}" if show else ""),
            )
        got = reported[name]
        if name in limits:
            ok = (
                isinstance(got, int | float)
                and not isinstance(got, bool)
                and want is not None
                and got >= 0
                and (got <= want or same(want, got))
            )
            relation = "more than"
        else:
            ok = same(want, got)
            relation = "other than"
        if not ok:
            if show:
                problem = f"{where}{name} {_shown(got)}, the plan says {_shown(want)}"
            else:
                problem = (
                    f"a {where}{name} {relation} the plan's (figures withheld: the dataset's "
                    "counts are private)"
                )
            raise ReportMismatch(name, problem)


def not_a_result(kind: str) -> ReportMismatch:
    """What the service raises when a worker returns something that is not its result."""
    return ReportMismatch("result", f"something other than a {kind} result")


def dpsgd_epsilon(plan: Mapping[str, Any]) -> float:
    """The accountant's epsilon for a DP-SGD plan: its training steps and, when planned, the
    one evaluation histogram, composed as the plan says (sequential for a plan stored before
    plans named their composition), at the plan's delta (RDP, as ``plan_job`` calibrated it)."""
    from privacy import accountant as acc

    training = acc.GaussianStep(
        float(plan["noise_multiplier"]), float(plan["sample_rate"]), int(plan["steps"])
    )
    sigma = plan.get("eval_sigma")
    evaluation = None if sigma is None else acc.GaussianStep(float(sigma), 1.0, 1)
    composition = plan.get("composition", acc.Composition.SEQUENTIAL)
    return acc.dpsgd_epsilon(training, evaluation, float(plan["delta"]), composition)
