"""One validation path: ``quote``, dry runs and ``submit`` run the same checks, a quote's
noise figures are the run's, and dry runs are marked as such and never say "spent".

Every check runs the installed ``sandbox`` entry point in a subprocess (``cli_runner``) and
looks at its exit code and its output, human and ``--json``. The zone is set up in-process
(``factories.make_world``, public counts): one finished DP-SGD job and one dry run, run on
an ``InProcessBackend`` before any CLI call, so that the CLI calls only read or are refused
before anything is dispatched (none starts Ray).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cli_runner import ok, refused, sandbox
from factories import FEATURES, LABEL, job_spec, job_spec_dict, make_world

from sandbox.backend import InProcessBackend

#: the budget of the project's grants (dp-sgd; and federated, one per site)
EPSILON, DELTA = 5.0, 1e-5


def job_toml(path: Path, **over: Any) -> Path:
    """``factories.job_spec``'s spec as TOML, with ``over`` on top (a dotted key sets a field
    of a table)."""
    path.write_text(tomli_w.dumps(job_spec_dict(**over)), encoding="utf-8")
    return path


def federated_toml(path: Path, sites: list[str], min_sites: int) -> Path:
    return job_toml(
        path,
        mode="federated",
        model={"kind": "logistic"},
        **{
            "training.batch_size": 64,
            "federated.rounds": 2,
            "federated.sites": sites,
            "federated.min_sites": min_sites,
            "federated.min_site_rows": 100,
        },
    )


@dataclass
class World:
    root: Path
    tmp: Path
    rita: str
    real: str  # a finished DP-SGD job of job_toml()'s spec
    dry: str  # a finished dry run (dummy rows) of the same spec

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sandbox(*args, zone=self.root, token=self.rita, timeout=180)

    def many(self, *calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        # two CLI processes at a time (the zone's SQLite takes concurrent readers)
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda c: self.run(*c), calls))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("one-path")
    w = make_world(tmp / "zone", InProcessBackend(), patients=2000, grant_epsilon=EPSILON)
    svc = w.svc
    try:
        req = svc.request_access(
            w.researcher,
            "readmission",
            "cohort",
            [*FEATURES, LABEL],
            ["federated"],
            EPSILON,
            DELTA,
        )
        svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=5))
        real = svc.submit(w.researcher, job_spec())
        dry = svc.dry_run(w.researcher, job_spec(), "dummy")
        assert str(real.state) == "succeeded" and str(dry.state) == "succeeded"
    finally:
        svc.close()
    yield World(tmp / "zone", tmp, w.researcher_token, real.id, dry.id)


def _three_ways(w: World, spec: Path, tag: str) -> list[tuple[str, ...]]:
    """The quote, the dry run and the submit of ``spec``, human and ``--json``."""
    calls = [
        ("quote", str(spec), "--out", str(w.tmp / f"q-{tag}")),
        ("submit", str(spec), "--on", "dummy"),
        ("submit", str(spec)),
    ]
    return [*calls, *[(*c, "--json") for c in calls]]


def _same_refusal(procs: list[subprocess.CompletedProcess[str]], kind: str) -> str:
    """Every call exited 2 with one ``error:`` line (human) or the same JSON (``--json``),
    and all gave the same message; returns it."""
    human, machine = procs[: len(procs) // 2], procs[len(procs) // 2 :]
    lines = set()
    for p in human:
        assert p.returncode == 2 and "Traceback" not in p.stderr, (p.args, p.stdout, p.stderr)
        [line] = p.stderr.strip().splitlines()
        assert line.startswith("error: "), line
        lines.add(line.removeprefix("error: "))
    messages = set()
    for p in machine:
        out = refused(p)
        assert out["error"] == kind, out
        messages.add(out["message"])
    assert len(lines) == 1 and lines == messages, (lines, messages)
    return lines.pop()


def test_a_misspelt_feature_is_refused_by_quote_dry_run_and_submit_alike(world: World) -> None:
    spec = job_toml(world.tmp / "misspelt.toml", features=["age", "sexx"])
    message = _same_refusal(world.many(*_three_ways(world, spec, "misspelt")), "spec_error")
    assert message.startswith("features: column 'sexx' is not in dataset 'cohort'"), message
    # the governed columns: a direct identifier is not one the spec may name
    assert "patient_name" not in message


def test_a_column_the_grant_does_not_cover_is_refused_alike(world: World) -> None:
    spec = job_toml(world.tmp / "ungranted.toml", features=["age", "ethnicity"])
    message = _same_refusal(world.many(*_three_ways(world, spec, "ungranted")), "policy_denied")
    assert "column ethnicity" in message and "data steward" in message, message


def test_a_job_over_the_budget_is_refused_alike(world: World) -> None:
    spec = job_toml(world.tmp / "over.toml", **{"privacy.epsilon": 2 * EPSILON})
    message = _same_refusal(world.many(*_three_ways(world, spec, "over")), "budget_exceeded")
    assert "budget readmission/cohort: requested epsilon 10" in message, message
    assert "lower privacy.epsilon to at most" in message, message


def test_too_few_ready_sites_are_refused_by_quote_and_submit(world: World) -> None:
    # hospital-h has 58 persons (46 to train on): below min_site_rows, so 2 sites remain
    spec = federated_toml(world.tmp / "few.toml", ["hospital-a", "hospital-b", "hospital-h"], 3)
    quote, submit, quote_j, submit_j, dry = world.many(
        ("quote", str(spec), "--out", str(world.tmp / "q-few")),
        ("submit", str(spec)),
        ("quote", str(spec), "--out", str(world.tmp / "q-few"), "--json"),
        ("submit", str(spec), "--json"),
        ("submit", str(spec), "--on", "dummy", "--json"),
    )
    for p in (quote, submit):
        assert p.returncode == 2 and "Traceback" not in p.stderr, (p.stdout, p.stderr)
        assert "federated.min_sites: only 2 site(s) would take part" in p.stderr, p.stderr
        assert "left out: hospital-h" in p.stderr and "fewer than min_sites (3)" in p.stderr
    assert refused(quote_j) == refused(submit_j)
    assert refused(quote_j)["error"] == "spec_error"
    # a dry run covers DP-SGD jobs only: a federated spec is refused before it is checked
    assert refused(dry)["error"] == "spec_error"

    # with min_sites = 2 the same sites quote, hospital-h shown as left out
    fine = federated_toml(world.tmp / "fine.toml", ["hospital-a", "hospital-b", "hospital-h"], 2)
    q = ok(world.run("quote", str(fine), "--out", str(world.tmp / "q-fine"), "--json"))
    assert set(q["sites"]) == {"hospital-a", "hospital-b", "hospital-h"}
    assert "min_site_rows" in q["sites"]["hospital-h"]["left_out"]
    for site in ("hospital-a", "hospital-b"):
        figures = q["sites"][site]
        assert figures["noise_multiplier"] > 0 and figures["epsilon"] <= 1.0
        assert figures["remaining_epsilon"] == EPSILON and figures["remaining_delta"] == DELTA


def test_a_quote_s_figures_are_the_finished_job_s(world: World) -> None:
    spec = job_toml(world.tmp / "job.toml")
    quote, status, dry = world.many(
        ("quote", str(spec), "--out", str(world.tmp / "q-job"), "--json"),
        ("jobs", "status", world.real, "--json"),
        ("jobs", "status", world.dry, "--json"),
    )
    q, run, dry_run = ok(quote), ok(status)["result"], ok(dry)["result"]
    # the same plan function, the same inputs: the same figures, to the last digit
    figures = ("noise_multiplier", "sample_rate", "steps", "steps_per_epoch", "eval_sigma")
    for name in (*figures, "epsilon", "delta"):
        assert q["plan"][name] == run["plan"][name], name
        # a dry run runs the job's own plan on its free rows (public counts)
        assert dry_run["plan"][name] == run["plan"][name], name
    assert (q["epsilon"], q["delta"]) == (run["epsilon"], run["delta"])
    assert dry_run["would_spend"] == {"epsilon": q["epsilon"], "delta": q["delta"]}
    # the quote says what the budget holds before the job (the real job spent its share)
    assert q["remaining_epsilon"] == pytest.approx(EPSILON - run["epsilon"])
    assert q["warnings"] == []


def test_dry_runs_are_marked_in_jobs_list_and_status_and_never_say_spent(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # wide enough that the jobs table prints each cell on one line
    monkeypatch.setenv("COLUMNS", "220")
    listed, listed_j, shown, shown_j, real = world.many(
        ("jobs", "list"),
        ("jobs", "list", "--json"),
        ("jobs", "status", world.dry),
        ("jobs", "status", world.dry, "--json"),
        ("jobs", "status", world.real),
    )
    jobs = {j["id"]: j for j in ok(listed_j)["jobs"]}
    assert world.dry.startswith("dry-") and world.real.startswith("job-")
    assert (jobs[world.dry]["kind"], jobs[world.dry]["dry_run"]) == ("dry-run", True)
    assert (jobs[world.real]["kind"], jobs[world.real]["dry_run"]) == ("dp-sgd", False)

    assert listed.returncode == 0, listed.stderr
    row = next(ln for ln in listed.stdout.splitlines() if world.dry in ln)
    assert "dry run (dummy)" in row, listed.stdout
    real_row = next(ln for ln in listed.stdout.splitlines() if world.real in ln)
    assert "dp-sgd" in real_row and "dry run" not in real_row

    assert shown.returncode == 0, shown.stderr
    assert f"job {world.dry} (dry run: nothing is charged): succeeded" in shown.stdout
    assert "dry run on dummy rows, nothing charged" in shown.stdout
    assert "would spend epsilon 0.999" in shown.stdout, shown.stdout
    assert "spent" not in shown.stdout, shown.stdout
    rec = ok(shown_j)
    assert rec["dry_run"] is True and rec["kind"] == "dry-run"
    assert rec["result"]["would_spend"]["epsilon"] == pytest.approx(0.999, abs=5e-4)

    # a charged job still says what it spent
    assert real.returncode == 0 and "epsilon spent 0.999" in real.stdout, real.stdout
