"""One person's worst case on a dataset: the most every grant on it, in every project, can
charge them.

``person_worst_case(grants, dataset, now, ledger)`` counts live grants in full and expired or
revoked ones by what the privacy ledger shows they spent or reserved, per ledger budget key.
The ledger's budgets come in as values (``KeySpend``, folded from ledger events by
``key_spends``), so everything here is a pure function of frozen values, like
``policies.decisions``. ``NewGrant`` is the grant an approval would create;
``policies.caps.decide_dataset_cap`` adds it to the charges (``Charges``) to check it against
the dataset's zone-wide cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from foundation.errors import SpecError
from policies.decisions import GrantView, Mechanism
from privacy.budget_events import BudgetKey, EventKind, LedgerEvent, fold_balance


@dataclass(frozen=True)
class NewGrant:
    """The grant an approval would create: what ``decide_dataset_cap`` checks."""

    project: str
    dataset: str
    mechanisms: frozenset[Mechanism]
    epsilon: float
    delta: float


def ledger_grant_id(grant_id: str, site: str = "") -> str:
    """The id of the ledger GRANT event ``Service.approve`` writes for ``grant_id`` on one of
    its budget keys: the grant id on the dataset-wide key, ``grant_id@site`` on a site's."""
    return f"{grant_id}@{site}" if site else grant_id


@dataclass(frozen=True)
class KeySpend:
    """One ledger budget key on a dataset as the cap counts it (``key_spends`` folds these
    from the ledger's events).

    ``granted_*`` is every GRANT ever appended to the key, whichever grant it came from: the
    ledger pools a key's grants, so a later grant on the key makes an earlier, expired or
    revoked one's unspent remainder spendable again. ``released_*`` is what was spent
    (committed) plus what open reservations hold (they may still commit up to that).
    ``grant_events`` are the ids of the key's GRANT events (``ledger_grant_id``): a grant
    whose event is not there yet is counted from its grant row instead.
    """

    key: BudgetKey
    granted_epsilon: float
    granted_delta: float
    released_epsilon: float
    released_delta: float
    grant_events: frozenset[str] = frozenset()

    def reach(self, open_: bool) -> tuple[float, float]:
        """(epsilon, delta) the key can charge one person in all: if a live grant can still
        spend from it (``open_``), everything ever granted on it (and at least what was
        released, should float rounding have let that pass the grants); else what was
        released."""
        if open_:
            return (
                max(self.granted_epsilon, self.released_epsilon),
                max(self.granted_delta, self.released_delta),
            )
        return self.released_epsilon, self.released_delta


def key_spends(events: Iterable[LedgerEvent], dataset: str) -> tuple[KeySpend, ...]:
    """Every ledger key on ``dataset`` (all projects and sites) that has events, folded from
    ``events`` by ``privacy.budget_events.fold_balance`` (events on other datasets are ignored),
    sorted by key."""
    mine = [ev for ev in events if ev.key.dataset == dataset]
    out: list[KeySpend] = []
    for key in sorted({ev.key for ev in mine}):
        bal = fold_balance(key, mine)
        out.append(
            KeySpend(
                key=key,
                granted_epsilon=bal.granted_epsilon,
                granted_delta=bal.granted_delta,
                released_epsilon=math.fsum([bal.spent_epsilon, bal.reserved_epsilon]),
                released_delta=math.fsum([bal.spent_delta, bal.reserved_delta]),
                grant_events=frozenset(
                    ev.event_id for ev in mine if ev.key == key and ev.kind is EventKind.GRANT
                ),
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class WorstCase:
    """The most one person of a dataset can be charged across every grant ever made on it.

    ``epsilon`` = ``dataset_wide_epsilon`` + ``per_site_epsilon`` (summed exactly); ``delta``
    likewise. ``grant_ids`` are the live grants counted, sorted. ``released_epsilon`` is the
    part of ``epsilon`` the ledger shows spent or reserved already, and ``ledger_keys`` the
    ledger budgets counted (those of expired and revoked grants included).
    """

    epsilon: float
    delta: float
    dataset_wide_epsilon: float
    per_site_epsilon: float
    grant_ids: tuple[str, ...]
    released_epsilon: float = 0.0
    ledger_keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "dataset_wide_epsilon": self.dataset_wide_epsilon,
            "per_site_epsilon": self.per_site_epsilon,
            "grants": list(self.grant_ids),
            "released_epsilon": self.released_epsilon,
            "ledger_keys": list(self.ledger_keys),
        }


def grant_terms(mechanisms: frozenset[Mechanism], value: float) -> tuple[list[float], list[float]]:
    """A grant's (dataset-wide, per-site) charges on one person, the way ``Service.approve``
    turns a grant into ledger budgets: ``federated`` gives every site a budget of the grant's
    full figure; every other mechanism shares one dataset-wide budget of it. A grant with
    both kinds gets both budgets, so it counts twice."""
    wide = [value] if mechanisms - {Mechanism.FEDERATED} else []
    per_site = [value] if Mechanism.FEDERATED in mechanisms else []
    return wide, per_site


class _Term(NamedTuple):
    """One charge on one person: a ledger key's reach, or a grant not in the ledger yet."""

    epsilon: float
    delta: float
    released_epsilon: float
    key: str  # the ledger key ("" for a grant counted from its row)


def _worst_slot(
    wide: Sequence[float], slots: dict[str, list[_Term]], pick: Callable[[_Term], float]
) -> tuple[str, float]:
    """The site whose people are charged most (wide + that site's terms, summed exactly)."""
    name = max(slots, key=lambda s: (math.fsum([*wide, *map(pick, slots[s])]), s))
    return name, math.fsum([*wide, *map(pick, slots[name])])


def _in_ledger(
    keys: dict[tuple[str, str], KeySpend], project: str, grant_id: str | None, site: str
) -> bool:
    """Is the grant's GRANT event on its project's key at ``site`` (the new grant: never)?"""
    on = keys.get((project, site))
    return (
        grant_id is not None
        and on is not None
        and ledger_grant_id(grant_id, site) in on.grant_events
    )


@dataclass(frozen=True)
class Charges:
    """The individual charges behind a worst case, per slot: the dataset-wide budgets (every
    person is in them) and each site's budgets (a person is at one site). Sums use
    ``math.fsum`` (exact, so the order of grants and keys does not matter)."""

    live: tuple[GrantView, ...]
    wide: tuple[_Term, ...]
    #: site -> its terms; "" is a site with no ledger key yet (any site, for grant rows)
    sites: tuple[tuple[str, tuple[_Term, ...]], ...]

    @classmethod
    def of(
        cls,
        grants: Sequence[GrantView],
        ledger: Sequence[KeySpend],
        dataset: str,
        now: datetime,
        new: NewGrant | None = None,
    ) -> Charges:
        live = tuple(
            sorted(
                (g for g in grants if g.dataset == dataset and g.live_at(now)),
                key=lambda g: g.grant_id,
            )
        )
        # (project, grant id or None for the new grant, mechanisms, epsilon, delta)
        adds: list[tuple[str, str | None, frozenset[Mechanism], float, float]] = [
            (g.project, g.grant_id, g.mechanisms, g.epsilon, g.delta) for g in live
        ]
        if new is not None:
            adds.append((new.project, None, new.mechanisms, new.epsilon, new.delta))
        # a key is open while a live grant (or the new one) of its project can spend from it
        open_wide = {p for p, _, m, _, _ in adds if m - {Mechanism.FEDERATED}}
        open_site = {p for p, _, m, _, _ in adds if Mechanism.FEDERATED in m}
        keys: dict[tuple[str, str], KeySpend] = {}
        for k in ledger:
            if k.key.dataset != dataset:
                continue
            if (k.key.project, k.key.site) in keys:
                raise SpecError("ledger", f"lists budget {k.key} twice", "fold each key once")
            keys[(k.key.project, k.key.site)] = k
        wide: list[_Term] = []
        sites: dict[str, list[_Term]] = {"": []}
        for (project, site), k in sorted(keys.items()):
            e, d = k.reach(project in (open_site if site else open_wide))
            term = _Term(float(e), float(d), float(k.released_epsilon), str(k.key))
            (sites.setdefault(site, []) if site else wide).append(term)
        for project, gid, mechs, eps, dlt in adds:
            term = _Term(float(eps), float(dlt), 0.0, "")
            if mechs - {Mechanism.FEDERATED} and not _in_ledger(keys, project, gid, ""):
                wide.append(term)
            if Mechanism.FEDERATED in mechs:
                for site, terms in sites.items():
                    # "" here is a site with no ledger key: the grant is not in the ledger there
                    if not (site and _in_ledger(keys, project, gid, site)):
                        terms.append(term)
        return cls(live, tuple(wide), tuple((s, tuple(t)) for s, t in sorted(sites.items())))

    def worst(self) -> WorstCase:
        slots = {s: list(t) for s, t in self.sites}
        wide_e = [t.epsilon for t in self.wide]
        site, epsilon = _worst_slot(wide_e, slots, lambda t: t.epsilon)
        _, delta = _worst_slot([t.delta for t in self.wide], slots, lambda t: t.delta)
        counted = [*self.wide, *slots[site]]
        return WorstCase(
            epsilon=epsilon,
            delta=delta,
            dataset_wide_epsilon=math.fsum(wide_e),
            per_site_epsilon=math.fsum(t.epsilon for t in slots[site]),
            grant_ids=tuple(g.grant_id for g in self.live),
            released_epsilon=math.fsum(t.released_epsilon for t in counted),
            ledger_keys=tuple(
                sorted({t.key for t in counted if t.key and (t.epsilon > 0 or t.delta > 0)})
            ),
        )


def person_worst_case(
    grants: Sequence[GrantView],
    dataset: str,
    now: datetime,
    ledger: Sequence[KeySpend] = (),
) -> WorstCase:
    """The most one person of ``dataset`` can ever be charged through the grants made on it,
    in every project: what the live ones can still release plus what every grant, live or
    not, has already released. ``ledger`` is the ledger's keys on the dataset
    (``key_spends``); grants on other datasets are ignored.

    The rule, per ledger budget key (project, dataset, site), since the ledger spends per key,
    not per grant:

    - a key is *open* while a grant of its project that is live at ``now`` feeds it (a
      non-federated grant feeds the dataset-wide key, a federated one every site's key). An
      open key counts everything ever granted on it, expired and revoked grants included:
      the ledger pools a key's grants, so their unspent remainder is spendable through the
      live one (at least what was spent and reserved on it, should rounding exceed that);
    - a *closed* key (every grant feeding it expired or revoked) counts what was spent
      (committed) plus what open reservations hold: loss already suffered, or that a running
      job may still commit. Its unspent remainder is dormant: it counts again the moment a
      new grant would open the key (``decide_dataset_cap`` charges the new grant for it);
    - a live grant whose GRANT event is not on its key yet (``KeySpend.grant_events``)
      counts its full figure on top (the grant row is written before its ledger budget).

    This never undercounts: a key never releases more than was granted on it, and a closed
    key can release more only through a new grant, which is checked again. It overcounts by
    up to the dormant remainders, which is the price of not attributing spend to grants.

    Every person is in every dataset-wide budget, so those add up. A federated grant gives
    each site a budget and a person is at one site, so the per-site part is the largest total
    at any one site (a live federated grant not in the ledger yet counts at every site). A
    person's worst case is the two parts added; ``delta`` likewise, its worst site taken on
    its own. Without ``ledger`` only live grants count, each in full.
    """
    return Charges.of(grants, ledger, dataset, now).worst()
