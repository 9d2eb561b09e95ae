"""What ``sandbox budget`` shows: a key's balance and what each mechanism spent of it.

The ledger knows reservations and the job (or query) id each was made for; which mechanism
spent it is read from the id and the job's spec, never stored twice. DP queries' ids start
with ``qry-`` (``sandbox.query_releases``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from privacy.budget_events import Balance, EventKind, LedgerEvent

#: the order ``spent_by`` lists mechanisms in (training, federated, synthetic data, queries)
MECHANISM_ORDER = ("dp-sgd", "federated", "synthetic", "dp-query")


def mechanism_of(job_id: str | None, spec: Mapping[str, Any] | None) -> str:
    """Pure: the mechanism that spent under ``job_id`` (whose spec is ``spec``)."""
    if job_id and job_id.startswith("qry-"):
        return "dp-query"
    if spec is None:
        return "other"
    if "method" in spec:
        return "synthetic"
    if spec.get("mode") == "federated":
        return "federated"
    return "dp-sgd"


def spent_by_mechanism(events: Iterable[LedgerEvent], jobs: Any) -> dict[str, float]:
    """Committed epsilon per mechanism over one key's ``events`` (``jobs``: the JobStore)."""
    events = list(events)
    job_of = {e.reservation_id: e.job_id for e in events if e.kind is EventKind.RESERVE}
    spent: dict[str, float] = {}
    for e in events:
        if e.kind is not EventKind.COMMIT:
            continue
        job_id = e.job_id or job_of.get(e.reservation_id)
        spec = None
        if job_id and not job_id.startswith("qry-"):
            try:
                spec = jobs.get(job_id).spec
            except Exception:  # noqa: BLE001 - a job row gone: still counted, as "other"
                spec = None
        name = mechanism_of(job_id, spec)
        spent[name] = spent.get(name, 0.0) + float(e.epsilon)
    ordered = {m: spent[m] for m in MECHANISM_ORDER if m in spent}
    ordered.update({m: v for m, v in spent.items() if m not in ordered})
    return ordered


@dataclass(frozen=True)
class BudgetView(Balance):
    """A ``Balance``, plus ``spent_by`` (mechanism -> committed epsilon)."""

    spent_by: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, b: Balance, spent_by: dict[str, float]) -> BudgetView:
        return cls(**{f.name: getattr(b, f.name) for f in fields(b)}, spent_by=spent_by)
