"""A worker that lies about what it ran: the charge is the service's plan, never the report.

An attacker who controls a worker's Python environment (a ``sitecustomize.py`` on its path,
say) controls what the worker returns. Here that worker is a backend passed in at the
boundary: it runs the real worker in-process (``InProcessBackend``), then edits the result
before the service sees it: an epsilon of 1e-9, another noise multiplier, twice the steps,
a report with a figure missing, a worker that never reads its rows at all. The service
must charge the epsilon of the plan it made (recomputed here independently: the plan's
figures through ``privacy.accountant`` and through Google's ``dp_accounting``), fail every
job whose report differs from the plan with an ``IntegrityError`` naming the figure,
commit (never release) such a job's reservation, and release nothing of it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
from dp_accounting.rdp import RdpAccountant
from factories import LABEL, job_spec, make_world

from foundation.errors import IntegrityError, SpecError
from privacy.accountant import RDP_ORDERS, GaussianStep, epsilon_for
from privacy.budget_events import BudgetKey
from privacy.job_plan import plan_job
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState
from sandbox.mechanisms.dpsgd import TRAIN_FRACTION
from sandbox.mechanisms.federated_charge import check_federated_report
from sandbox.mechanisms.plans import ReportMismatch
from sandbox.results import DpsgdResult, FederatedResult, SynthResult
from sandbox.worker import EVAL_SHARE, PLAN_KEY

KEY = BudgetKey("readmission", "cohort")
SYNTH_COLUMNS = ["age", "sex", "diabetes", LABEL]
Edit = Callable[[Any], Any]


class LyingBackend(InProcessBackend):
    """The real worker, in-process; its result edited on the way back (the attacker's)."""

    def __init__(self, edit: Edit) -> None:
        super().__init__()
        self.edit = edit

    def wait(self, handle: Any, *, poll: Any, poll_s: float = 0.5) -> Any:
        return self.edit(super().wait(handle, poll=poll, poll_s=poll_s))


class SkippingBackend(InProcessBackend):
    """A worker that reads nothing and trains nothing: it returns a result that copies the
    service's plan from its payload and claims a negligible epsilon."""

    def submit(self, fn: Any, payload: Any, resources: Any) -> Any:
        def fake(p: dict[str, Any]) -> DpsgdResult:
            plan = p[PLAN_KEY]
            spec = p["spec"]
            # its job folder, where the service writes the card; nothing else
            Path(p["zone_root"], "jobs", p["job_id"]).mkdir(parents=True, exist_ok=True)
            return DpsgdResult(
                epsilon=1e-9,
                delta=spec["privacy"]["delta"],
                plan=dict(plan),
                steps_taken=plan["steps"],
                epochs_done=spec["training"]["epochs"],
                clipping="book-keeping",
                device="cpu",
                metrics={},
                n_features=1,
                feature_names=["x"],
                run={
                    "noise_multiplier": plan["noise_multiplier"],
                    "sample_rate": plan["sample_rate"],
                    "steps": plan["steps"],
                    "max_grad_norm": spec["privacy"]["max_grad_norm"],
                    "eval_sigma": plan["eval_sigma"],
                    "delta": spec["privacy"]["delta"],
                },
            )

        return (fake, payload)


def _run_edit(**changes: Any) -> Edit:
    def edit(result: Any) -> Any:
        return dataclasses.replace(result, run={**(result.run or {}), **changes})

    return edit


def _planned_epsilon(world: Any) -> tuple[float, float]:
    """The plan's epsilon, twice: through ``privacy.accountant`` and ``dp_accounting``. The
    cohort has an identifier column, so the evaluation's persons are not the training's and
    the two releases compose in parallel: the larger of their own epsilons."""
    spec = job_spec()
    n_train = int(world.svc.store.get_dataset("cohort").persons * TRAIN_FRACTION)
    plan = plan_job(
        spec.privacy.epsilon,
        spec.privacy.delta,
        n_train,
        spec.training.batch_size,
        spec.training.epochs,
        evaluate=True,
        eval_share=EVAL_SHARE,
        disjoint_eval=True,
    )
    training = GaussianStep(plan.noise_multiplier, plan.sample_rate, plan.steps)
    evaluation = GaussianStep(plan.eval_sigma, 1.0, 1)
    ours = max(
        epsilon_for([training], spec.privacy.delta), epsilon_for([evaluation], spec.privacy.delta)
    )
    trained = RdpAccountant(list(RDP_ORDERS))
    trained.compose(
        dpa.PoissonSampledDpEvent(plan.sample_rate, dpa.GaussianDpEvent(plan.noise_multiplier)),
        plan.steps,
    )
    evaluated = RdpAccountant(list(RDP_ORDERS))
    evaluated.compose(dpa.GaussianDpEvent(plan.eval_sigma), 1)
    google = max(trained.get_epsilon(spec.privacy.delta), evaluated.get_epsilon(spec.privacy.delta))
    return ours, google


def _assert_failed_and_committed(world: Any, out: Path) -> None:
    (job,) = world.svc.jobs.list()
    assert job.state is JobState.FAILED
    # the worker read rows before it reported: the whole reservation is spent, not released
    assert world.svc.ledger.reservation(job.reservation_id).state.value == "committed"
    bal = world.svc.ledger.balance(KEY)
    assert bal.spent_epsilon == pytest.approx(1.0) and bal.reserved_epsilon == 0
    fail = [e for e in world.svc.audit.list(limit=50) if e.action == "job.fail"][0]
    assert fail.details["error"] == "integrity_error"
    assert fail.details["ledger"] == "committed"
    # and nothing leaves
    with pytest.raises(SpecError, match="not succeeded"):
        world.svc.job_result(world.researcher, job.id, out)
    assert not out.exists()


# --- DP-SGD ---------------------------------------------------------------------------------


def test_a_tiny_reported_epsilon_is_not_what_is_charged(tmp_path: Path) -> None:
    w = make_world(tmp_path / "zone", LyingBackend(lambda r: dataclasses.replace(r, epsilon=1e-9)))
    job = w.svc.submit(w.researcher, job_spec())
    assert job.state is JobState.SUCCEEDED
    ours, google = _planned_epsilon(w)
    spent = w.svc.ledger.balance(KEY).spent_epsilon
    assert spent == pytest.approx(ours, rel=1e-12)
    assert spent == pytest.approx(google, rel=1e-3)
    assert 0.5 < spent <= 1.0 + 1e-9
    # the result and the card show the plan's figure, not the worker's
    assert job.result["epsilon"] == pytest.approx(ours, rel=1e-12)
    assert job.result["plan"]["epsilon"] == pytest.approx(ours, rel=1e-12)
    assert job.result.get("run") is None
    out = tmp_path / "release"
    w.svc.job_result(w.researcher, job.id, out)
    card = json.loads((out / "model_card.json").read_text())
    assert card["privacy"]["epsilon"] == pytest.approx(ours, rel=1e-12)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_run_edit(noise_multiplier=0.01), "noise_multiplier"),
        (_run_edit(sample_rate=1e-4), "sample_rate"),
        (_run_edit(max_grad_norm=1e6), "max_grad_norm"),
        (_run_edit(eval_sigma=None), "eval_sigma"),
        (
            lambda r: dataclasses.replace(
                r, steps_taken=2 * r.steps_taken, run={**r.run, "steps": 2 * r.run["steps"]}
            ),
            "steps",
        ),
        (lambda r: dataclasses.replace(r, steps_taken=2 * r.steps_taken), "steps"),
        (lambda r: dataclasses.replace(r, run=None), "noise_multiplier"),
        (lambda r: {"epsilon": 1e-9}, "result"),
    ],
    ids=[
        "noise",
        "sample-rate",
        "clipping",
        "no-eval-noise",
        "double-steps",
        "steps-taken",
        "no-report",
        "not-a-result",
    ],
)
def test_a_report_that_differs_from_the_plan_fails_the_job_charged(
    tmp_path: Path, edit: Edit, field: str
) -> None:
    w = make_world(tmp_path / "zone", LyingBackend(edit))
    with pytest.raises(IntegrityError, match=field) as err:
        w.svc.submit(w.researcher, job_spec())
    assert isinstance(err.value, ReportMismatch) and err.value.field == field
    # the demo's counts are public: the message gives the plan's figure too
    assert ("the plan says" in str(err.value)) == (field != "result")
    _assert_failed_and_committed(w, tmp_path / "release")


def test_a_worker_that_reads_nothing_is_still_charged_the_plan(tmp_path: Path) -> None:
    """Copying the plan into a made-up report gets the job through, at the plan's price."""
    w = make_world(tmp_path / "zone", SkippingBackend())
    job = w.svc.submit(w.researcher, job_spec())
    ours, _ = _planned_epsilon(w)
    assert job.state is JobState.SUCCEEDED
    # the service records the read itself: a worker that returned has read its rows
    assert job.data_opened
    assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(ours, rel=1e-12)


def test_a_skipping_worker_that_also_lies_is_committed_not_released(tmp_path: Path) -> None:
    """It never marked ``data_opened`` itself: the mismatch still keeps the reservation."""

    class Both(SkippingBackend):
        def wait(self, handle: Any, *, poll: Any, poll_s: float = 0.5) -> Any:
            result = super().wait(handle, poll=poll, poll_s=poll_s)
            return dataclasses.replace(result, run={**result.run, "noise_multiplier": 0.01})

    w = make_world(tmp_path / "zone", Both())
    with pytest.raises(IntegrityError, match="noise_multiplier"):
        w.svc.submit(w.researcher, job_spec())
    _assert_failed_and_committed(w, tmp_path / "release")


# --- synthetic data -------------------------------------------------------------------------


def _synth_world(root: Path, edit: Edit) -> Any:
    w = make_world(root, LyingBackend(edit))
    req = w.svc.request_access(
        w.researcher, "readmission", "cohort", SYNTH_COLUMNS, ["synthetic"], 4.0, 1e-5
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=5))
    return w


def _fit(w: Any) -> Any:
    return w.svc.synth_fit(
        w.researcher, "readmission", "cohort", epsilon=2.0, method="mst", rows=300,
        columns=SYNTH_COLUMNS,
    )  # fmt: skip


def test_synthetic_charge_is_the_planned_releases(tmp_path: Path) -> None:
    w = _synth_world(tmp_path / "zone", lambda r: dataclasses.replace(r, epsilon=1e-9))
    job = _fit(w)
    assert job.state is JobState.SUCCEEDED
    steps = [GaussianStep(**s) for s in job.result["steps"]]
    planned = epsilon_for(steps, 1e-6)
    assert 1.0 < planned <= 2.0
    assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(planned, rel=1e-12)
    assert job.result["epsilon"] == pytest.approx(planned, rel=1e-12)


def test_synthetic_releases_other_than_planned_fail_charged(tmp_path: Path) -> None:
    def halve(result: SynthResult) -> SynthResult:
        steps = [{**s, "noise_multiplier": s["noise_multiplier"] / 2} for s in result.steps]
        return dataclasses.replace(result, steps=steps)

    w = _synth_world(tmp_path / "zone", halve)
    with pytest.raises(IntegrityError, match="noise_multiplier"):
        _fit(w)
    (job,) = w.svc.jobs.list()
    assert job.state is JobState.FAILED
    assert w.svc.ledger.reservation(job.reservation_id).state.value == "committed"
    assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(2.0)


# --- federated (the check alone: a simulation needs Ray and Flower) -------------------------


def _federated_config() -> Any:
    from sandbox.mechanisms.federated import plan_sites

    spec = job_spec(
        mode="federated",
        federated={"rounds": 2, "sites": ["a", "b"], "min_sites": 1},
        **{"training.batch_size": 64},
    )
    dataset = dataclasses.make_dataclass(
        "Card", [("sites", dict), ("cross_site_persons", int), ("counts_public", bool)]
    )({"a": 1500, "b": 900}, 0, True)
    return plan_sites(spec, dataset).config


def _honest_sites(cfg: Any) -> dict[str, dict[str, Any]]:
    from training.federated.site_plan import plan_for

    out = {}
    # each site plans on the size the service put in the config (1500 x 0.8, 900 x 0.8)
    assert cfg.plan_sizes == {"a": 1200, "b": 720}
    for site in ("a", "b"):
        plan = plan_for(cfg, site, cfg.plan_sizes[site])
        out[site] = {
            "epsilon": plan.planned_epsilon(cfg.rounds),
            "delta": cfg.delta,
            "steps": plan.planned_steps(cfg.rounds),
            "evals": 1,
            "rounds": cfg.rounds,
            "plan": plan.card(),
        }
    return out


def _federated(sites: dict[str, dict[str, Any]]) -> FederatedResult:
    return FederatedResult(
        sites=sites, epsilon=0.0, delta=1e-6, rounds=2, dropped=[], excluded=[], left_out={},
        server_epsilon=None, metrics={},
    )  # fmt: skip


def test_federated_sites_are_checked_against_the_plan_the_service_rebuilds() -> None:
    from training.federated.site_plan import plan_for

    cfg = _federated_config()
    honest = _honest_sites(cfg)
    check_federated_report(cfg, _federated(honest), show=True)
    # a site that trained fewer rounds (not sampled) is fine: it is charged the full plan
    fewer = {**honest, "b": {**honest["b"], "steps": 0, "rounds": 0}}
    check_federated_report(cfg, _federated(fewer), show=True)
    lies = [
        ("noise_multiplier", {"plan": {**honest["a"]["plan"], "noise_multiplier": 0.01}}),
        ("steps", {"steps": 3 * honest["a"]["steps"]}),
        ("evals", {"evals": 2}),
        ("rounds", {"rounds": cfg.rounds + 1}),
        ("delta", {"delta": 0.1}),
        ("n", {"plan": {**honest["a"]["plan"], "n": 0}}),
        # a site that planned on its own count instead of the service's size
        ("n", {"plan": plan_for(cfg, "a", 1180).card()}),
        ("plan", {"plan": None}),
    ]
    for field, change in lies:
        lying = {**honest, "a": {**honest["a"], **change}}
        with pytest.raises(ReportMismatch, match=field) as err:
            check_federated_report(cfg, _federated(lying), show=False)
        assert err.value.field == field
        # private counts: the figures are withheld from the message
        assert "0.01" not in str(err.value)


def test_a_federated_site_is_charged_its_plans_full_figure() -> None:
    cfg = _federated_config()
    from training.federated.site_plan import plan_for

    plan = plan_for(cfg, "a", 1200)
    full = plan.planned_epsilon(cfg.rounds)
    google = RdpAccountant(list(RDP_ORDERS))
    google.compose(
        dpa.PoissonSampledDpEvent(plan.sample_rate, dpa.GaussianDpEvent(plan.noise_multiplier)),
        plan.planned_steps(cfg.rounds),
    )
    google.compose(dpa.GaussianDpEvent(plan.eval_sigma), 1)
    assert full == pytest.approx(google.get_epsilon(cfg.delta), rel=1e-3)
    assert full <= cfg.epsilon + 1e-9
    # a site's own count of fewer steps would charge less: the service never uses it
    assert plan.epsilon(plan.steps_per_round, 1) < full


# --- private counts -------------------------------------------------------------------------


def _private_world(root: Path, backend: InProcessBackend) -> Any:
    """The demo cohort's kind of data under a contract that keeps its counts private."""
    import re

    from connectors.cohort import write_cohort
    from connectors.schema import SchemaContract
    from sandbox.service import Service

    svc, op_token = Service.init_zone(root / "zone", backend)
    operator = svc.authenticate(op_token)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, rita = svc.authenticate(st), svc.authenticate(rt)
    src = write_cohort(root / "extract.csv", 2000, seed=5, format="csv")
    toml = (Path(__file__).resolve().parents[2] / "connectors" / "cohort_schema.toml").read_text()
    private = re.sub(r'(?m)^counts\s*=\s*"public"\s*$', "", toml)
    svc.ingest_dataset(steward, "cohort", src, SchemaContract.from_toml_text(private))
    assert not svc.store.get_dataset("cohort").counts_public
    svc.create_project(rita, "readmission", "readmission risk")
    features = ["age", "sex", "diabetes", "hba1c", "creatinine", "prior_admissions"]
    req = svc.request_access(
        rita, "readmission", "cohort", [*features, LABEL], ["dp-sgd"], 5.0, 1e-5
    )
    svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=5))
    return svc, rita, job_spec(features=features)


def test_with_private_counts_a_mismatch_names_the_field_not_the_figures(tmp_path: Path) -> None:
    svc, rita, spec = _private_world(tmp_path, LyingBackend(_run_edit(noise_multiplier=0.01)))
    with pytest.raises(IntegrityError, match="noise_multiplier") as err:
        svc.submit(rita, spec)
    assert "withheld" in str(err.value) and "0.01" not in str(err.value)
    (job,) = svc.jobs.list()
    assert svc.ledger.reservation(job.reservation_id).state.value == "committed"


def test_with_private_counts_an_unplannable_spec_is_refused_after_reading(tmp_path: Path) -> None:
    """A batch above the (private) split: refusing it before reading would be a free oracle
    on the exact size, so the worker reads, fails, and the job is charged."""
    svc, rita, spec = _private_world(tmp_path, InProcessBackend())
    big = dataclasses.replace(spec, training=dataclasses.replace(spec.training, batch_size=100_000))
    with pytest.raises(SpecError, match="training.batch_size") as err:
        svc.submit(rita, big)
    assert not any(ch.isdigit() for ch in str(err.value).split("(", 1)[0])
    (job,) = svc.jobs.list()
    assert job.state is JobState.FAILED and job.data_opened
    assert svc.ledger.reservation(job.reservation_id).state.value == "committed"
