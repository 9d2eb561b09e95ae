"""Budgets that explain themselves, through the installed ``sandbox`` entry point.

* ``access approve`` prints each budget's totals before and after and one person's worst
  case on the dataset (the dataset-wide figure plus their own site's), and says plainly when
  the grant adds to an existing grant's budget (the ledger pools a project's grants on a
  dataset: a second approval adds, it does not replace).
* ``access show ID`` gives the whole request: requester, columns, epsilon, delta, its quote
  (a quote made ``--for-request``, before any grant, lists what a submit would refuse).
* ``quote`` warns when a job would use all the remaining delta of its budget.
* Once nothing remains, a refusal asks for more budget, not for a lower ``privacy.delta``.

Each test sets its zone up in-process (``factories.make_world``) and runs the commands under
test in a subprocess (``cli_runner``), checking exit codes and output, human and ``--json``.
Nothing here starts Ray: the one job that runs is run in-process before the CLI is called.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cli_runner import ok, refused, sandbox
from factories import FEATURES, LABEL, job_spec, make_world

from sandbox.backend import InProcessBackend

EXPIRES = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
HOSPITALS = [f"hospital-{c}" for c in "abcdefgh"]


def job_toml(path: Path, delta: float = 1e-6) -> Path:
    """``factories.job_spec()`` as a job.toml, with ``privacy.delta`` = ``delta``."""
    data = {
        "project": "readmission",
        "dataset": "cohort",
        "label": LABEL,
        "features": list(FEATURES),
        "model": {"kind": "mlp", "hidden": [16]},
        "privacy": {"epsilon": 1.0, "delta": delta, "max_grad_norm": 1.0},
        "training": {"epochs": 2, "batch_size": 128, "lr": 0.5, "seed": 3},
        "resources": {"gpus": 0},
    }
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _world(root: Path, grant_epsilon: float | None) -> Any:
    return make_world(root, InProcessBackend(), patients=2000, grant_epsilon=grant_epsilon)


def test_approve_prints_the_new_totals_and_says_it_adds_to_an_existing_budget(
    tmp_path: Path,
) -> None:
    w = _world(tmp_path / "zone", grant_epsilon=None)
    columns = [*FEATURES, LABEL]
    try:
        first = w.svc.request_access(
            w.researcher, "readmission", "cohort", columns, ["dp-sgd", "federated"], 2.0, 1e-5
        )
        second = w.svc.request_access(
            w.researcher, "readmission", "cohort", columns, ["dp-sgd"], 1.0, 1e-5
        )
    finally:
        w.svc.close()
    zone, sam = tmp_path / "zone", w.steward_token

    # the first grant: a dataset-wide budget and one per site, nothing to add to
    g1 = ok(
        sandbox("access", "approve", first.id, "--expires", EXPIRES, "--json", zone=zone, token=sam)
    )
    assert g1["adds_to"] == []
    budgets = {b["key"]: b for b in g1["budgets"]}
    assert set(budgets) == {"readmission/cohort", *(f"readmission/cohort@{h}" for h in HOSPITALS)}
    for b in budgets.values():
        assert b["before"]["granted_epsilon"] == 0 and b["after"]["granted_epsilon"] == 2.0
        assert b["after"]["remaining_delta"] == 1e-5
    worst = g1["worst_case"]
    assert worst["before"]["epsilon"] == 0
    # one person: the dataset-wide budget plus their own site's
    after = worst["after"]
    assert (after["dataset_wide_epsilon"], after["per_site_epsilon"], after["epsilon"]) == (
        2.0,
        2.0,
        4.0,
    )

    # the second grant on the same project and dataset adds to the first one's budget
    proc = sandbox("access", "approve", second.id, "--expires", EXPIRES, zone=zone, token=sam)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = " ".join(proc.stdout.split())  # rich may wrap a long line
    assert f"this adds to the budget of {g1['id']}" in out, out
    assert "budget readmission/cohort: epsilon 2 -> 3, delta 1e-05 -> 2e-05 granted" in out, out
    assert "@hospital" not in out  # a dp-sgd grant leaves the sites' budgets alone
    assert "one person's worst case on cohort (every project): epsilon 4 -> 5" in out, out
    assert "(dataset-wide 3 + their own site's 2)" in out, out

    # and that is what the ledger holds: the totals add up
    budget = ok(sandbox("budget", "readmission", "--json", zone=zone, token=w.researcher_token))
    wide = next(b for b in budget["budgets"] if not b["key"]["site"])
    assert (wide["granted_epsilon"], wide["granted_delta"]) == (3.0, 2e-5)


def test_access_show_gives_the_whole_request_with_a_quote_made_before_any_grant(
    tmp_path: Path,
) -> None:
    w = _world(tmp_path / "zone", grant_epsilon=None)
    w.svc.close()
    zone, rita, sam = tmp_path / "zone", w.researcher_token, w.steward_token
    spec = job_toml(tmp_path / "job.toml")

    # without a grant, a quote is refused like the submit it quotes
    denied = refused(
        sandbox("quote", str(spec), "--out", str(tmp_path / "q0"), "--json", zone=zone, token=rita)
    )
    assert denied["error"] == "policy_denied" and "has no access grant" in denied["message"]
    # a quote for an access request lists what a submit would refuse now instead
    qdir = tmp_path / "quote"
    q = ok(
        sandbox(
            "quote", str(spec), "--for-request", "--out", str(qdir), "--json", zone=zone, token=rita
        )
    )
    assert q["epsilon"] == pytest.approx(1.0, abs=1e-3) and q["plan"]["noise_multiplier"] > 0
    assert any("has no access grant" in line for line in q["submit_now"]), q
    assert any("no epsilon has been granted" in line for line in q["submit_now"]), q
    human = sandbox(
        "quote", str(spec), "--for-request", "--out", str(tmp_path / "q1"), zone=zone, token=rita
    )
    assert human.returncode == 0, human.stderr
    assert "submit would refuse it now:" in " ".join(human.stdout.split()), human.stdout

    req = ok(
        sandbox(
            "access", "request", "readmission", "--dataset", "cohort",
            "--columns", ",".join([*FEATURES, LABEL]), "--mechanism", "dp-sgd",
            "--epsilon", "3", "--delta", "1e-5", "--quote", str(qdir / "quote.json"), "--json",
            zone=zone, token=rita,
        )
    )  # fmt: skip

    shown = ok(sandbox("access", "show", req["id"], "--json", zone=zone, token=sam))
    assert shown["requested_by"] == "rita" and shown["state"] == "pending"
    assert shown["columns"] == sorted([*FEATURES, LABEL])
    assert (shown["epsilon"], shown["delta"]) == (3.0, 1e-5)
    assert shown["quote"] == q

    proc = sandbox("access", "show", req["id"], zone=zone, token=sam)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert f"{req['id']} (pending): readmission on cohort, requested by rita" in out, out
    assert "columns: " + ", ".join(sorted([*FEATURES, LABEL])) in out, out
    assert "epsilon 3, delta 1e-05" in out, out
    assert "quote: epsilon 0.999, delta 1e-06 (dp-sgd); noise multiplier" in out, out
    assert "note: " in out and "has no access grant" in out, out


def test_a_quote_warns_when_the_job_would_use_all_the_remaining_delta(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone", grant_epsilon=5.0)  # the grant's delta: 1e-5
    w.svc.close()
    zone, rita = tmp_path / "zone", w.researcher_token
    whole = job_toml(tmp_path / "whole.toml", delta=1e-5)
    part = job_toml(tmp_path / "part.toml", delta=1e-6)

    q = ok(
        sandbox("quote", str(whole), "--out", str(tmp_path / "q"), "--json", zone=zone, token=rita)
    )
    assert q["remaining_delta"] == 1e-5
    [warning] = q["warnings"]
    assert "all the remaining delta of budget readmission/cohort" in warning, warning
    proc = sandbox("quote", str(whole), "--out", str(tmp_path / "q"), zone=zone, token=rita)
    assert proc.returncode == 0, proc.stderr
    assert "warning: this job would use all the remaining delta" in " ".join(proc.stdout.split())

    assert (
        ok(
            sandbox(
                "quote", str(part), "--out", str(tmp_path / "q2"), "--json", zone=zone, token=rita
            )
        )["warnings"]
        == []
    )


def test_once_nothing_remains_the_advice_is_more_budget_not_a_lower_delta(
    tmp_path: Path,
) -> None:
    w = _world(tmp_path / "zone", grant_epsilon=5.0)
    try:
        # a job with the grant's whole delta (1e-5): nothing of it remains after
        job = w.svc.submit(w.researcher, job_spec(**{"privacy.delta": 1e-5}))
        assert str(job.state) == "succeeded"
    finally:
        w.svc.close()
    zone, rita = tmp_path / "zone", w.researcher_token
    spec = job_toml(tmp_path / "job.toml", delta=1e-6)

    proc = sandbox("submit", str(spec), zone=zone, token=rita)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "budget readmission/cohort: requested delta 1e-06 but only 0 remains" in line, line
    assert "nothing remains of this budget's delta" in line, line
    assert "ask the steward for more delta" in line, line
    assert "lower privacy.delta to" not in line and "or lower privacy.delta" not in line, line

    # the quote and the dry run say the same
    for args in (
        ("quote", str(spec), "--out", str(tmp_path / "q")),
        ("submit", str(spec), "--on", "dummy"),
    ):
        out = refused(sandbox(*args, "--json", zone=zone, token=rita))
        assert out == {"error": "budget_exceeded", "message": line.removeprefix("error: ")}
