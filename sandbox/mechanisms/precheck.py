"""One validation path: every check a training spec passes before anything is dispatched.

``precheck`` is the first thing a submit (``DpsgdMechanism`` and ``FederatedMechanism``'s
``admit``), a dry run (``DryRunMechanism.admit``) and a quote (``SynthCalls.quote``) do, in
the same order and with the same messages, so none of them accepts a spec another refuses:

1. the project exists and the caller is one of its members;
2. the spec's columns against the dataset's governed contract (a misspelt feature, a label
   that is not one);
3. the access decision (chokepoint 1): one live grant of the project covering every column
   the spec reads and the mechanism its mode names (``dp-sgd`` or ``federated``);
4. ``"auto"`` hyperparameters resolved (the search on free rows, as admission always did);
5. the plan, by the functions the run is run and charged from: DP-SGD's ``service_plan`` on
   the training size the service knows; federated: ``plan_sites`` (the sites that take
   part, at least ``federated.min_sites`` of them, and each one's plan from the run's config);
6. the budget: every ledger key the job would reserve holds its epsilon and delta
   (``privacy.ledger_checks.check_fits``, the comparison ``Ledger.reserve`` makes).

Step 6 reads the ledger: a submit then reserves under the key's lock, and that reservation is
what counts (of two jobs racing for the last budget, the later one is refused there, with the
same message). A quote made for an access request (``for_request``) collects the refusals of
steps 3 and 6 instead of raising them (``Prechecked.refusals``): the grant or the budget is
what the request asks for, and the quote travels with it to the steward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import BudgetExceeded, IntegrityError, ZoneError
from policies.decisions import Mechanism
from policies.roles import Actor
from privacy.budget_events import Balance, BudgetKey
from privacy.ledger_checks import check_fits, nothing_left
from sandbox.context import ZoneContext
from sandbox.jobspec import JobSpec
from sandbox.mechanisms.dpsgd_plan import (
    check_batch_size,
    check_columns,
    decide,
    disjoint_eval,
    n_train_of,
    service_plan,
)
from sandbox.mechanisms.federated_plan import SitePlan, plan_sites
from sandbox.mechanisms.synthetic import governed_contract
from sandbox.mechanisms.tuning import resolve


@dataclass(frozen=True)
class BudgetCheck:
    """One ledger key the job would reserve on: what it holds now and what the job asks."""

    key: BudgetKey
    balance: Balance
    epsilon: float
    delta: float

    def used_up(self, what: str) -> bool:
        """Whether the job would leave nothing of ``what`` ("epsilon" or "delta") on this
        key: no job could run on it after this one until a steward grants more."""
        left = self.balance.remaining_epsilon if what == "epsilon" else self.balance.remaining_delta
        asked = self.epsilon if what == "epsilon" else self.delta
        return nothing_left(what, left - asked, self.balance)


@dataclass(frozen=True)
class Prechecked:
    """What a spec that passed every check is run (or quoted) with."""

    #: the spec with every "auto" field chosen (what is planned, stored and charged)
    spec: JobSpec
    #: the search's record (``sandbox.mechanisms.tuning``); None when nothing was "auto"
    tuning: dict[str, Any] | None
    #: the dataset's record and its full contract (the worker's payload carries it)
    dataset: Any
    contract: SchemaContract
    mechanism: Mechanism
    #: the grant that allowed the job ("" when a request quote found none)
    grant: str
    #: DP-SGD: ``service_plan``'s ``(plan, None)`` or, with private counts, ``(None, error)``
    plan: tuple[dict[str, Any] | None, dict[str, str] | None] | None
    #: federated: the sites taking part, the config and (public counts) each site's plan
    sites: SitePlan | None
    #: every key the job would reserve on, in reservation order
    budgets: tuple[BudgetCheck, ...]
    #: a request quote's refusals (access, budget): each one line naming its fix
    refusals: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dpsgd_plan(self) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
        """The DP-SGD plan (what the worker's payload carries)."""
        if self.plan is None:
            raise IntegrityError("a federated spec has no DP-SGD plan")
        return self.plan

    def would_charge(self) -> dict[str, float]:
        """What the job would be charged at most (on each site's budget, for a federated
        job): the accountant's figure for the DP-SGD plan with public counts; the spec's
        epsilon, what is reserved and charged, with private counts (and per site)."""
        plan = self.plan[0] if self.plan is not None else None
        if self.dataset.counts_public and plan is not None:
            return {"epsilon": float(plan["epsilon"]), "delta": float(plan["delta"])}
        return {"epsilon": self.spec.privacy.epsilon, "delta": self.spec.privacy.delta}

    @property
    def federated_plan(self) -> SitePlan:
        """The federated plan: the sites taking part, the config, each site's plan."""
        if self.sites is None:
            raise IntegrityError("a DP-SGD spec has no federated plan")
        return self.sites


def precheck(
    ctx: ZoneContext,
    actor: Actor,
    spec: JobSpec,
    *,
    budget: bool = True,
    for_request: bool = False,
) -> Prechecked:
    """Every check ``spec`` must pass before anything is dispatched (see the module
    docstring); raises the first refusal. ``budget=False`` skips step 6 (the points of a
    quote's utility curve: epsilons tried, not jobs asked for); ``for_request`` collects
    the access and budget refusals instead of raising them."""
    ctx.store.get_project(spec.project)
    ctx.check_member(actor, spec.project)
    federated = spec.federated is not None
    mechanism = Mechanism.FEDERATED if federated else Mechanism.DP_SGD
    # the version the job would read: its grant's pinned one, else the latest
    dataset = ctx.dataset_version_for(spec.project, spec.dataset, mechanism.value)
    contract = SchemaContract.from_dict(dataset.contract)
    # the governed contract: direct identifiers are not in the stored rows, so a spec that
    # names one is refused like a misspelt column
    check_columns(spec, governed_contract(contract))
    refusals: list[str] = []
    grant = _refused(refusals, for_request, lambda: decide(ctx, actor, spec, mechanism)) or ""
    tuning = None
    plan = None
    sites = None
    if federated:
        sites = plan_sites(spec, dataset)
        keys = [BudgetKey(spec.project, spec.dataset, s) for s in sites.sites]
    else:
        spec, tuning = resolve(ctx, spec, dataset=dataset)
        check_batch_size(spec, dataset)
        plan = service_plan(
            spec,
            n_train_of(dataset),
            counts_public=dataset.counts_public,
            disjoint=disjoint_eval(dataset),
        )
        keys = [BudgetKey(spec.project, spec.dataset)]
    eps, dlt = spec.privacy.epsilon, spec.privacy.delta
    checks = tuple(BudgetCheck(k, ctx.ledger.balance(k), eps, dlt) for k in keys)
    if budget:
        for c in checks:
            _refused(refusals, for_request, lambda c=c: _fits(c, federated))
    return Prechecked(
        spec=spec,
        tuning=tuning,
        dataset=dataset,
        contract=contract,
        mechanism=mechanism,
        grant=grant,
        plan=plan,
        sites=sites,
        budgets=checks,
        refusals=tuple(refusals),
    )


def _fits(check: BudgetCheck, federated: bool) -> None:
    """The ledger's comparison for one key; a federated job's refusal says, as
    ``federated.reserve_sites`` does, that the job is refused whole."""
    try:
        check_fits(check.key, check.balance, check.epsilon, check.delta)
    except BudgetExceeded as exc:
        if not federated:
            raise
        raise BudgetExceeded(f"{exc} (no site was charged)") from None


def _refused(refusals: list[str], collect: bool, check: Any) -> Any:
    """``check()``'s value; its refusal raised, or with ``collect`` kept in ``refusals``."""
    try:
        return check()
    except ZoneError as exc:
        if not collect:
            raise
        refusals.append(str(exc))
        return None


def budget_warnings(pre: Prechecked) -> list[str]:
    """A line for every budget the job would use up (its whole remaining epsilon or delta):
    after it, nothing can run on that budget until a steward grants more."""
    out = []
    for c in pre.budgets:
        used = [w for w in ("epsilon", "delta") if c.used_up(w)]
        if not used or c.balance.granted_epsilon == 0:
            continue
        what = " and ".join(used)
        out.append(
            f"this job would use all the remaining {what} of budget {c.key}: after it no job "
            f"can run on that budget until a data steward grants more {what} (an access "
            "request whose approval adds to it)"
        )
    return out
