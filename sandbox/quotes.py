"""What ``sandbox quote`` shows: a job's figures, made by the checks and the plan its run uses.

``quote_of`` turns a ``Prechecked`` (``sandbox.mechanisms.precheck``: every check a submit
runs, and the plan the run is run and charged from) into the quote: what the job will be
charged at most, its noise figures, the budget it draws on and what is left of it, a warning
for every budget the job would use up, and (a quote made for an access request) what a
submit would refuse today. Nothing is planned here: the figures are the precheck's, so a
quote's figures are the run's (``tests/sandbox/test_one_validation_path.py``).

With private counts every figure the exact size shows through is replaced for a researcher
(``sandbox.disclosure``): the count-derived ones by "withheld", each plan's own epsilon by
the epsilon the job will be charged (the reserved one).
"""

from __future__ import annotations

from typing import Any

from policies.roles import Actor
from privacy.accountant import NEIGHBOURING, UNIT, Accountant
from sandbox.disclosure import WITHHELD, redact_counts, sees_everything
from sandbox.mechanisms.dpsgd_plan import n_train_of
from sandbox.mechanisms.precheck import BudgetCheck, Prechecked, budget_warnings
from training.federated.site_plan import SitePlan as SiteDPPlan

#: what every plan says about its accounting (``privacy.accountant``'s words)
ACCOUNTING = {"accountant": Accountant.RDP.value, "neighbouring": NEIGHBOURING, "unit": UNIT}


def quote_of(pre: Prechecked, actor: Actor) -> dict[str, Any]:
    """The quote of a checked spec, as ``actor`` may see it."""
    spec = pre.spec
    shown = pre.dataset.counts_public or sees_everything(actor.role)
    budgets = {c.key.site: c for c in pre.budgets}
    if pre.sites is not None:
        rounds = pre.sites.config.rounds
        per_site: dict[str, Any] = {
            site: {"left_out": reason} for site, reason in pre.sites.left_out.items()
        }
        for site in pre.sites.sites:
            site_plan = pre.sites.plans.get(site)
            entry = _site_entry(site_plan, rounds) if site_plan is not None else _withheld(pre)
            per_site[site] = {**entry, **_remaining(budgets.get(site))}
        quote: dict[str, Any] = {
            "mode": "federated",
            "epsilon_per_site": spec.privacy.epsilon,
            "delta": spec.privacy.delta,
            "sites": dict(sorted(per_site.items())),
            "composition": "per site (disjoint patients)",
            "unit": "person",
        }
    else:
        plan = pre.plan[0] if pre.plan is not None else None
        quote = {
            "mode": "dp-sgd",
            **pre.would_charge(),
            "plan": dict(plan) if plan is not None else _withheld(pre),
            "n_train_estimate": n_train_of(pre.dataset),
            **_remaining(budgets.get("")),
            "unit": "person",
            "neighbouring": ACCOUNTING["neighbouring"],
            "accountant": ACCOUNTING["accountant"],
        }
        if pre.tuning is not None:
            # the values the plan above was made with (``chosen``) and how
            quote["tuning"] = pre.tuning
    quote["warnings"] = budget_warnings(pre)
    if pre.refusals:
        # a quote for an access request: what the request is for
        quote["submit_now"] = list(pre.refusals)
    if not shown:
        quote = redact_counts(quote)
        plans = [quote.get("plan")] + list((quote.get("sites") or {}).values())
        for p in plans:
            if isinstance(p, dict) and "epsilon" in p:
                p["epsilon"] = spec.privacy.epsilon
    return quote


def _site_entry(plan: SiteDPPlan, rounds: int) -> dict[str, Any]:
    """A site's figures in a quote, from the plan the site runs and is charged from."""
    return {
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": plan.planned_steps(rounds),
        "steps_per_epoch": plan.steps_per_epoch,
        "eval_sigma": plan.eval_sigma,
        "epsilon": plan.planned_epsilon(rounds),
        "delta": plan.delta,
        "target_epsilon": plan.target_epsilon,
        **ACCOUNTING,
    }


def _withheld(pre: Prechecked) -> dict[str, Any]:
    """A plan's shape when the service shows no plan (private counts: no site plan is made
    before reading, and a DP-SGD plan refused for the exact size must not say so)."""
    spec = pre.spec
    return {
        "noise_multiplier": WITHHELD,
        "sample_rate": WITHHELD,
        "steps": WITHHELD,
        "steps_per_epoch": WITHHELD,
        "eval_sigma": WITHHELD if spec.privacy.evaluate else None,
        "epsilon": spec.privacy.epsilon,
        "delta": spec.privacy.delta,
        "target_epsilon": spec.privacy.epsilon,
        **ACCOUNTING,
    }


def _remaining(check: BudgetCheck | None) -> dict[str, float]:
    """What the budget the job draws on holds now (before the job)."""
    if check is None:
        return {}
    return {
        "remaining_epsilon": check.balance.remaining_epsilon,
        "remaining_delta": check.balance.remaining_delta,
    }
