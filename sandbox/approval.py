"""What ``sandbox access approve`` returns: the grant, and what it did to the budgets.

An approval writes one GRANT event per ledger budget key the grant feeds (the project's
dataset-wide key for dp-sgd, synthetic data and DP queries; every site's key for
``federated``). The ledger pools a key's grants: a grant on a key that already has one
*adds* to that budget (``privacy.budget_events``: "several grants add up"). So a second
approved request for the same project and dataset does not replace the first grant's budget,
it adds to it; ``Approval`` says so (``adds_to``), with each key's totals before and after,
and one person's worst case on the dataset across every project before and after (the
dataset-wide figure plus their own site's: ``policies.worst_case``), so nothing changes a
budget silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policies.store_records import GrantRecord
from policies.worst_case import WorstCase
from privacy.budget_events import Balance, BudgetKey, EventKind, LedgerEvent


@dataclass(frozen=True)
class BudgetChange:
    """One ledger budget the approval granted on: its balance before and after."""

    key: BudgetKey
    before: Balance
    after: Balance

    def to_dict(self) -> dict[str, Any]:
        def figures(b: Balance) -> dict[str, float]:
            return {
                "granted_epsilon": b.granted_epsilon,
                "granted_delta": b.granted_delta,
                "remaining_epsilon": b.remaining_epsilon,
                "remaining_delta": b.remaining_delta,
            }

        return {
            "key": str(self.key),
            "site": self.key.site,
            "before": figures(self.before),
            "after": figures(self.after),
        }


@dataclass(frozen=True, kw_only=True)
class Approval(GrantRecord):
    """The grant an approval created (read it as the grant: ``id``, ``epsilon``...), plus
    the budgets it changed and one person's worst case before and after (keyword-only, so
    the grant's own fields may gain defaults)."""

    #: every budget the grant was added to, dataset-wide first, then the sites
    budgets: tuple[BudgetChange, ...]
    #: the grants already feeding those budgets (any state): the new grant adds to theirs
    adds_to: tuple[str, ...]
    #: one person of the dataset, across every project: before and after the grant
    worst_case_before: WorstCase
    worst_case_after: WorstCase
    #: the dataset's zone-wide cap on that worst case (None: no cap)
    cap_epsilon: float | None

    @classmethod
    def of(
        cls,
        grant: GrantRecord,
        budgets: tuple[BudgetChange, ...],
        adds_to: tuple[str, ...],
        worst: tuple[WorstCase, WorstCase],
        cap_epsilon: float | None,
    ) -> Approval:
        fields = {f.name: getattr(grant, f.name) for f in dataclasses.fields(GrantRecord)}
        return cls(
            **fields,
            budgets=budgets,
            adds_to=adds_to,
            worst_case_before=worst[0],
            worst_case_after=worst[1],
            cap_epsilon=cap_epsilon,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "budgets": [b.to_dict() for b in self.budgets],
            "adds_to": list(self.adds_to),
            "worst_case": {
                "before": self.worst_case_before.to_dict(),
                "after": self.worst_case_after.to_dict(),
                "cap_epsilon": self.cap_epsilon,
            },
        }


def pooled_grants(
    events: Iterable[LedgerEvent], before: Mapping[BudgetKey, Balance], grant_id: str
) -> tuple[str, ...]:
    """Pure: the grants (other than ``grant_id``) whose GRANT events are on a key of
    ``before`` that held a budget already: the budgets the new grant was added to. A GRANT
    event's id is its grant's id, ``@site`` on a site's key (``ledger_grant_id``)."""
    held = {k for k, b in before.items() if b.granted_epsilon > 0 or b.granted_delta > 0}
    found = {
        e.event_id.split("@", 1)[0] for e in events if e.kind is EventKind.GRANT and e.key in held
    }
    return tuple(sorted(found - {grant_id}))
