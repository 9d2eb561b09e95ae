"""Attack: average a DP query's noise away across dataset versions.

A query asked again returns its released answer with no new noise (no averaging attack). With
dataset versions, a researcher could hope that the same query on a re-ingested copy of the
same people is either free (a second, independent noisy answer at no cost) or returns the
first version's answer so that the two can be combined for nothing. Neither: a query on a new
version is new data, answered with fresh noise and charged in full to the same dataset budget
(versions share it: they hold the same people), and asking it again on that version is the
stored answer, free and identical.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import FEATURES, LABEL, make_world

from foundation.errors import BudgetExceeded
from privacy.budget_events import BudgetKey

QUERY = {"dataset": "cohort", "kind": "mean", "column": "age", "epsilon": 0.4}


def test_a_new_version_charges_the_same_query_again_and_never_hands_out_free_noise(
    tmp_path: Path,
) -> None:
    w = make_world(tmp_path / "zone", patients=400, grant_epsilon=None)
    svc = w.svc
    req = svc.request_access(
        w.researcher, "readmission", "cohort", [*FEATURES, LABEL], ["dp-query"], 1.0, 1e-5
    )
    svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=1))
    key = BudgetKey("readmission", "cohort")

    first = svc.run_query(w.researcher, "readmission", QUERY)
    assert first["charged"] and svc.ledger.balance(key).spent_epsilon == pytest.approx(0.4)
    # the same people again, as version 2
    svc.ingest_demo(w.steward, "cohort", 400, seed=1)
    assert svc.store.get_dataset("cohort").version == 2

    second = svc.run_query(w.researcher, "readmission", QUERY)
    assert second["charged"] and not second["reused"]
    assert svc.ledger.balance(key).spent_epsilon == pytest.approx(0.8)
    # asked again on version 2: the stored answer, no new noise, no new charge
    again = svc.run_query(w.researcher, "readmission", QUERY)
    assert again["reused"] and not again["charged"]
    assert again["figures"] == second["figures"]
    assert svc.ledger.balance(key).spent_epsilon == pytest.approx(0.8)
    # a third answer would go over the dataset's budget, whichever version it reads
    with pytest.raises(BudgetExceeded):
        svc.run_query(w.researcher, "readmission", {**QUERY, "epsilon": 0.3})
    svc.close()
