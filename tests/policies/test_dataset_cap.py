"""The zone-wide cap per dataset: one person's epsilon (and delta) over every project.

The pure decision first (``decide_dataset_cap``, ``person_worst_case``), with a property: for
any sequence of requests, the approved ones never sum above the cap; and a second property
with a simulated ledger: whatever jobs spend, and whichever grants expire or are revoked, what
one person is ever charged stays under the cap (loss spent under a dead grant still counts,
and so does a dead grant's unspent remainder that a later grant on its ledger key revives).
Then the store (cap settings are kept, the latest wins, an approval over the cap writes
nothing, the ledger in its database is read) and the service (stewards only, audited, the
ledger untouched by a refusal).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from foundation.errors import NotFoundError, PolicyDenied, SpecError
from foundation.sql import make_engine
from policies.caps import DatasetCap, decide_dataset_cap, within_cap
from policies.decisions import GrantView, Mechanism, RequestState
from policies.roles import Role
from policies.store import StateStore
from policies.worst_case import KeySpend, NewGrant, key_spends, ledger_grant_id, person_worst_case
from privacy.budget_events import BudgetKey, EventKind, LedgerEvent, fold_balance
from privacy.ledger import Ledger

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DP = frozenset({Mechanism.DP_SGD})
FED = frozenset({Mechanism.FEDERATED})
BOTH = frozenset({Mechanism.DP_SGD, Mechanism.FEDERATED})
_ids = itertools.count()


def cap(epsilon: float = 3.0, delta: float | None = None, dataset: str = "cohort") -> DatasetCap:
    return DatasetCap(dataset, epsilon, delta, "sam", T0)


def grant(epsilon: float = 2.0, **over: Any) -> GrantView:
    args: dict[str, Any] = {
        "grant_id": f"grant-{next(_ids):04d}",
        "project": "a",
        "dataset": "cohort",
        "columns": frozenset({"age"}),
        "mechanisms": DP,
        "epsilon": epsilon,
        "delta": 1e-5,
        "expires_at": None,
        "revoked": False,
        **over,
    }
    return GrantView(**args)


def new(epsilon: float = 2.0, **over: Any) -> NewGrant:
    args: dict[str, Any] = {
        "project": "b",
        "dataset": "cohort",
        "mechanisms": DP,
        "epsilon": epsilon,
        "delta": 1e-5,
        **over,
    }
    return NewGrant(**args)


# -- ledger events, as Service.approve and jobs write them ----------------------------------------

_seq = itertools.count(1)


def _event(
    kind: EventKind, project: str, epsilon: float, delta: float, site: str, **over: Any
) -> LedgerEvent:
    n = next(_seq)
    args: dict[str, Any] = {
        "seq": n,
        "event_id": f"ev-{n}",
        "kind": kind,
        "key": BudgetKey(project, "cohort", site),
        "epsilon": epsilon,
        "delta": delta,
        "reservation_id": None,
        "job_id": None,
        "actor": "test",
        "at": T0,
        **over,
    }
    return LedgerEvent(**args)


def granted(g: GrantView, site: str = "") -> LedgerEvent:
    """The GRANT event Service.approve writes for ``g`` on one of its keys."""
    gid = ledger_grant_id(g.grant_id, site)
    return _event(EventKind.GRANT, g.project, g.epsilon, g.delta, site, event_id=gid)


def reserved(project: str, epsilon: float, site: str = "", delta: float = 0.0) -> LedgerEvent:
    """A job's RESERVE, left open."""
    rid = f"r{next(_seq)}"
    return _event(EventKind.RESERVE, project, epsilon, delta, site, reservation_id=rid)


def spent(project: str, epsilon: float, site: str = "", delta: float = 0.0) -> list[LedgerEvent]:
    """A job that reserved and committed ``epsilon``: RESERVE then COMMIT."""
    r = reserved(project, epsilon, site, delta)
    rid = r.reservation_id
    return [r, _event(EventKind.COMMIT, project, epsilon, delta, site, reservation_id=rid)]


# -- the pure decision -----------------------------------------------------------------------------


def test_no_cap_allows_and_still_reports_the_worst_case() -> None:
    d = decide_dataset_cap(None, [grant(2.0)], new(2.0), T0)
    assert d.allowed and d.cap is None and d.max_epsilon is None
    assert d.before.epsilon == 2.0 and d.after.epsilon == 4.0


def test_two_projects_cannot_sum_past_the_cap() -> None:
    # the differencing attack: A holds 2, B asks for 2 on the same dataset under a cap of 3
    d = decide_dataset_cap(cap(3.0), [grant(2.0, project="a")], new(2.0, project="b"), T0)
    assert not d.allowed
    assert d.before.epsilon == 2.0 and d.after.epsilon == 4.0
    assert d.epsilon_left == 1.0 and d.max_epsilon == 1.0
    assert "--epsilon 2" in d.reason and "(1 left under the cap)" in d.reason
    assert d.fixes == (
        "lower --epsilon to at most 1",
        "have a data steward raise the cap (sandbox dataset cap cohort --epsilon 4)",
    )
    with pytest.raises(PolicyDenied) as err:
        d.raise_if_denied()
    assert "\n" not in str(err.value) and "lower --epsilon to at most 1" in str(err.value)


def test_exactly_the_room_left_is_allowed() -> None:
    d = decide_dataset_cap(cap(3.0), [grant(2.0)], new(1.0), T0)
    assert d.allowed and d.after.epsilon == 3.0 and d.epsilon_left == 1.0
    d.raise_if_denied()


def test_the_same_project_counts_too() -> None:
    d = decide_dataset_cap(cap(3.0), [grant(2.0, project="b")], new(2.0, project="b"), T0)
    assert not d.allowed


def test_dead_grants_and_other_datasets_do_not_count() -> None:
    grants = [
        grant(2.0, revoked=True),
        grant(2.0, expires_at=T0),  # expires at its instant
        grant(2.0, expires_at=T0 - timedelta(days=1)),
        grant(2.0, dataset="other"),
        grant(1.0, expires_at=T0 + timedelta(seconds=1)),
    ]
    d = decide_dataset_cap(cap(3.0), grants, new(2.0), T0)
    assert d.allowed and d.before.epsilon == 1.0
    assert d.before.grant_ids == (grants[-1].grant_id,)


def test_a_federated_grant_is_charged_once_per_person() -> None:
    # one budget per site, but a person is at one site
    d = decide_dataset_cap(cap(3.0), [grant(2.0, mechanisms=FED)], new(1.0), T0)
    assert d.allowed and d.before.per_site_epsilon == 2.0 and d.after.epsilon == 3.0


def test_federated_grants_of_two_projects_add_up() -> None:
    d = decide_dataset_cap(cap(3.0), [grant(2.0, mechanisms=FED)], new(2.0, mechanisms=FED), T0)
    assert not d.allowed and d.after.per_site_epsilon == 4.0 and d.max_epsilon == 1.0


def test_a_grant_with_federated_and_another_mechanism_counts_twice() -> None:
    # Service.approve gives it a dataset-wide budget and a budget per site, both of epsilon
    d = decide_dataset_cap(cap(3.0), [grant(1.0)], new(1.5, mechanisms=BOTH), T0)
    assert not d.allowed
    assert d.after.dataset_wide_epsilon == 2.5 and d.after.per_site_epsilon == 1.5
    assert d.after.epsilon == 4.0 and d.max_epsilon == 1.0
    assert "counts twice" in d.reason
    assert decide_dataset_cap(cap(3.0), [grant(1.0)], new(1.0, mechanisms=BOTH), T0).allowed


def test_delta_is_capped_only_when_asked() -> None:
    grants = [grant(1.0, delta=1e-5)]
    assert decide_dataset_cap(cap(3.0), grants, new(1.0, delta=0.5), T0).allowed
    d = decide_dataset_cap(cap(3.0, delta=2e-5), grants, new(1.0, delta=2e-5), T0)
    assert not d.allowed
    assert d.delta_left == 1e-5 and d.max_delta == 1e-5
    assert "--delta 2e-05" in d.reason and "lower --delta to at most 1e-05" in d.reason
    # raising the cap keeps the delta cap in the command
    assert d.fixes[-1].endswith("(sandbox dataset cap cohort --epsilon 3 --delta 3e-05)")
    assert decide_dataset_cap(cap(3.0, delta=2e-5), grants, new(1.0, delta=1e-5), T0).allowed


def test_a_cap_already_below_the_grants_refuses_everything_new() -> None:
    d = decide_dataset_cap(cap(1.0), [grant(2.0)], new(0.001), T0)
    assert not d.allowed and d.epsilon_left == 0.0 and d.max_epsilon == 0.0
    assert d.fixes == (
        "have a data steward raise the cap (sandbox dataset cap cohort --epsilon 2.001)",
    )
    assert "(0 left under the cap)" in d.reason


def test_decimal_figures_fit_a_decimal_cap() -> None:
    # 0.1 + 0.1 + 0.1 is 0.30000000000000004 in floats; a cap of 0.3 still takes it
    d = decide_dataset_cap(cap(0.3), [grant(0.1), grant(0.1)], new(0.1), T0)
    assert d.allowed and d.max_epsilon == 0.1


def test_a_cap_of_another_dataset_is_a_bug() -> None:
    with pytest.raises(SpecError, match="cap"):
        decide_dataset_cap(cap(dataset="other"), [], new(), T0)


def test_decision_is_json_safe() -> None:
    import json

    d = decide_dataset_cap(cap(3.0, delta=1e-4), [grant(2.0)], new(2.0), T0).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["cap"]["epsilon"] == 3.0 and d["worst_case_after"]["epsilon"] == 4.0


# -- what was spent under dead grants (the ledger) ---------------------------------------------------

DAY = timedelta(days=1)


def test_spend_under_an_expired_grant_still_counts() -> None:
    # A was granted 2, spent 1.5, and the grant expired: the 1.5 is spent on the same people
    ga = grant(2.0, project="a", expires_at=T0 - DAY)
    ledger = key_spends([granted(ga), *spent("a", 1.5)], "cohort")
    # counting live grants only, B could get the whole cap again
    assert decide_dataset_cap(cap(3.0), [ga], new(3.0), T0).allowed
    d = decide_dataset_cap(cap(3.0), [ga], new(2.0), T0, ledger)
    assert not d.allowed
    assert d.before.epsilon == 1.5 and d.before.released_epsilon == 1.5
    assert d.before.grant_ids == () and d.before.ledger_keys == ("a/cohort",)
    assert d.epsilon_left == 1.5 and d.max_epsilon == 1.5
    assert "(1.5 left under the cap)" in d.reason and "lower --epsilon to at most 1.5" in d.reason
    ok = decide_dataset_cap(cap(3.0), [ga], new(1.5), T0, ledger)
    assert ok.allowed and ok.after.epsilon == 3.0


def test_a_new_grant_on_a_dead_grants_key_brings_its_remainder_back() -> None:
    # the ledger adds grants on one key up: a new grant to A makes the 0.5 A left unspent
    # spendable again, so A may get at most 1 (1.5 spent + 0.5 back + 1 = 3)
    ga = grant(2.0, project="a", expires_at=T0 - DAY)
    ledger = key_spends([granted(ga), *spent("a", 1.5)], "cohort")
    d = decide_dataset_cap(cap(3.0), [ga], new(1.5, project="a"), T0, ledger)
    assert not d.allowed and d.before.epsilon == 1.5 and d.after.epsilon == 3.5
    assert d.epsilon_left == 1.5 and d.max_epsilon == 1.0
    assert "brings back epsilon 0.5" in d.reason
    ok = decide_dataset_cap(cap(3.0), [ga], new(1.0, project="a"), T0, ledger)
    assert ok.allowed and ok.after.epsilon == 3.0


def test_a_revoked_grant_that_spent_nothing_frees_its_room() -> None:
    ga = grant(2.0, project="a", revoked=True)
    ledger = key_spends([granted(ga)], "cohort")
    d = decide_dataset_cap(cap(3.0), [ga], new(3.0, project="b"), T0, ledger)
    assert d.allowed and d.before.epsilon == 0.0 and d.before.ledger_keys == ()
    # ...for another key: on A's own key its unspent 2 would come back
    same = decide_dataset_cap(cap(3.0), [ga], new(3.0, project="a"), T0, ledger)
    assert not same.allowed and same.max_epsilon == 1.0


def test_an_open_reservation_under_a_revoked_grant_counts() -> None:
    # a job that reserved before the revocation may still commit up to its reservation
    ga = grant(2.0, project="a", revoked=True)
    ledger = key_spends([granted(ga), reserved("a", 0.5)], "cohort")
    d = decide_dataset_cap(cap(3.0), [ga], new(3.0), T0, ledger)
    assert not d.allowed and d.before.epsilon == 0.5 and d.max_epsilon == 2.5


def test_a_dead_grant_on_a_key_shared_with_a_live_one_counts_in_full() -> None:
    # the live grant can spend the whole key, the revoked grant's unspent budget included
    g1 = grant(2.0, project="a", revoked=True)
    g2 = grant(0.5, project="a")
    ledger = key_spends([granted(g1), granted(g2), *spent("a", 0.25)], "cohort")
    worst = person_worst_case([g1, g2], "cohort", T0, ledger)
    assert worst.epsilon == 2.5 and worst.grant_ids == (g2.grant_id,)
    assert worst.released_epsilon == 0.25
    assert not decide_dataset_cap(cap(3.0), [g1, g2], new(1.0), T0, ledger).allowed


def test_a_second_grant_on_the_same_key_is_counted_with_the_first() -> None:
    g1 = grant(2.0, project="a")
    ledger = key_spends([granted(g1), *spent("a", 1.5)], "cohort")
    d = decide_dataset_cap(cap(3.0), [g1], new(2.0, project="a"), T0, ledger)
    assert not d.allowed and d.before.epsilon == 2.0 and d.after.epsilon == 4.0
    assert d.max_epsilon == 1.0
    g2 = grant(1.0, project="a")
    ledger = key_spends([granted(g1), *spent("a", 1.5), granted(g2)], "cohort")
    assert person_worst_case([g1, g2], "cohort", T0, ledger).epsilon == 3.0
    for project in ("a", "b"):
        assert not decide_dataset_cap(
            cap(3.0), [g1, g2], new(0.01, project=project), T0, ledger
        ).allowed


def test_a_live_grant_not_yet_in_the_ledger_counts_in_full() -> None:
    # the grant row is written before its ledger budget: in between it counts from the row
    g1, g2 = grant(2.0, project="a"), grant(0.5, project="a")
    ledger = key_spends([granted(g1)], "cohort")
    assert person_worst_case([g1, g2], "cohort", T0, ledger).epsilon == 2.5


def test_federated_spend_under_an_expired_grant_counts_at_the_worst_site() -> None:
    gf = grant(2.0, mechanisms=FED, expires_at=T0)
    events = [granted(gf, "north"), granted(gf, "south")]
    events += [*spent("a", 1.0, "north"), *spent("a", 0.5, "south")]
    ledger = key_spends(events, "cohort")
    d = decide_dataset_cap(cap(3.0), [gf], new(2.5), T0, ledger)
    assert d.before.per_site_epsilon == 1.0 and d.before.epsilon == 1.0
    assert d.before.ledger_keys == ("a/cohort@north",)
    assert not d.allowed and d.max_epsilon == 2.0
    # a new federated grant to B is charged at every site: the worst is still north
    fed = decide_dataset_cap(cap(3.0), [gf], new(2.0, mechanisms=FED), T0, ledger)
    assert fed.allowed and fed.after.per_site_epsilon == 3.0


def test_key_spends_folds_the_ledger() -> None:
    g = grant(2.0, delta=1e-5)
    r = reserved("a", 0.5, delta=1e-6)
    release = _event(EventKind.RELEASE, "a", 0.0, 0.0, "", reservation_id=r.reservation_id)
    events = [granted(g), *spent("a", 0.25, delta=1e-6), r, release, reserved("a", 0.125)]
    events.append(_event(EventKind.GRANT, "a", 9.0, 0.0, "", key=BudgetKey("a", "other")))
    (k,) = key_spends(events, "cohort")
    assert k == KeySpend(BudgetKey("a", "cohort"), 2.0, 1e-5, 0.375, 1e-6, frozenset({g.grant_id}))
    assert k.reach(True) == (2.0, 1e-5) and k.reach(False) == (0.375, 1e-6)


def test_a_ledger_listing_a_key_twice_is_a_bug() -> None:
    k = KeySpend(BudgetKey("a", "cohort"), 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(SpecError, match="twice"):
        person_worst_case([], "cohort", T0, [k, k])


# -- the property: approved requests never sum above the cap ----------------------------------------

MECHS = st.sampled_from([DP, FED, BOTH, frozenset({Mechanism.SYNTHETIC, Mechanism.DP_QUERY})])
EPS = st.one_of(
    st.floats(min_value=1e-3, max_value=10.0, allow_nan=False),
    st.sampled_from([0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0]),
)
DELTA = st.sampled_from([1e-7, 1e-6, 1e-5, 3e-5, 1e-4])
REQUEST = st.tuples(st.sampled_from(["a", "b", "c"]), MECHS, EPS, DELTA)


def _charge(mechanisms: frozenset[Mechanism], value: float) -> list[float]:
    """What one grant can charge one person (written out here, not taken from decisions)."""
    times = bool(mechanisms - {Mechanism.FEDERATED}) + (Mechanism.FEDERATED in mechanisms)
    return [value] * times


@settings(max_examples=300, deadline=None)
@given(
    cap_eps=st.sampled_from([0.3, 1.0, 3.0, 5.0, 7.5]),
    cap_delta=st.one_of(st.none(), st.sampled_from([1e-5, 5e-5, 1e-4])),
    requests=st.lists(REQUEST, max_size=12),
)
def test_approved_grants_never_sum_above_the_cap(
    cap_eps: float, cap_delta: float | None, requests: list[tuple[Any, ...]]
) -> None:
    c = cap(cap_eps, cap_delta)
    approved: list[GrantView] = []
    for i, (project, mechs, eps, delta) in enumerate(requests):
        ask = new(eps, project=project, mechanisms=mechs, delta=delta)
        d = decide_dataset_cap(c, approved, ask, T0)
        if d.allowed:
            approved.append(
                grant(eps, grant_id=f"g{i:03d}", project=project, mechanisms=mechs, delta=delta)
            )
        else:
            assert d.fixes  # a refusal always says what would fix it
            if d.max_epsilon and (cap_delta is None or d.max_delta):
                # the suggested figures really fit
                fix_delta = delta if d.max_delta is None else min(delta, d.max_delta)
                fixed = new(d.max_epsilon, project=project, mechanisms=mechs, delta=fix_delta)
                assert decide_dataset_cap(c, approved, fixed, T0).allowed
        total = math.fsum(x for g in approved for x in _charge(g.mechanisms, g.epsilon))
        assert within_cap(total, cap_eps)
        assert person_worst_case(approved, "cohort", T0).epsilon == total
        if cap_delta is not None:
            deltas = math.fsum(x for g in approved for x in _charge(g.mechanisms, g.delta))
            assert within_cap(deltas, cap_delta)


SITES = ("north", "south")
ASK = st.tuples(st.just("ask"), st.sampled_from(["a", "b"]), MECHS, EPS, DELTA)
SPEND = st.tuples(st.just("spend"), st.integers(0, 9), st.one_of(st.just(1.0), st.floats(0.0, 1.0)))
END = st.tuples(st.just("end"), st.integers(0, 9))


def _keys_of(g: GrantView) -> list[str]:
    """The ledger keys (sites) Service.approve gives a grant: "" dataset-wide, or each site."""
    wide = [""] if g.mechanisms - {Mechanism.FEDERATED} else []
    return wide + (list(SITES) if Mechanism.FEDERATED in g.mechanisms else [])


def _charged(events: list[LedgerEvent], pick: str) -> float:
    """What the committed jobs charged the most-charged person (every person is in the
    dataset-wide budgets, and at one site): written out here, not taken from decisions."""
    commits = [e for e in events if e.kind is EventKind.COMMIT]
    wide = [getattr(e, pick) for e in commits if e.key.site == ""]
    return max(
        math.fsum(wide + [getattr(e, pick) for e in commits if e.key.site == s]) for s in SITES
    )


@settings(max_examples=300, deadline=None)
@given(
    cap_eps=st.sampled_from([0.3, 1.0, 3.0, 5.0]),
    cap_delta=st.one_of(st.none(), st.sampled_from([1e-5, 5e-5, 1e-4])),
    ops=st.lists(st.one_of(ASK, SPEND, END), max_size=16),
)
def test_what_jobs_ever_spend_on_one_person_stays_under_the_cap(
    cap_eps: float, cap_delta: float | None, ops: list[tuple[Any, ...]]
) -> None:
    c = cap(cap_eps, cap_delta)
    grants: list[GrantView] = []
    events: list[LedgerEvent] = []

    def spend(g: GrantView, fraction: float) -> None:
        # a job under live grant g spends part of what each of its keys has left, all of it
        # the pooled remainder of the key (earlier, dead grants' included), as the ledger lets it
        for site in _keys_of(g):
            bal = fold_balance(BudgetKey(g.project, "cohort", site), events)
            e = max(bal.remaining_epsilon * fraction, 0.0)
            d = max(bal.remaining_delta * fraction, 0.0)
            if e > 0:
                events.extend(spent(g.project, e, site, d))

    def check() -> None:
        ledger = key_spends(events, "cohort")
        worst = person_worst_case(grants, "cohort", T0, ledger)
        assert within_cap(_charged(events, "epsilon"), cap_eps)
        assert within_cap(_charged(events, "epsilon"), worst.epsilon)  # an upper bound
        if cap_delta is not None:
            assert within_cap(_charged(events, "delta"), cap_delta)

    for op in ops:
        if op[0] == "ask":
            _, project, mechs, eps, delta = op
            ask = new(eps, project=project, mechanisms=mechs, delta=delta)
            ledger = key_spends(events, "cohort")
            d = decide_dataset_cap(c, grants, ask, T0, ledger)
            if d.allowed:
                gid = f"g{len(grants):03d}"
                g = grant(eps, grant_id=gid, project=project, mechanisms=mechs, delta=delta)
                grants.append(g)
                events.extend(granted(g, site) for site in _keys_of(g))
            elif d.max_epsilon and (cap_delta is None or d.max_delta):
                fix_delta = delta if d.max_delta is None else min(delta, d.max_delta)
                fixed = new(d.max_epsilon, project=project, mechanisms=mechs, delta=fix_delta)
                assert decide_dataset_cap(c, grants, fixed, T0, ledger).allowed
        elif op[0] == "spend":
            if op[1] < len(grants) and grants[op[1]].live_at(T0):
                spend(grants[op[1]], op[2])
        elif op[1] < len(grants):  # the grant expires or is revoked
            grants[op[1]] = replace(grants[op[1]], revoked=True)
        check()
    for g in grants:  # in the end every live grant spends everything its keys have left
        if g.live_at(T0):
            spend(g, 1.0)
    check()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(MECHS, EPS), max_size=8), st.randoms(use_true_random=False))
def test_worst_case_does_not_depend_on_grant_order(
    specs: list[tuple[frozenset[Mechanism], float]], rnd: Any
) -> None:
    grants = [grant(eps, mechanisms=m) for m, eps in specs]
    shuffled = list(grants)
    rnd.shuffle(shuffled)
    assert person_worst_case(grants, "cohort", T0) == person_worst_case(shuffled, "cohort", T0)


# -- the store ---------------------------------------------------------------------------------------


class FrozenClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    # every engine the product supports (conftest ``db_url``: SQLite, PostgreSQL)
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def store(engine: Engine, clock: FrozenClock) -> StateStore:
    s = StateStore(engine, clock=clock)
    for name, role in (("sam", Role.STEWARD), ("stella", Role.STEWARD), ("rita", Role.RESEARCHER)):
        s.add_user(name, role)
    s.register_dataset(
        "cohort",
        {"columns": {"age": {"type": "double", "role": "feature"}}},
        "/zone/datasets/cohort",
        1000,
        400,
        {"north": 600, "south": 400},
        "sam",
    )
    for p in ("a", "b"):
        s.create_project(p, f"project {p}", "rita")
    return s


def _request(store: StateStore, project: str, epsilon: float, mechanisms: Any = ("dp-sgd",)):
    return store.request_access(project, "cohort", ["age"], list(mechanisms), epsilon, 1e-5, "rita")


def test_no_cap_until_one_is_set(store: StateStore) -> None:
    assert store.dataset_cap("cohort") is None
    assert store.dataset_cap_history("cohort") == []


def test_set_and_get_a_cap_latest_wins(store: StateStore, clock: FrozenClock) -> None:
    first = store.set_dataset_cap("cohort", 5, by="sam")
    assert first == DatasetCap("cohort", 5.0, None, "sam", T0)
    assert store.dataset_cap("cohort") == first
    clock.now = T0 + timedelta(hours=1)
    second = store.set_dataset_cap("cohort", 3.0, 1e-5, by="stella")
    assert store.dataset_cap("cohort") == second
    assert second.delta == 1e-5 and second.set_by == "stella" and second.set_at == clock.now
    assert store.dataset_cap_history("cohort") == [first, second]  # kept, oldest first
    # a new store on the same database sees it (persisted, aware UTC)
    again = StateStore(store.engine).dataset_cap("cohort")
    assert again == second and again is not None and again.set_at.tzinfo is not None


@pytest.mark.parametrize(
    ("epsilon", "delta", "field"),
    [
        (0, None, "epsilon"),
        (-1.0, None, "epsilon"),
        (math.nan, None, "epsilon"),
        (math.inf, None, "epsilon"),
        (True, None, "epsilon"),
        (3.0, 0.0, "delta"),
        (3.0, 1.0, "delta"),
        (3.0, math.nan, "delta"),
    ],
)
def test_bad_caps_name_the_field(
    store: StateStore, epsilon: float, delta: float | None, field: str
) -> None:
    with pytest.raises(SpecError) as err:
        store.set_dataset_cap("cohort", epsilon, delta, by="sam")
    assert err.value.field == field
    assert store.dataset_cap("cohort") is None


def test_cap_on_an_unknown_dataset_or_by_an_unknown_user(store: StateStore) -> None:
    with pytest.raises(NotFoundError, match="known datasets: cohort"):
        store.set_dataset_cap("nope", 3.0, by="sam")
    with pytest.raises(NotFoundError):
        store.dataset_cap("nope")
    with pytest.raises(NotFoundError, match="by"):
        store.set_dataset_cap("cohort", 3.0, by="mallory")


def test_dataset_grants_span_every_project(store: StateStore) -> None:
    ga = store.approve(_request(store, "a", 1.0).id, "sam")
    gb = store.approve(_request(store, "b", 1.0).id, "sam")
    assert {g.grant_id for g in store.dataset_grants("cohort")} == {ga.id, gb.id}


def test_store_approve_over_the_cap_writes_nothing(store: StateStore) -> None:
    store.set_dataset_cap("cohort", 3.0, by="sam")
    store.approve(_request(store, "a", 2.0).id, "sam")
    over = _request(store, "b", 2.0)
    d = store.cap_decision(over.id)
    assert not d.allowed and d.max_epsilon == 1.0
    with pytest.raises(PolicyDenied, match="lower --epsilon to at most 1"):
        store.approve(over.id, "sam")
    assert store.get_request(over.id).state == RequestState.PENDING
    assert [g.project for g in store.list_grants(dataset="cohort")] == ["a"]
    # the steward's --epsilon override is what is checked
    assert store.cap_decision(over.id, epsilon=1.0).allowed
    g = store.approve(over.id, "sam", epsilon=1.0)
    assert g.project == "b" and g.epsilon == 1.0
    with pytest.raises(PolicyDenied, match="approved"):
        store.cap_decision(over.id)  # no longer pending


def test_revoking_a_grant_makes_room(store: StateStore) -> None:
    store.set_dataset_cap("cohort", 3.0, by="sam")
    ga = store.approve(_request(store, "a", 2.0).id, "sam")
    rb = _request(store, "b", 2.0)
    assert not store.cap_decision(rb.id).allowed
    store.revoke_grant(ga.id, "sam")
    assert store.approve(rb.id, "sam").epsilon == 2.0


def test_expired_grants_make_room(store: StateStore, clock: FrozenClock) -> None:
    store.set_dataset_cap("cohort", 3.0, by="sam")
    store.approve(_request(store, "a", 2.0).id, "sam", expires_at=T0 + timedelta(days=1))
    rb = _request(store, "b", 2.0)
    assert not store.cap_decision(rb.id).allowed
    clock.now = T0 + timedelta(days=1)
    assert store.cap_decision(rb.id).allowed


def test_a_cap_below_existing_grants_is_kept_and_refuses_new_ones(store: StateStore) -> None:
    ga = store.approve(_request(store, "a", 2.0).id, "sam")
    lowered = store.set_dataset_cap("cohort", 1.0, by="sam")  # allowed, not refused
    assert store.dataset_cap("cohort") == lowered
    assert store.get_grant(ga.id).revoked_at is None  # the existing grant stays
    d = store.cap_decision(_request(store, "b", 0.5).id)
    assert not d.allowed and d.epsilon_left == 0.0


def test_a_federated_request_is_checked_per_person(store: StateStore) -> None:
    store.set_dataset_cap("cohort", 3.0, by="sam")
    store.approve(_request(store, "a", 1.0, ("federated",)).id, "sam")
    both = _request(store, "b", 1.5, ("dp-sgd", "federated"))
    d = store.cap_decision(both.id)
    assert not d.allowed and d.max_epsilon == 1.0  # (3 - 1) / 2
    assert store.approve(both.id, "sam", epsilon=1.0).epsilon == 1.0


def test_store_counts_what_the_ledger_shows_spent_under_an_expired_grant(
    store: StateStore, engine: Engine, clock: FrozenClock
) -> None:
    # the ledger lives in the store's database (Service opens both on one engine)
    ledger = Ledger(engine)
    ledger.create_schema()
    key = BudgetKey("a", "cohort")
    store.set_dataset_cap("cohort", 3.0, by="sam")
    ga = store.approve(_request(store, "a", 2.0).id, "sam", expires_at=T0 + timedelta(days=1))
    ledger.grant(key, ga.epsilon, ga.delta, actor="sam", grant_id=ga.id)
    rid = ledger.reserve(key, 1.5, 0.0, job_id="job-1", actor="rita")
    ledger.commit(rid, 1.5, 0.0, actor="worker")
    clock.now = T0 + timedelta(days=1)  # A's grant has expired: its 1.5 is still spent
    assert store.worst_case("cohort").epsilon == 1.5
    rb = _request(store, "b", 2.0)
    d = store.cap_decision(rb.id)
    assert not d.allowed and d.max_epsilon == 1.5
    with pytest.raises(PolicyDenied, match="lower --epsilon to at most 1.5"):
        store.approve(rb.id, "sam")
    # a second grant to A reopens A's key, which still holds the 0.5 A left unspent
    ra = _request(store, "a", 1.5)
    assert store.cap_decision(ra.id).max_epsilon == 1.0
    assert store.approve(rb.id, "sam", epsilon=1.5).epsilon == 1.5
    assert store.worst_case("cohort").epsilon == 3.0
    with pytest.raises(NotFoundError):
        store.worst_case("nope")


# -- the service ---------------------------------------------------------------------------------------


@pytest.fixture
def world(tmp_path: Path):
    from factories import make_world

    from sandbox.backend import InProcessBackend

    w = make_world(tmp_path / "zone", InProcessBackend(), patients=300, grant_epsilon=None)
    w.svc.create_project(w.researcher, "b", "the second project")
    yield w
    w.svc.close()


def _svc_request(w: Any, project: str, epsilon: float) -> Any:
    return w.svc.request_access(
        w.researcher, project, "cohort", ["age", "readmitted_30d"], ["dp-sgd"], epsilon, 1e-5
    )


def test_service_caps_across_projects_and_leaves_the_ledger_alone(world: Any) -> None:
    w = world
    out = w.svc.set_dataset_cap(w.steward, "cohort", 3.0)
    assert out["cap"].epsilon == 3.0 and out["worst_case"].epsilon == 0.0
    assert out["over_cap"] is False and out["epsilon_left"] == 3.0
    w.svc.approve(w.steward, _svc_request(w, "readmission", 2.0).id)
    rb = _svc_request(w, "b", 2.0)
    n_audit = w.svc.audit.verify().checked
    with pytest.raises(PolicyDenied) as err:
        w.svc.approve(w.steward, rb.id)
    msg = str(err.value)
    assert "\n" not in msg and "--epsilon" in msg and "1 left under the cap" in msg
    assert w.svc.ledger.balances("b") == []  # nothing granted in the ledger
    assert w.svc.store.get_request(rb.id).state == RequestState.PENDING
    events = w.svc.audit.list(limit=1)
    assert w.svc.audit.verify().checked == n_audit + 1
    assert events[-1].action == "access.approve" and events[-1].outcome == "denied"
    assert events[-1].details["cap_epsilon"] == 3.0
    assert events[-1].details["worst_case_epsilon"] == 4.0
    g = w.svc.approve(w.steward, rb.id, epsilon=1.0)
    assert [b.granted_epsilon for b in w.svc.ledger.balances("b")] == [1.0]
    assert g.epsilon == 1.0


def test_only_stewards_set_caps_and_every_call_is_audited(world: Any) -> None:
    w = world
    with pytest.raises(PolicyDenied, match="dataset.cap"):
        w.svc.set_dataset_cap(w.researcher, "cohort", 100.0)
    with pytest.raises(SpecError, match="--epsilon"):
        w.svc.set_dataset_cap(w.steward, "cohort", -1.0)
    assert w.svc.store.dataset_cap("cohort") is None
    w.svc.set_dataset_cap(w.steward, "cohort", 3.0, 1e-5)
    events = [e for e in w.svc.audit.list() if e.action == "dataset.cap"]
    assert [e.outcome for e in events] == ["denied", "denied", "ok"]
    assert events[-1].target == "cohort" and events[-1].details["delta"] == 1e-5


def test_lowering_a_cap_below_the_grants_is_reported(world: Any) -> None:
    w = world
    w.svc.approve(w.steward, _svc_request(w, "readmission", 2.0).id)
    out = w.svc.set_dataset_cap(w.steward, "cohort", 1.0)
    assert out["over_cap"] is True and out["worst_case"].epsilon == 2.0
    assert out["epsilon_left"] == 0.0


def test_service_counts_spend_under_a_revoked_grant_and_the_same_key(world: Any) -> None:
    w = world
    w.svc.set_dataset_cap(w.steward, "cohort", 3.0)
    ga = w.svc.approve(w.steward, _svc_request(w, "readmission", 2.0).id)
    key = BudgetKey("readmission", "cohort")
    rid = w.svc.ledger.reserve(key, 1.5, 0.0, job_id="job-1", actor=w.researcher.name)
    w.svc.ledger.commit(rid, 1.5, 0.0, actor="worker")
    w.svc.store.revoke_grant(ga.id, w.steward.name)  # the 1.5 stays spent on the same people
    rb = _svc_request(w, "b", 2.0)
    with pytest.raises(PolicyDenied, match=r"\(1\.5 left under the cap\)"):
        w.svc.approve(w.steward, rb.id)
    assert w.svc.ledger.balances("b") == []
    # a second grant on the revoked grant's key: its unspent 0.5 comes back with it
    ra = _svc_request(w, "readmission", 1.5)
    with pytest.raises(PolicyDenied, match="brings back epsilon 0.5") as err:
        w.svc.approve(w.steward, ra.id)
    assert "lower --epsilon to at most 1" in str(err.value)
    w.svc.approve(w.steward, ra.id, epsilon=1.0)
    (bal,) = w.svc.ledger.balances("readmission")
    assert bal.granted_epsilon == 3.0 and bal.remaining_epsilon == 1.5  # spendable: 1.5
    out = w.svc.set_dataset_cap(w.steward, "cohort", 3.0)
    assert out["worst_case"].epsilon == 3.0 and out["worst_case"].released_epsilon == 1.5
    assert out["over_cap"] is False and out["epsilon_left"] == 0.0
    with pytest.raises(PolicyDenied, match="0 left under the cap"):
        w.svc.approve(w.steward, rb.id, epsilon=0.01)
