"""Hyperparameters chosen for free (``sandbox.mechanisms.tuning``, docs/tuning.md): a spec that
leaves them out is resolved at admission by a search on free rows, planned and charged as the
resolved spec, with the search recorded in the result and the model card; the search never
opens a real row, reserves or charges anything, or creates a job."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import auto_spec, job_spec, make_world

from privacy.budget_events import EventKind
from sandbox.backend import InProcessBackend
from sandbox.jobspec import parse_job_spec, parse_stored_spec
from sandbox.mechanisms.dpsgd import n_train_of, plan_spec
from sandbox.mechanisms.tuning import TUNING_KEY

AUTO = ("training.lr", "training.epochs", "training.batch_size", "privacy.max_grad_norm")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    w = make_world(tmp_path_factory.mktemp("tuning") / "zone", InProcessBackend())
    # the same kind of cohort with other rows, the same contract and size: a search that
    # depends on free rows only cannot tell the two apart
    w.svc.ingest_demo(w.steward, "cohort2", 2000, seed=99)
    yield w
    w.svc.close()


def test_submit_resolves_the_auto_fields_charges_the_resolved_plan_and_records_it(
    world: Any, tmp_path: Path
) -> None:
    svc, rita = world.svc, world.researcher
    spec = auto_spec(*AUTO)
    assert spec.auto_fields == AUTO
    job = svc.submit(rita, spec)
    assert job.state == "succeeded", job.error

    # the job ran, was stored and hashed as the resolved spec
    stored = parse_stored_spec(job.spec)
    assert stored.auto_fields == ()
    assert "auto" not in json.dumps(job.spec)
    assert stored.spec_hash() == job.spec_hash
    tuning = job.result["tuning"]
    chosen = tuning["chosen"]
    assert chosen == {
        "lr": stored.training.lr,
        "epochs": stored.training.epochs,
        "batch_size": stored.training.batch_size,
        "max_grad_norm": stored.privacy.max_grad_norm,
    }
    # dummy rows (no synthetic table released yet): no signal, so the rule's prior is kept
    assert tuning["source"] == "dummy" and tuning["fields"] == list(AUTO)
    assert tuning["persons_basis"] == "public count"
    assert tuning["candidates"][0]["moves"] == "prior" and tuning["candidates"][0]["chosen"]
    assert sum(c["chosen"] for c in tuning["candidates"]) == 1

    # charged exactly the accountant's epsilon of the resolved spec's plan
    dataset = svc.store.get_dataset("cohort")
    plan = plan_spec(stored, n_train_of(dataset), disjoint=True)  # the cohort has ids
    commits = [e for e in svc.ledger.events() if e.job_id == job.id and e.kind is EventKind.COMMIT]
    assert [e.epsilon for e in commits] == [pytest.approx(plan.epsilon)]
    assert job.result["epsilon"] == pytest.approx(plan.epsilon)
    assert job.result["plan"]["steps"] == plan.steps

    # the submit's audit event names what was chosen
    submit = [e for e in svc.audit.list(limit=50, action="job.submit") if e.outcome == "ok"][-1]
    assert "on dummy" in str(submit.details["tuned"])

    # the model card records the resolved values and the search
    out = svc.job_result(rita, job.id, tmp_path / "release")
    card = json.loads((Path(out["out"]) / "model_card.json").read_text())
    assert card["tuning"] == tuning
    for key in ("lr", "epochs", "batch_size"):
        assert card["training"][key] == chosen[key]
    assert card["privacy"]["max_grad_norm"] == chosen["max_grad_norm"]


def test_the_search_never_reads_a_real_row_nor_charges(world: Any, monkeypatch) -> None:
    """The real rows are moved away and the row handle refuses to exist: the search still
    runs, and gives the same table on another dataset with other rows (the same contract
    and size). Nothing is reserved, charged or queued; one audit event records it."""
    import connectors.dataset_handle as dh

    svc, rita = world.svc, world.researcher
    spec = auto_spec("training.lr", "privacy.max_grad_norm")
    dataset = svc.store.get_dataset("cohort")
    real = Path(dataset.path)
    hidden = real.with_name(real.name + ".away")

    def no_handle(self: Any) -> None:
        raise AssertionError("the search made a handle on real rows")

    monkeypatch.setattr(dh.DatasetHandle, "__post_init__", no_handle)
    ledger, jobs = len(svc.ledger.events()), len(svc.jobs.list())
    audit = svc.audit.head().seq
    shutil.move(real, hidden)
    try:
        first = svc.tune(rita, spec)
    finally:
        shutil.move(hidden, real)
    other = svc.tune(rita, auto_spec("training.lr", "privacy.max_grad_norm", dataset="cohort2"))

    assert first["tuning"]["candidates"] == other["tuning"]["candidates"]
    assert first["tuning"]["chosen"] == other["tuning"]["chosen"]
    assert len(svc.ledger.events()) == ledger and len(svc.jobs.list()) == jobs
    events = [e for e in svc.audit.list(limit=20) if e.seq > audit]
    assert [(e.action, e.outcome) for e in events] == [("job.quote", "ok")] * 2
    assert events[0].details["tune"] == "default" and "on dummy" in str(events[0].details["tuned"])
    # the resolved spec plans; the written fields are the spec's
    resolved = parse_job_spec(first["spec"])
    assert resolved.auto_fields == ()
    assert resolved.training.epochs == spec.training.epochs == 2
    assert resolved.training.batch_size == spec.training.batch_size == 128


def test_a_worker_result_cannot_carry_its_own_tuning(world: Any) -> None:
    """The record in a result is the one the service put in the payload, never a worker's."""
    from sandbox.mechanisms.dpsgd import DpsgdMechanism
    from sandbox.results import DpsgdResult

    # a job with a tuning record (the first test's, or one of its own when run apart)
    job = next((j for j in world.svc.jobs.list() if (j.result or {}).get(TUNING_KEY)), None)
    if job is None:
        job = world.svc.submit(world.researcher, auto_spec("training.lr"))
    assert job.result and job.result.get(TUNING_KEY), job.error
    plan = dict(job.result["plan"])
    lying = DpsgdResult(
        epsilon=0.0,
        delta=job.result["delta"],
        plan=plan,
        steps_taken=plan["steps"],
        epochs_done=1,
        clipping="book-keeping",
        device="cpu",
        metrics={},
        n_features=1,
        feature_names=[],
        run={
            "noise_multiplier": plan["noise_multiplier"],
            "sample_rate": plan["sample_rate"],
            "steps": plan["steps"],
            "max_grad_norm": job.spec["privacy"]["max_grad_norm"],
            "eval_sigma": plan["eval_sigma"],
            "delta": plan["delta"],
        },
        tuning={"rows": [[1, 2, 3]]},
    )
    mech = DpsgdMechanism()
    assert mech.check_report(world.svc.ctx, job, {}, lying).tuning is None
    theirs = mech.check_report(world.svc.ctx, job, {TUNING_KEY: job.result[TUNING_KEY]}, lying)
    assert theirs.tuning == job.result[TUNING_KEY]


def test_quotes_and_dry_runs_resolve_as_a_submit_would(world: Any) -> None:
    svc, rita = world.svc, world.researcher
    spec = auto_spec("training.lr")
    quote = svc.quote(rita, spec)
    tuned = svc.tune(rita, spec)
    assert quote["tuning"] == tuned["tuning"]
    resolved = parse_job_spec(tuned["spec"])
    assert (
        quote["plan"]
        == plan_spec(resolved, n_train_of(svc.store.get_dataset("cohort")), disjoint=True).to_dict()
    )
    dry = svc.dry_run(rita, spec, "dummy")
    assert dry.state == "succeeded", dry.error
    assert dry.result["tuning"] == tuned["tuning"]
    assert parse_stored_spec(dry.spec).training.lr == resolved.training.lr
    # a spec with nothing "auto" comes back as it is, without a search
    plain = job_spec()
    assert svc.tune(rita, plain) == {"spec": plain.to_dict(), "tuning": None}


def test_a_long_written_schedule_keeps_the_prior_and_a_planner_refusal_is_the_specs(
    world: Any,
) -> None:
    from foundation.errors import SpecError
    from sandbox.mechanisms.tuning import MAX_SIM_STEPS
    from training.autotune import prior_lr, steps_of
    from training.dpsgd_config import Optimizer

    svc, rita = world.svc, world.researcher
    # 20,000 steps written: not simulated at admission, the rule's lr for them is kept
    long = auto_spec("training.lr", **{"training.epochs": 200, "training.batch_size": 16})
    tuning = svc.tune(rita, long)["tuning"]
    steps = steps_of(1600, 16, 200)
    assert steps > MAX_SIM_STEPS
    assert all("not_run" in c and "auroc" not in c for c in tuning["candidates"])
    assert "too long to search" in tuning["reason"]
    # auto_spec's model is logistic: the linear prior
    assert tuning["chosen"]["lr"] == prior_lr(Optimizer.ADAM, steps, 1.0, linear=True)
    # a delta at or above 1/n: every candidate refused, the planner's own error
    with pytest.raises(SpecError) as err:
        svc.tune(rita, auto_spec("training.lr", **{"privacy.delta": 0.005}))
    assert err.value.field == "privacy.delta"
