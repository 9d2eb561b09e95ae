"""``sandbox tune`` through the installed command: it shows the search, writes a spec with
every ``"auto"`` field chosen, and that spec submits as it is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_runner import ok, sandbox
from factories import make_world

from sandbox.backend import InProcessBackend
from sandbox.jobspec import load_job_spec

JOB = """
project = "readmission"
dataset = "cohort"
label = "readmitted_30d"
features = ["age", "sex", "diabetes", "hba1c", "prior_admissions"]
[model]
kind = "logistic"
[privacy]
epsilon = 1.0
delta = 1e-6
max_grad_norm = "auto"
[training]
batch_size = 128
seed = 3
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    w = make_world(tmp_path_factory.mktemp("tune-cli") / "zone", InProcessBackend())
    yield w
    w.svc.close()


def test_sandbox_tune_shows_the_search_and_writes_a_spec_that_submits(
    world: Any, tmp_path: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(JOB, encoding="utf-8")
    tuned = tmp_path / "tuned.toml"
    proc = sandbox(
        "tune",
        str(job),
        "--on",
        "dummy",
        "--out",
        str(tuned),
        zone=world.root,
        token=world.researcher_token,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = " ".join(proc.stdout.split())
    for shown in (
        "search for training.lr, training.epochs, privacy.max_grad_norm",
        "dummy rows",
        "nothing charged",
        "prior",
        "chosen",
        "AUROC",
        "spec written to",
    ):
        assert shown in out, (shown, proc.stdout)

    spec = load_job_spec(tuned)
    assert spec.auto_fields == ()
    assert spec.training.batch_size == 128 and spec.training.seed == 3  # written: kept
    assert tuned.read_text().startswith("# chosen by `sandbox tune` on dummy rows")

    # the written spec has nothing left to choose: tune gives it back as it is
    again = ok(sandbox("tune", str(tuned), "--json", zone=world.root, token=world.researcher_token))
    assert again["tuning"] is None
    assert load_job_spec(tuned).to_dict() == again["spec"]

    # and it submits as it is: no search at admission, the values it holds
    rec = world.svc.submit(world.researcher, spec)
    assert rec.state == "succeeded", rec.error
    assert rec.result.get("tuning") is None
    assert rec.spec["training"]["lr"] == spec.training.lr
    assert rec.spec["training"]["epochs"] == spec.training.epochs
    assert rec.spec["privacy"]["max_grad_norm"] == spec.privacy.max_grad_norm
