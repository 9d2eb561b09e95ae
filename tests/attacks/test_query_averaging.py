"""Attacks on DP queries: average the noise away, read exact counts, get answers for free.

The attacker is a project member with a ``dp-query`` grant who wants one patient's value or
an exact count. Each attack must fail to extract anything beyond what the ledger charged.
"""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import FEATURES, LABEL, make_world

from foundation.errors import BudgetExceeded
from privacy.budget_events import BudgetKey

KEY = BudgetKey("readmission", "cohort")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    w = make_world(tmp_path_factory.mktemp("qa") / "zone", patients=500, grant_epsilon=None)
    req = w.svc.request_access(
        w.researcher,
        "readmission",
        "cohort",
        [*FEATURES, LABEL, "hospital"],
        ["dp-query"],
        4.0,
        1e-5,
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    yield w
    w.svc.close()


def test_asking_again_and_again_does_not_average_the_noise_away(world) -> None:
    """100 asks of one count: one charge, one noisy answer, so the mean of the answers is
    the one answer and no closer to the truth."""
    w = world
    q = {"dataset": "cohort", "kind": "count", "epsilon": 0.05}
    spent = w.svc.ledger.balance(KEY).spent_epsilon
    values = [
        w.svc.run_query(w.researcher, "readmission", q)["figures"][0]["value"] for _ in range(100)
    ]
    assert len(set(values)) == 1
    assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(spent + 0.05)


def test_respelling_the_same_query_is_the_same_query(world) -> None:
    """Reordered keys, an int epsilon, reordered quantile levels: the cache key is the
    canonical query, so a respelt query does not buy fresh noise for free."""
    w = world
    a = {
        "dataset": "cohort",
        "kind": "quantiles",
        "column": "age",
        "quantiles": [0.25, 0.75],
        "epsilon": 1,
    }
    b = {
        "epsilon": 1.0,
        "quantiles": [0.75, 0.25],
        "column": "age",
        "kind": "quantiles",
        "dataset": "cohort",
    }
    first = w.svc.run_query(w.researcher, "readmission", a)
    spent = w.svc.ledger.balance(KEY).spent_epsilon
    second = w.svc.run_query(w.researcher, "readmission", b)
    if second["reused"]:
        assert second["figures"] == first["figures"]
        assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(spent)
    else:
        # a respelling the canonical form does not merge must at least be charged in full
        assert second["charged"]
        assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(spent + 1.0)


def test_noisy_counts_do_not_leak_the_exact_count(world) -> None:
    """Distinct (hence charged) small-epsilon counts scatter around the truth: the release is
    noisy, not the exact count with decoration."""
    w = world
    truth = w.svc.store.get_dataset("cohort").persons
    values = [
        w.svc.run_query(
            w.researcher,
            "readmission",
            {"dataset": "cohort", "kind": "count", "epsilon": 0.02 + i * 1e-4},
        )["figures"][0]["value"]
        for i in range(12)
    ]
    assert sum(v != truth for v in values) >= 6, "most noisy counts equal the exact count"
    assert statistics.pstdev(values) > 5


def test_the_same_query_in_two_projects_draws_fresh_noise_and_charges_both(world) -> None:
    """Noise never derives from the query (which the user controls): another project asking
    the same thing pays for its own answer, drawn afresh."""
    w = world
    w.svc.create_project(w.researcher, "second", "another study")
    req = w.svc.request_access(w.researcher, "second", "cohort", ["age"], ["dp-query"], 2.0, 1e-5)
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    q = {"dataset": "cohort", "kind": "sum", "column": "age", "epsilon": 0.3}
    a = w.svc.run_query(w.researcher, "readmission", q)
    b = w.svc.run_query(w.researcher, "second", q)
    assert a["charged"] and b["charged"] and a["id"] != b["id"]
    assert a["figures"][0]["value"] != b["figures"][0]["value"]
    assert w.svc.ledger.balance(BudgetKey("second", "cohort")).spent_epsilon == pytest.approx(0.3)


def test_quotes_are_free_and_read_nothing(world) -> None:
    w = world
    spent = w.svc.ledger.balance(KEY).spent_epsilon
    events = len(w.svc.ledger.events(KEY))
    for i in range(20):
        quote = w.svc.run_query(
            w.researcher,
            "readmission",
            {"dataset": "cohort", "kind": "mean", "column": "age", "epsilon": 0.5 + i / 100},
            dry=True,
        )
        assert quote["figures"] == [] and quote["id"] is None
        # a quote holds nothing that depends on the rows: only the query and the contract
        assert "value" not in str(quote["parts"])
    assert len(w.svc.ledger.events(KEY)) == events
    assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(spent)


def test_spending_past_the_grant_one_small_query_at_a_time_stops_at_the_grant(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path / "zone", patients=300, grant_epsilon=None)
    req = w.svc.request_access(
        w.researcher, "readmission", "cohort", ["age"], ["dp-query"], 0.5, 1e-5
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    answered = 0
    with pytest.raises(BudgetExceeded):
        for i in range(100):
            w.svc.run_query(
                w.researcher,
                "readmission",
                {"dataset": "cohort", "kind": "mean", "column": "age", "epsilon": 0.1 + i * 1e-6},
            )
            answered += 1
    assert answered == 4  # 5 x 0.1 would pass 0.5 only by rounding: the fifth is refused
    bal = w.svc.ledger.balance(KEY)
    assert bal.spent_epsilon <= 0.5 + 1e-9 and bal.reserved_epsilon == 0
    w.svc.close()
