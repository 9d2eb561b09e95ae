"""DP queries through the service: decided, quoted, charged once, stored, reused for free.

On a real zone (SQLite, the demo cohort ingested and encrypted, OpenDP's mechanisms); the
CLI cases run the installed ``sandbox`` command in a subprocess.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cli_runner import ok, refused, sandbox
from factories import FEATURES, LABEL, make_world

from foundation.errors import BudgetExceeded, PolicyDenied, SpecError
from privacy.budget_events import BudgetKey, EventKind

KEY = BudgetKey("readmission", "cohort")
COUNT = {"dataset": "cohort", "kind": "count", "epsilon": 0.5}


def _world(root: Path, *, epsilon: float = 3.0, mechanisms: tuple[str, ...] = ("dp-query",)):
    w = make_world(root, patients=600, grant_epsilon=None)
    req = w.svc.request_access(
        w.researcher,
        "readmission",
        "cohort",
        [*FEATURES, LABEL, "hospital"],
        list(mechanisms),
        epsilon,
        1e-5,
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    w = _world(tmp_path_factory.mktemp("q") / "zone")
    yield w
    w.svc.close()


def _spent(w) -> float:
    return w.svc.ledger.balance(KEY).spent_epsilon


def test_a_query_is_charged_its_quoted_epsilon_once(world) -> None:
    w = world
    q = {"dataset": "cohort", "kind": "mean", "column": "age", "epsilon": 0.25}
    before = _spent(w)
    quote = w.svc.run_query(w.researcher, "readmission", q, dry=True)
    assert quote["dry"] and not quote["charged"] and quote["figures"] == []
    assert quote["fits"] and quote["parts"]
    assert _spent(w) == pytest.approx(before), "a quote charged"
    answer = w.svc.run_query(w.researcher, "readmission", q)
    assert answer["charged"] and not answer["reused"]
    assert answer["epsilon"] == pytest.approx(quote["epsilon"]) == pytest.approx(0.25)
    assert _spent(w) == pytest.approx(before + quote["epsilon"])
    (fig,) = answer["figures"]
    assert fig["statistic"] == "mean" and 18 <= fig["value"] <= 105
    assert fig["ci_low"] <= fig["value"] <= fig["ci_high"]
    assert answer["remaining_epsilon"] == pytest.approx(w.svc.ledger.balance(KEY).remaining_epsilon)
    # the quote's noise is the run's: the same scales, part by part
    assert sorted(round(p["noise_scale"], 9) for p in quote["parts"]) == sorted(
        round(f, 9) for f in _scales(answer)
    )


def _scales(answer: dict) -> list[float]:
    """The distinct noise scales of an answer's figures (a mean has a sum's and a count's)."""
    out: list[float] = []
    for f in answer["figures"]:
        for s in f.get("noise_scales") or [f["noise_scale"]]:
            out.append(float(s))
    return out


def test_the_same_query_again_is_the_released_answer_with_no_new_charge(world) -> None:
    w = world
    q = {"dataset": "cohort", "kind": "count", "by": "hospital", "epsilon": 0.2}
    first = w.svc.run_query(w.researcher, "readmission", q)
    spent = _spent(w)
    again = [w.svc.run_query(w.researcher, "readmission", dict(q)) for _ in range(5)]
    assert all(a["reused"] and not a["charged"] for a in again)
    assert all(a["figures"] == first["figures"] and a["id"] == first["id"] for a in again)
    assert _spent(w) == pytest.approx(spent)
    # its groups are the contract's declared hospitals, every one, whatever the rows hold
    groups = {f["group"] for f in first["figures"]}
    assert {f"hospital-{c}" for c in "abcdefgh"} <= groups
    listed = w.svc.list_queries(w.researcher, "readmission")
    assert first["id"] in {r["id"] for r in listed}


def test_a_query_over_what_is_left_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone", epsilon=0.3)
    events_before = len(w.svc.ledger.events(KEY))
    with pytest.raises(BudgetExceeded):
        w.svc.run_query(w.researcher, "readmission", {**COUNT, "epsilon": 0.5})
    # nothing was reserved, so nothing could have been read
    kinds = [e.kind for e in w.svc.ledger.events(KEY)[events_before:]]
    assert EventKind.RESERVE not in kinds
    assert w.svc.list_queries(w.researcher, "readmission") == []
    # the quote says so too, for free
    quote = w.svc.run_query(w.researcher, "readmission", {**COUNT, "epsilon": 0.5}, dry=True)
    assert quote["fits"] is False
    w.svc.close()


def test_a_grant_without_dp_query_or_the_column_is_refused(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone", mechanisms=("dp-sgd",))
    with pytest.raises(PolicyDenied):
        w.svc.run_query(w.researcher, "readmission", COUNT)
    w.svc.close()
    w = _world(tmp_path / "zone2")
    with pytest.raises(PolicyDenied):
        # ethnicity was not granted
        w.svc.run_query(
            w.researcher,
            "readmission",
            {"dataset": "cohort", "kind": "histogram", "column": "ethnicity", "epsilon": 0.1},
        )
    w.svc.close()


def test_bad_queries_name_the_field(world) -> None:
    w = world
    bad = [
        ({"dataset": "cohort", "kind": "median", "epsilon": 0.1}, "query.kind"),
        ({"dataset": "cohort", "kind": "mean", "epsilon": 0.1}, "query.column"),
        ({"dataset": "cohort", "kind": "count", "epsilon": -1}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "sum", "column": "subject_id", "epsilon": 0.1}, "query"),
    ]
    spent = _spent(w)
    for q, field in bad:
        with pytest.raises(SpecError) as err:
            w.svc.run_query(w.researcher, "readmission", q)
        assert err.value.field.startswith(field), (q, err.value.field)
    assert _spent(w) == pytest.approx(spent)


def test_analysts_query_in_their_projects_only(world) -> None:
    w = world
    _, at = w.svc.add_user(w.operator, f"ana{len(w.svc.store.list_users())}", "analyst")
    analyst = w.svc.authenticate(at)
    with pytest.raises(PolicyDenied):
        w.svc.run_query(analyst, "readmission", COUNT)
    w.svc.add_project_member(w.researcher, "readmission", analyst.name)
    out = w.svc.run_query(analyst, "readmission", {**COUNT, "epsilon": 0.11})
    assert out["charged"] and out["asked_by"] == analyst.name


def test_budget_shows_queries_beside_training(world) -> None:
    w = world
    w.svc.run_query(w.researcher, "readmission", {**COUNT, "epsilon": 0.12})
    (view,) = [b for b in w.svc.budget(w.researcher, "readmission") if b.key == KEY]
    assert view.spent_by["dp-query"] == pytest.approx(view.spent_epsilon)


def test_the_cli_quotes_runs_and_reuses(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone")
    w.svc.close()
    args = ["query", "run", "count", "--project", "readmission", "--dataset", "cohort"]
    quote = ok(
        sandbox(*args, "--epsilon", "0.3", "--dry", "--json", zone=w.root, token=w.researcher_token)
    )
    assert quote["dry"] and quote["epsilon"] == pytest.approx(0.3)
    first = ok(sandbox(*args, "--epsilon", "0.3", "--json", zone=w.root, token=w.researcher_token))
    assert first["charged"] and first["figures"][0]["statistic"] == "count"
    again = ok(sandbox(*args, "--epsilon", "0.3", "--json", zone=w.root, token=w.researcher_token))
    assert again["reused"] and again["figures"] == first["figures"]
    human = sandbox(*args, "--epsilon", "0.3", zone=w.root, token=w.researcher_token)
    assert human.returncode == 0 and "no new charge" in human.stdout
    budget = ok(sandbox("budget", "readmission", "--json", zone=w.root, token=w.researcher_token))
    (b,) = budget["budgets"]
    assert b["spent_by"] == {"dp-query": pytest.approx(0.3)}
    # over the grant: exit 2 with the budget named, nothing charged
    over = refused(
        sandbox(*args, "--epsilon", "5", "--json", zone=w.root, token=w.researcher_token)
    )
    assert "budget" in str(over).lower()
    listed = ok(
        sandbox(
            "query",
            "list",
            "--project",
            "readmission",
            "--json",
            zone=w.root,
            token=w.researcher_token,
        )
    )
    assert [r["id"] for r in listed["queries"]] == [first["id"]]
