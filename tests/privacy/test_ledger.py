"""Contract tests for the privacy ledger (``privacy/ledger.py``).

One suite, run against every backend available: a fresh SQLite file database always, and
PostgreSQL on a fresh database per test (``tests/pg_cluster.py``: the server in
``SANDBOX_TEST_PG_URL``, or a throwaway cluster when Debian's postgresql is installed;
skipped, saying why, otherwise).

Numbers are checked against hand arithmetic or against ``_recompute``, an independent fold
of the raw events written here, never against the ledger's own ``fold_balance``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Engine

from foundation.errors import (
    BudgetExceeded,
    IntegrityError,
    NotFoundError,
    SpecError,
    UserError,
)
from privacy.budget_events import (
    ALLOWED_TRANSITIONS,
    Balance,
    BudgetKey,
    EventKind,
    LedgerEvent,
    ReservationState,
    check_transition,
)
from privacy.ledger import Ledger
from privacy.ledger_schema import ledger_events

KEY = BudgetKey("proj-a", "icu-cohort")

EngineFactory = Callable[[], Engine]


# --------------------------------------------------------------------------- fixtures


class FrozenClock:
    """A clock that starts at a fixed instant and moves one second per reading."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def ledger(engine_factory: EngineFactory, clock: FrozenClock) -> Ledger:
    led = Ledger(engine_factory(), clock=clock)
    led.create_schema()
    return led


def grant(ledger: Ledger, key: BudgetKey = KEY, eps: float = 1.0, delta: float = 1e-5,
          **kw: Any) -> LedgerEvent:  # fmt: skip
    kw.setdefault("grant_id", f"grant-{len(ledger.events())}")
    kw.setdefault("actor", "steward@site")
    return ledger.grant(key, eps, delta, **kw)


def reserve(ledger: Ledger, eps: float, delta: float = 0.0, key: BudgetKey = KEY) -> str:
    return ledger.reserve(key, eps, delta, job_id="job-1", actor="researcher@site")


def _recompute(events: list[LedgerEvent]) -> dict[str, float]:
    """An independent fold: granted/spent/reserved straight from the raw events."""
    closed = {e.reservation_id for e in events if e.kind in (EventKind.COMMIT, EventKind.RELEASE)}
    out = {"granted_e": 0.0, "granted_d": 0.0, "spent_e": 0.0, "spent_d": 0.0,
           "reserved_e": 0.0, "reserved_d": 0.0}  # fmt: skip
    for e in events:
        if e.kind == "grant":
            out["granted_e"] += e.epsilon
            out["granted_d"] += e.delta
        elif e.kind == "commit":
            out["spent_e"] += e.epsilon
            out["spent_d"] += e.delta
        elif e.kind == "reserve" and e.reservation_id not in closed:
            out["reserved_e"] += e.epsilon
            out["reserved_d"] += e.delta
    return out


def _as_dict(b: Balance) -> dict[str, float]:
    return {"granted_e": b.granted_epsilon, "granted_d": b.granted_delta,
            "spent_e": b.spent_epsilon, "spent_d": b.spent_delta,
            "reserved_e": b.reserved_epsilon, "reserved_d": b.reserved_delta}  # fmt: skip


# --------------------------------------------------------------------------- schema, vocabulary


def test_create_schema_is_idempotent_and_keeps_events(ledger: Ledger) -> None:
    grant(ledger)
    ledger.create_schema()
    ledger.create_schema()
    assert len(ledger.events()) == 1


def test_rows_cannot_be_updated_or_deleted_even_bypassing_the_ledger(ledger: Ledger) -> None:
    """Chokepoint: the database itself refuses UPDATE and DELETE on ledger_events."""
    grant(ledger)
    engine = ledger._engine
    for statement in (
        sa.update(ledger_events).values(epsilon=100.0),
        sa.delete(ledger_events),
    ):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    assert ledger.balance(KEY).granted_epsilon == 1.0


def test_transitions_are_data_and_invalid_ones_raise() -> None:
    o, c, r = ReservationState.OPEN, ReservationState.COMMITTED, ReservationState.RELEASED
    assert ALLOWED_TRANSITIONS == {(o, c), (o, r)}
    check_transition(o, c)
    check_transition(o, r)
    for bad in [(c, r), (r, c), (c, o), (r, o), (o, o), (c, c), (r, r)]:
        with pytest.raises(IntegrityError, match="cannot become"):
            check_transition(*bad, reservation_id="res-1")


def test_values_are_frozen(ledger: Ledger) -> None:
    ev = grant(ledger)
    with pytest.raises(FrozenInstanceError):
        ev.epsilon = 5.0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        ledger.balance(KEY).spent_epsilon = 0.0  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        KEY.site = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"project": "", "dataset": "d"}, "budget.project"),
        ({"project": "p", "dataset": ""}, "budget.dataset"),
        ({"project": " p", "dataset": "d"}, "budget.project"),
        ({"project": "p", "dataset": "d", "site": "a\n"}, "budget.site"),
        ({"project": "p", "dataset": "d" * 257}, "budget.dataset"),
    ],
)
def test_budget_key_validation_names_the_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(SpecError) as info:
        BudgetKey(**kwargs)
    assert info.value.field == field


def test_budget_key_str() -> None:
    assert str(BudgetKey("p", "d")) == "p/d"
    assert str(BudgetKey("p", "d", "leeds")) == "p/d@leeds"


# --------------------------------------------------------------------------- grants


def test_grant_records_an_event_and_balance(ledger: Ledger, clock: FrozenClock) -> None:
    ev = ledger.grant(KEY, 2.0, 1e-5, actor="steward@site", grant_id="IG-17", note="ticket 17")
    assert ev.kind is EventKind.GRANT
    assert (ev.event_id, ev.key, ev.epsilon, ev.delta) == ("IG-17", KEY, 2.0, 1e-5)
    assert (ev.actor, ev.note, ev.reservation_id, ev.job_id) == (
        "steward@site",
        "ticket 17",
        None,
        None,
    )
    assert ev.at == clock.now and ev.at.tzinfo is not None
    assert ledger.events() == [ev]  # what is returned is what is stored
    b = ledger.balance(KEY)
    assert (b.granted_epsilon, b.remaining_epsilon, b.spent_epsilon, b.reserved_epsilon) == (
        2.0,
        2.0,
        0,
        0,
    )
    assert (b.granted_delta, b.remaining_delta) == (1e-5, 1e-5)


def test_top_up_grants_add_up(ledger: Ledger) -> None:
    grant(ledger, eps=1.0, delta=1e-6)
    rid = reserve(ledger, 1.0)
    with pytest.raises(BudgetExceeded):
        reserve(ledger, 0.5)
    grant(ledger, eps=0.5, delta=2e-6)
    reserve(ledger, 0.5)
    b = ledger.balance(KEY)
    assert b.granted_epsilon == 1.5 and b.granted_delta == 3e-6
    assert b.reserved_epsilon == 1.5 and b.remaining_epsilon == 0.0
    ledger.commit(rid, 1.0, 0.0, actor="runner")
    assert ledger.balance(KEY).spent_epsilon == 1.0


def test_grant_is_idempotent_on_grant_id(ledger: Ledger) -> None:
    first = ledger.grant(KEY, 1.0, 1e-5, actor="steward", grant_id="IG-1")
    again = ledger.grant(KEY, 1.0, 1e-5, actor="steward", grant_id="IG-1")
    assert again == first
    assert len(ledger.events()) == 1
    assert ledger.balance(KEY).granted_epsilon == 1.0


def test_a_different_grant_under_the_same_id_raises(ledger: Ledger) -> None:
    ledger.grant(KEY, 1.0, 1e-5, actor="steward", grant_id="IG-1")
    with pytest.raises(IntegrityError, match="grant_id 'IG-1'"):
        ledger.grant(KEY, 2.0, 1e-5, actor="steward", grant_id="IG-1")
    with pytest.raises(IntegrityError, match="new id"):
        ledger.grant(BudgetKey("p", "other"), 1.0, 1e-5, actor="steward", grant_id="IG-1")
    assert len(ledger.events()) == 1


@pytest.mark.parametrize(
    ("eps", "delta", "field"),
    [
        (-1.0, 0.0, "grant.epsilon"),
        (math.nan, 0.0, "grant.epsilon"),
        (math.inf, 0.0, "grant.epsilon"),
        (1.0, -1e-9, "grant.delta"),
        (1.0, 1.0, "grant.delta"),
        (0.0, 0.0, "grant.epsilon"),
    ],
)
def test_bad_grants_name_the_field(ledger: Ledger, eps: float, delta: float, field: str) -> None:
    with pytest.raises(SpecError) as info:
        ledger.grant(KEY, eps, delta, actor="steward", grant_id="g")
    assert info.value.field == field
    assert ledger.events() == []


@pytest.mark.parametrize(
    ("actor", "grant_id", "field"),
    [
        ("", "g", "grant.actor"),
        ("steward", "", "grant.grant_id"),
        ("steward", "g" * 129, "grant.grant_id"),
    ],
)
def test_grants_need_an_actor_and_an_id(
    ledger: Ledger, actor: str, grant_id: str, field: str
) -> None:
    with pytest.raises(SpecError) as info:
        ledger.grant(KEY, 1.0, 0.0, actor=actor, grant_id=grant_id)
    assert info.value.field == field
    assert ledger.events() == []


# --------------------------------------------------------------------------- reserve


def test_reserve_holds_budget_and_opens_a_reservation(ledger: Ledger) -> None:
    grant(ledger, eps=1.0, delta=1e-5)
    rid = ledger.reserve(KEY, 0.25, 1e-6, job_id="job-9", actor="researcher")
    res = ledger.reservation(rid)
    assert res.state is ReservationState.OPEN
    assert (res.reservation_id, res.key, res.epsilon, res.delta, res.job_id) == (
        rid,
        KEY,
        0.25,
        1e-6,
        "job-9",
    )
    assert ledger.open_reservations() == [res]
    assert ledger.open_reservations(KEY) == [res]
    assert ledger.open_reservations(BudgetKey("proj-a", "elsewhere")) == []
    b = ledger.balance(KEY)
    assert (b.reserved_epsilon, b.spent_epsilon, b.remaining_epsilon) == (0.25, 0.0, 0.75)
    assert b.reserved_delta == 1e-6
    assert math.isclose(b.remaining_delta, 9e-6, rel_tol=1e-12)
    ev = ledger.events()[-1]
    assert (ev.kind, ev.reservation_id, ev.job_id, ev.actor) == (
        EventKind.RESERVE,
        rid,
        "job-9",
        "researcher",
    )


def test_over_budget_is_refused_with_a_clear_message_and_no_event(ledger: Ledger) -> None:
    grant(ledger, eps=1.0)
    rid = reserve(ledger, 0.5)
    ledger.commit(rid, 0.25, 0.0, actor="runner")
    reserve(ledger, 0.5)
    before = ledger.events()
    with pytest.raises(BudgetExceeded) as info:
        reserve(ledger, 0.5)
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "proj-a/icu-cohort" in msg  # the key
    assert "requested epsilon 0.5" in msg  # what was asked
    assert "only 0.25 remains" in msg  # what is left
    assert "ask the steward for more budget or lower privacy.epsilon" in msg  # the fix
    assert ledger.events() == before


def test_delta_over_budget_is_refused(ledger: Ledger) -> None:
    grant(ledger, eps=10.0, delta=1e-6)
    before = ledger.events()
    with pytest.raises(BudgetExceeded, match=r"requested delta 2e-06.*lower privacy\.delta"):
        reserve(ledger, 0.1, 2e-6)
    assert ledger.events() == before


def test_no_grant_means_no_budget(ledger: Ledger) -> None:
    with pytest.raises(BudgetExceeded, match="no epsilon has been granted"):
        reserve(ledger, 0.1)
    assert ledger.events() == []


def test_exact_fit_and_float_rounding(ledger: Ledger) -> None:
    grant(ledger, eps=0.3, delta=0.0)
    reserve(ledger, 0.1)
    reserve(ledger, 0.2)  # 0.1 + 0.2 > 0.3 in binary floats, but fits in decimal
    with pytest.raises(BudgetExceeded):
        reserve(ledger, 1e-9)


@pytest.mark.parametrize(
    ("eps", "delta", "field"),
    [
        (0.0, 0.0, "privacy.epsilon"),
        (-0.5, 0.0, "privacy.epsilon"),
        (math.nan, 0.0, "privacy.epsilon"),
        (math.inf, 0.0, "privacy.epsilon"),
        (True, 0.0, "privacy.epsilon"),
        ("1.0", 0.0, "privacy.epsilon"),
        (0.5, math.nan, "privacy.delta"),
        (0.5, -1e-9, "privacy.delta"),
        (0.5, 1.0, "privacy.delta"),
    ],
)
def test_bad_requests_are_spec_errors(ledger: Ledger, eps: Any, delta: Any, field: str) -> None:
    grant(ledger, eps=10.0)
    before = ledger.events()
    with pytest.raises(SpecError) as info:
        ledger.reserve(KEY, eps, delta, job_id="job", actor="researcher")
    assert info.value.field == field
    assert info.value.fix
    assert ledger.events() == before


def test_sites_have_their_own_budgets(ledger: Ledger) -> None:
    leeds, york = (
        BudgetKey("proj-a", "icu-cohort", "leeds"),
        BudgetKey("proj-a", "icu-cohort", "york"),
    )
    grant(ledger, leeds, eps=1.0)
    reserve(ledger, 1.0, key=leeds)
    with pytest.raises(BudgetExceeded, match="proj-a/icu-cohort@york"):
        reserve(ledger, 0.1, key=york)
    with pytest.raises(BudgetExceeded):
        reserve(ledger, 0.1, key=KEY)
    assert ledger.balance(york).granted_epsilon == 0.0
    assert ledger.balance(leeds).remaining_epsilon == 0.0


# --------------------------------------------------------------------------- commit / release


def test_commit_charges_the_accountants_figure_and_returns_the_rest(ledger: Ledger) -> None:
    grant(ledger, eps=2.0, delta=1e-5)
    rid = ledger.reserve(KEY, 1.0, 4e-6, job_id="job-3", actor="researcher")
    ev = ledger.commit(rid, 0.75, 2e-6, actor="runner", note="RDP, add/remove one person")
    assert (ev.kind, ev.reservation_id, ev.job_id, ev.key) == (EventKind.COMMIT, rid, "job-3", KEY)
    assert (ev.epsilon, ev.delta, ev.note) == (0.75, 2e-6, "RDP, add/remove one person")
    b = ledger.balance(KEY)
    assert (b.spent_epsilon, b.reserved_epsilon, b.remaining_epsilon) == (0.75, 0.0, 1.25)
    assert b.spent_delta == 2e-6 and b.reserved_delta == 0.0
    res = ledger.reservation(rid)
    assert res.state is ReservationState.COMMITTED
    assert (res.spent_epsilon, res.spent_delta) == (0.75, 2e-6)
    assert res.closed_at == ev.at
    assert ledger.open_reservations() == []


def test_commit_is_idempotent(ledger: Ledger) -> None:
    grant(ledger)
    rid = reserve(ledger, 0.5)
    first = ledger.commit(rid, 0.5, 0.0, actor="runner")
    again = ledger.commit(rid, 0.5, 0.0, actor="runner-retry")
    assert again == first
    assert len(ledger.events()) == 3
    assert ledger.balance(KEY).spent_epsilon == 0.5  # never double-charged


def test_commit_with_other_figures_after_commit_raises(ledger: Ledger) -> None:
    grant(ledger)
    rid = reserve(ledger, 0.5)
    ledger.commit(rid, 0.5, 0.0, actor="runner")
    before = ledger.events()
    with pytest.raises(IntegrityError, match="already committed"):
        ledger.commit(rid, 0.25, 0.0, actor="runner")
    assert ledger.events() == before


def test_release_frees_everything_and_is_idempotent(ledger: Ledger) -> None:
    grant(ledger, eps=1.0)
    rid = reserve(ledger, 1.0)
    first = ledger.release(rid, actor="runner", reason="image pull failed")
    assert (first.kind, first.epsilon, first.delta, first.note) == (
        EventKind.RELEASE,
        0.0,
        0.0,
        "image pull failed",
    )
    again = ledger.release(rid, actor="runner", reason="retry")
    assert again == first
    assert len(ledger.events()) == 3
    assert ledger.reservation(rid).state is ReservationState.RELEASED
    b = ledger.balance(KEY)
    assert (b.remaining_epsilon, b.spent_epsilon, b.reserved_epsilon) == (1.0, 0.0, 0.0)
    reserve(ledger, 1.0)  # the budget is back


@pytest.mark.parametrize("first", ["commit", "release"])
def test_a_conflicting_close_raises_and_writes_nothing(ledger: Ledger, first: str) -> None:
    grant(ledger)
    rid = reserve(ledger, 0.5)
    close: dict[str, Callable[[], LedgerEvent]] = {
        "commit": lambda: ledger.commit(rid, 0.5, 0.0, actor="runner"),
        "release": lambda: ledger.release(rid, actor="runner", reason="failed"),
    }
    close[first]()
    before = ledger.events()
    other = "release" if first == "commit" else "commit"
    with pytest.raises(IntegrityError, match="cannot become") as info:
        close[other]()
    assert not info.value.retryable
    assert ledger.events() == before


@pytest.mark.parametrize(("eps", "delta"), [(0.5 + 1e-9, 0.0), (0.5, 2e-6), (1.0, 0.0)])
def test_commit_more_than_reserved_raises_and_writes_nothing(
    ledger: Ledger, eps: float, delta: float
) -> None:
    grant(ledger, eps=2.0, delta=1e-5)
    rid = reserve(ledger, 0.5, 1e-6)
    before = ledger.events()
    with pytest.raises(IntegrityError, match="exceeds the .* reserved"):
        ledger.commit(rid, eps, delta, actor="runner")
    assert ledger.events() == before
    assert ledger.reservation(rid).state is ReservationState.OPEN


def test_commit_within_rounding_of_the_reservation_is_accepted(ledger: Ledger) -> None:
    grant(ledger)
    rid = reserve(ledger, 0.5)
    ledger.commit(rid, 0.5 + 1e-13, 0.0, actor="runner")
    assert ledger.reservation(rid).state is ReservationState.COMMITTED


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1])
def test_commit_rejects_a_broken_accountant_figure(ledger: Ledger, bad: float) -> None:
    grant(ledger)
    rid = reserve(ledger, 0.5)
    before = ledger.events()
    with pytest.raises(IntegrityError, match="epsilon_spent"):
        ledger.commit(rid, bad, 0.0, actor="runner")
    assert ledger.events() == before


def test_unknown_reservations_are_not_found(ledger: Ledger) -> None:
    for call in (
        lambda: ledger.commit("nope", 0.1, 0.0, actor="runner"),
        lambda: ledger.release("nope", actor="runner", reason="x"),
        lambda: ledger.reservation("nope"),
    ):
        with pytest.raises(NotFoundError, match="'nope' is not in the ledger"):
            call()


# --------------------------------------------------------------------------- reads


def test_balances_lists_every_key_of_a_project(ledger: Ledger) -> None:
    other_ds, site = BudgetKey("proj-a", "ed-visits"), BudgetKey("proj-a", "icu-cohort", "leeds")
    grant(ledger, KEY, eps=1.0)
    grant(ledger, other_ds, eps=2.0)
    grant(ledger, site, eps=3.0)
    grant(ledger, BudgetKey("proj-b", "icu-cohort"), eps=4.0)
    reserve(ledger, 0.5, key=other_ds)
    got = ledger.balances("proj-a")
    assert [b.key for b in got] == [other_ds, KEY, site]
    assert [b.remaining_epsilon for b in got] == [1.5, 1.0, 3.0]
    assert ledger.balances("nobody") == []


def test_events_are_ordered_and_filtered_by_key(ledger: Ledger) -> None:
    other = BudgetKey("proj-a", "ed-visits")
    grant(ledger, KEY)
    grant(ledger, other)
    reserve(ledger, 0.5)
    everything = ledger.events()
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)
    assert len({e.event_id for e in everything}) == 3
    assert [e.kind for e in ledger.events(KEY)] == [EventKind.GRANT, EventKind.RESERVE]
    assert [e.key for e in ledger.events(other)] == [other]


def test_a_second_ledger_on_the_same_database_sees_the_same_events(ledger: Ledger) -> None:
    grant(ledger)
    rid = reserve(ledger, 0.5)
    twin = Ledger(ledger._engine)
    twin.commit(rid, 0.25, 0.0, actor="runner")
    assert ledger.balance(KEY) == twin.balance(KEY)
    assert ledger.balance(KEY).spent_epsilon == 0.25


def test_balance_matches_an_independent_recomputation(ledger: Ledger) -> None:
    grant(ledger, eps=1.0, delta=1e-5)
    grant(ledger, eps=0.7, delta=3e-6)
    a = ledger.reserve(KEY, 0.3, 1e-6, job_id="a", actor="r")
    b = ledger.reserve(KEY, 0.6, 2e-6, job_id="b", actor="r")
    ledger.reserve(KEY, 0.1, 0.0, job_id="c", actor="r")
    ledger.commit(a, 0.2, 1e-6, actor="runner")
    ledger.release(b, actor="runner", reason="failed")
    expected = _recompute(ledger.events(KEY))
    for name, value in _as_dict(ledger.balance(KEY)).items():
        assert math.isclose(value, expected[name], rel_tol=1e-12, abs_tol=1e-18), name
    bal = ledger.balance(KEY)
    assert math.isclose(bal.remaining_epsilon, 1.7 - 0.2 - 0.1, rel_tol=1e-12)


# --------------------------------------------------------------------------- property


# amounts on binary grids, so every sum is exact and the model predicts refusals exactly
EPS = st.integers(1, 12).map(lambda n: n / 8)
DELTA = st.sampled_from([0.0, 0.0, 2.0**-20, 2.0**-19])
GRANT_EPS = st.integers(1, 24).map(lambda n: n / 8)
GRANT_DELTA = st.integers(0, 8).map(lambda n: n * 2.0**-20)
KEYS = [KEY, BudgetKey("proj-a", "icu-cohort", "leeds")]


class LedgerMachine(RuleBasedStateMachine):
    """Random grant/reserve/commit/release sequences against a fresh ledger and a model."""

    reservations = Bundle("reservations")

    @staticmethod
    def make_engine() -> Engine:
        raise NotImplementedError("subclass per backend with make_engine = staticmethod(...)")

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(self.make_engine())
        self.ledger.create_schema()
        self.granted = {k: [0.0, 0.0] for k in KEYS}
        self.spent = {k: [0.0, 0.0] for k in KEYS}
        self.open: dict[str, tuple[BudgetKey, float, float]] = {}
        self.closed: dict[str, tuple[str, float, float]] = {}
        self.last_spent = {k: (0.0, 0.0) for k in KEYS}
        self.grants = 0

    def _reserved(self, key: BudgetKey) -> tuple[float, float]:
        held = [(e, d) for k, e, d in self.open.values() if k == key]
        return sum(e for e, _ in held), sum(d for _, d in held)

    def _count(self) -> int:
        return len(self.ledger.events())

    @initialize(eps=GRANT_EPS, delta=GRANT_DELTA)
    def first_grant(self, eps: float, delta: float) -> None:
        self.grant(KEYS[0], eps, delta)

    @rule(key=st.sampled_from(KEYS), eps=GRANT_EPS, delta=GRANT_DELTA)
    def grant(self, key: BudgetKey, eps: float, delta: float) -> None:
        self.grants += 1
        self.ledger.grant(key, eps, delta, actor="steward", grant_id=f"g{self.grants}")
        self.granted[key][0] += eps
        self.granted[key][1] += delta

    @rule(target=reservations, key=st.sampled_from(KEYS), eps=EPS, delta=DELTA)
    def reserve(self, key: BudgetKey, eps: float, delta: float) -> Any:
        r_e, r_d = self._reserved(key)
        fits = (self.spent[key][0] + r_e + eps <= self.granted[key][0]
                and self.spent[key][1] + r_d + delta <= self.granted[key][1])  # fmt: skip
        before = self._count()
        if not fits:
            with pytest.raises(BudgetExceeded):
                self.ledger.reserve(key, eps, delta, job_id="job", actor="researcher")
            assert self._count() == before
            return multiple()
        rid = self.ledger.reserve(key, eps, delta, job_id="job", actor="researcher")
        self.open[rid] = (key, eps, delta)
        assert self._count() == before + 1
        return rid

    @rule(rid=reservations, quarters=st.integers(0, 4))
    def commit(self, rid: str, quarters: int) -> None:
        before = self._count()
        if rid in self.open:
            key, eps, delta = self.open[rid]
            spent_e, spent_d = eps * quarters / 4, delta * quarters / 4
            self.ledger.commit(rid, spent_e, spent_d, actor="runner")
            del self.open[rid]
            self.closed[rid] = ("commit", spent_e, spent_d)
            self.spent[key][0] += spent_e
            self.spent[key][1] += spent_d
            assert self._count() == before + 1
            return
        outcome, spent_e, spent_d = self.closed[rid]
        if outcome == "commit":  # the same figures again: idempotent
            ev = self.ledger.commit(rid, spent_e, spent_d, actor="runner")
            assert (ev.kind, ev.epsilon, ev.delta) == (EventKind.COMMIT, spent_e, spent_d)
        else:
            with pytest.raises(IntegrityError):
                self.ledger.commit(rid, spent_e, spent_d, actor="runner")
        assert self._count() == before

    @rule(rid=reservations)
    def release(self, rid: str) -> None:
        before = self._count()
        if rid in self.open:
            self.ledger.release(rid, actor="runner", reason="failed early")
            del self.open[rid]
            self.closed[rid] = ("release", 0.0, 0.0)
            assert self._count() == before + 1
            return
        if self.closed[rid][0] == "release":
            assert (
                self.ledger.release(rid, actor="runner", reason="again").kind is EventKind.RELEASE
            )
        else:
            with pytest.raises(IntegrityError):
                self.ledger.release(rid, actor="runner", reason="too late")
        assert self._count() == before

    @rule(rid=reservations, extra=st.integers(1, 8))
    def overcommit(self, rid: str, extra: int) -> None:
        if rid not in self.open:
            return
        _, eps, delta = self.open[rid]
        before = self._count()
        with pytest.raises(IntegrityError):
            self.ledger.commit(rid, eps + extra / 8, delta, actor="runner")
        assert self._count() == before

    @invariant()
    def books_balance(self) -> None:
        for key in KEYS:
            bal = self.ledger.balance(key)
            # equals an independent recomputation from the events
            assert _as_dict(bal) == _recompute(self.ledger.events(key))
            # equals the model
            r_e, r_d = self._reserved(key)
            assert (bal.granted_epsilon, bal.granted_delta) == tuple(self.granted[key])
            assert (bal.spent_epsilon, bal.spent_delta) == tuple(self.spent[key])
            assert (bal.reserved_epsilon, bal.reserved_delta) == (r_e, r_d)
            # never over budget
            assert bal.spent_epsilon + bal.reserved_epsilon <= bal.granted_epsilon
            assert bal.spent_delta + bal.reserved_delta <= bal.granted_delta
            assert bal.remaining_epsilon >= 0 and bal.remaining_delta >= 0
            # spent never decreases
            prev_e, prev_d = self.last_spent[key]
            assert bal.spent_epsilon >= prev_e and bal.spent_delta >= prev_d
            self.last_spent[key] = (bal.spent_epsilon, bal.spent_delta)
        assert {r.reservation_id for r in self.ledger.open_reservations()} == set(self.open)


def test_ledger_invariants_hold_for_any_sequence(engine_factory: EngineFactory) -> None:
    """Spent never decreases, spent + reserved <= granted, balance == fold of the events."""
    machine = type("Machine", (LedgerMachine,), {"make_engine": staticmethod(engine_factory)})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        ),
    )
