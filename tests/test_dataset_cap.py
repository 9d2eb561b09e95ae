"""The zone-wide cap per dataset: one person's epsilon (and delta) over every project.

The pure decision first (``decide_dataset_cap``, ``person_worst_case``), with a property: for
any sequence of requests, the approved ones never sum above the cap. Then the store (cap
settings are kept, the latest wins, an approval over the cap writes nothing) and the service
(stewards only, audited, the ledger untouched by a refusal).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from connectors.errors import NotFoundError, PolicyDenied, SpecError
from policies.decisions import (
    DatasetCap,
    GrantView,
    Mechanism,
    NewGrant,
    RequestState,
    decide_dataset_cap,
    person_worst_case,
    within_cap,
)
from policies.roles import Role
from policies.store import StateStore
from privacy.sql import make_engine

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
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'zone.db'}")
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
