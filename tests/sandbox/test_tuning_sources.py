"""Which free rows the search runs on and which size it plans with (``sandbox.mechanisms.tuning``):
the project's released DP synthetic table of the dataset when there is one (else dummy rows),
and the dataset's public count, or a fixed assumption when the counts are private (never the
exact count: chokepoint 10)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import pytest
from factories import FEATURES, LABEL, auto_spec, make_world

from connectors.cohort import write_cohort
from connectors.schema import SchemaContract
from foundation.errors import PolicyDenied
from sandbox.backend import InProcessBackend
from sandbox.mechanisms.free_data import default_source
from sandbox.mechanisms.tuning import ASSUMED_N_TRAIN, FREE_TRAIN_ROWS

SYNTH_COLUMNS = ["age", "sex", "diabetes", "hba1c", "prior_admissions", LABEL]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("tuning-sources")
    w = make_world(root / "zone", InProcessBackend())
    svc = w.svc
    req = svc.request_access(
        w.researcher, "readmission", "cohort", [*FEATURES, LABEL], ["synthetic"], 8.0, 1e-5
    )
    svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    # two datasets whose counts are private, of different sizes
    text = resources.files("connectors").joinpath("cohort_schema.toml").read_text("utf-8")
    private = SchemaContract.from_toml_text(re.sub(r'(?m)^counts\s*=\s*"public"\s*$', "", text))
    for name, patients in (("small", 400), ("large", 3000)):
        src = write_cohort(root / f"{name}.csv", patients, seed=patients, format="csv")
        svc.ingest_dataset(w.steward, name, src, private)
        assert not svc.store.get_dataset(name).counts_public
    yield w
    svc.close()


@pytest.fixture(scope="module")
def synth(world: Any) -> Any:
    """The project's DP synthetic table of the cohort; before it there is none, and the
    search's default is dummy rows (whichever test asks for it first)."""
    svc = world.svc
    spec = auto_spec("training.lr", "training.epochs", features=SYNTH_COLUMNS[:-1])
    assert default_source(svc.ctx, spec) == "dummy"
    job = svc.synth_fit(
        world.researcher, "readmission", "cohort", epsilon=8.0, columns=SYNTH_COLUMNS,
        label=LABEL, rows=3000,
    )  # fmt: skip
    assert job.state == "succeeded", job.error
    return job


def test_the_released_synthetic_table_is_the_default_and_it_has_signal(
    world: Any, synth: Any
) -> None:
    svc, rita = world.svc, world.researcher
    spec = auto_spec("training.lr", "training.epochs", features=SYNTH_COLUMNS[:-1])
    assert default_source(svc.ctx, spec) == f"synthetic:{synth.id}"
    # a spec reading a column the table does not hold gets dummy rows
    assert default_source(svc.ctx, auto_spec("training.lr")) == "dummy"

    tuning = svc.tune(rita, spec)["tuning"]
    assert tuning["source"] == f"synthetic:{synth.id}"
    assert tuning["free_train_rows"] == FREE_TRAIN_ROWS
    assert tuning["free_test_rows"] == 3000 - FREE_TRAIN_ROWS
    # DP synthetic rows carry the label's signal (dummy rows do not): some candidate learns.
    # The noise is unseeded, so the bound leaves room: with the rule's linear prior (Adam lr
    # 0.03 at 600 steps) the best of 4 fits at epsilon 8 scored 0.60-0.66 (dummy rows 0.51)
    assert max(c["auroc"] for c in tuning["candidates"]) > 0.55
    # named explicitly, dummy rows are what the search uses
    assert svc.tune(rita, spec, "dummy")["tuning"]["source"] == "dummy"


def test_a_synthetic_table_of_another_dataset_or_project_is_refused(world: Any, synth: Any) -> None:
    svc, rita = world.svc, world.researcher
    other = auto_spec("training.lr", dataset="large", features=SYNTH_COLUMNS[:-1])
    with pytest.raises(PolicyDenied):
        svc.tune(rita, other, f"synthetic:{synth.id}")


def test_private_counts_plan_on_the_assumed_size_never_the_exact_one(world: Any) -> None:
    """Two private datasets of 400 and 3,000 persons tune identically: the rule and every
    candidate's plan use ASSUMED_N_TRAIN, so nothing a researcher sees moves with the count."""
    svc, rita = world.svc, world.researcher
    runs = [
        svc.tune(rita, auto_spec("training.lr", "training.batch_size", dataset=name))["tuning"]
        for name in ("small", "large")
    ]
    assert runs[0]["candidates"] == runs[1]["candidates"]
    for t in runs:
        assert t["planned_persons"] == ASSUMED_N_TRAIN
        assert t["persons_basis"].startswith("assumed")
        # the spec's epochs are written: the batch moves, within the assumed size
        assert {c["moves"] for c in t["candidates"]} >= {"prior", "training.batch_size"}
        assert all(c["batch_size"] <= ASSUMED_N_TRAIN for c in t["candidates"])
    # a researcher's quote of such a spec shows the search (its figures are the assumption's);
    # the project has no grant on it yet: a quote for an access request
    quote = svc.quote(rita, auto_spec("training.lr", dataset="large"), for_request=True)
    assert quote["tuning"]["planned_persons"] == ASSUMED_N_TRAIN
