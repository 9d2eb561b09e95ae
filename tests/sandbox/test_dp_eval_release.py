"""A DP-SGD job's evaluation as the researcher gets it: every metric with its 95% interval and
the unreliable flag, on the card, in the CLI and in ``--json``; or, with
``privacy.evaluate = false``, no evaluation at all: not run, not charged, "skipped"."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from factories import job_spec, make_world

from foundation.errors import SpecError
from privacy.accountant import GaussianStep, epsilon_for
from privacy.dp_intervals import SWAMPED
from sandbox.backend import InProcessBackend
from sandbox.jobspec import parse_job_spec

#: "0.702 (95% CI 0.655-0.748)"; an undefined metric reads "undefined (95% CI 0.00-1.00)"
SHOWN = re.compile(r"(undefined|[01]\.\d{2,}) \(95% CI [01]\.\d{2,}-[01]\.\d{2,}\)")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    w = make_world(tmp_path_factory.mktemp("evalrel") / "zone", InProcessBackend(), patients=1500)
    yield w
    w.svc.close()


@pytest.fixture(scope="module")
def evaluated(world: Any) -> Any:
    return world.svc.submit(world.researcher, job_spec(**{"training.epochs": 1}))


@pytest.fixture(scope="module")
def skipped(world: Any) -> Any:
    spec = job_spec(**{"training.epochs": 1, "privacy.evaluate": False})
    return world.svc.submit(world.researcher, spec)


def _card(world: Any, job: Any, out: Path) -> dict[str, Any]:
    world.svc.job_result(world.researcher, job.id, out)
    return json.loads((out / "model_card.json").read_text())


def _human(job: Any) -> str:
    from sandbox.cli.common import console
    from sandbox.cli.jobs import _summary

    with console.capture() as cap:
        _summary(job)
    return cap.get()


def test_card_and_cli_show_each_metric_with_its_interval(
    world: Any, evaluated: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = evaluated.result
    assert r["evaluation"] == "dp-histogram"
    m = r["metrics"]
    assert set(m["ci95"]) == {"auroc", "accuracy", "ece", "n_noisy"}
    assert isinstance(m["unreliable"], bool)
    # charged: the DP-SGD steps and the evaluation histogram, on disjoint persons (the
    # cohort has ids): parallel composition, the larger of the two
    p = r["plan"]
    assert p["composition"] == "parallel"
    training = GaussianStep(p["noise_multiplier"], p["sample_rate"], r["steps_taken"])
    evaluation = GaussianStep(p["eval_sigma"], 1.0, 1)
    parts = [epsilon_for([training], r["delta"]), epsilon_for([evaluation], r["delta"])]
    assert r["epsilon"] == pytest.approx(max(parts))
    assert r["epsilon"] < epsilon_for([training, evaluation], r["delta"])

    card = _card(world, evaluated, tmp_path / "release")
    assert card["evaluation"] != "skipped" and card["privacy"]["eval_sigma"] > 0
    assert "in parallel" in card["privacy"]["composition"]
    assert card["dp_metrics"]["ci95"] == m["ci95"]
    shown = card["dp_metrics_display"]
    for key in ("auroc", "accuracy", "ece"):
        assert SHOWN.fullmatch(shown[key]), key
    # ~300 test persons under sigma ~20 per cell: the card says the figures cannot inform
    assert m["unreliable"] and shown["unreliable"] == m["unreliable_reason"]

    text = _human(evaluated)
    assert re.search(r"AUROC " + SHOWN.pattern, text)
    assert "unreliable: " + m["unreliable_reason"] in text

    # whether the model learned, read off the AUROC's interval (no new charge), on the card
    # and in the CLI; and the optimizer that ran (the spec's default) with its lr
    lo, hi = m["ci95"]["auroc"]
    learned = card["learned"]
    assert learned["verdict"] == ("yes" if lo > 0.5 else "not shown")
    if m["auroc"] is None:  # undefined under this much noise (it happens at ~300 persons)
        assert "undefined" in learned["statement"]
    elif lo <= 0.5 <= hi:
        assert "includes 0.5: the model may not have learned anything" in learned["statement"]
    flat = " ".join(text.split())
    assert f"learned: {learned['verdict']}; {learned['statement']}" in flat
    assert card["training"]["optimizer"] == "adam" and r["optimizer"]["name"] == "adam"
    assert f"optimizer adam, lr {card['training']['lr']:g}" in flat

    from sandbox.cli.common import emit
    from sandbox.cli.jobs import _summary

    emit(evaluated, True, _summary)
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["result"]["metrics"]["ci95"]["auroc"] == m["ci95"]["auroc"]
    assert as_json["result"]["metrics"]["unreliable"] is True


def test_skipped_evaluation_is_neither_run_nor_charged(
    world: Any, evaluated: Any, skipped: Any, tmp_path: Path
) -> None:
    r = skipped.result
    assert r["evaluation"] == "skipped" and r["metrics"] == {}
    p = r["plan"]
    assert p["eval_sigma"] is None
    # the whole epsilon went to training, and the charge is the DP-SGD steps alone (no
    # evaluation step in the history). On this cohort (ids: the evaluation's persons are not
    # the training's) the evaluated job's training had the whole epsilon too: same noise
    assert evaluated.result["plan"]["composition"] == "parallel"
    assert p["noise_multiplier"] == pytest.approx(evaluated.result["plan"]["noise_multiplier"])
    training = GaussianStep(p["noise_multiplier"], p["sample_rate"], r["steps_taken"])
    assert r["epsilon"] == pytest.approx(epsilon_for([training], r["delta"]))
    assert r["epsilon"] <= 1.0

    card = _card(world, skipped, tmp_path / "release")
    assert card["evaluation"] == "skipped"
    assert card["dp_metrics"] is None and card["dp_metrics_display"] == {}
    assert card["privacy"]["eval_sigma"] is None
    assert "skipped" in card["privacy"]["composition"]
    assert "evaluation: skipped" in _human(skipped)
    assert card["learned"]["verdict"] == "not evaluated"


def test_evaluate_is_an_optional_spec_flag_that_keeps_old_hashes() -> None:
    default = job_spec()
    assert default.privacy.evaluate is True
    assert "evaluate" not in default.to_dict()["privacy"]  # spec_hash of old specs unchanged
    off = job_spec(**{"privacy.evaluate": False})
    assert off.to_dict()["privacy"]["evaluate"] is False
    assert off.spec_hash() != default.spec_hash()
    assert parse_job_spec(off.to_dict()) == off
    assert job_spec(**{"privacy.evaluate": True}).spec_hash() == default.spec_hash()
    with pytest.raises(SpecError) as err:
        job_spec(**{"privacy.evaluate": "no"})
    assert err.value.field == "privacy.evaluate"


def test_flag_reason_is_the_documented_one() -> None:
    assert SWAMPED == "the evaluation noise swamps the test counts"


def test_dry_run_of_a_skipping_spec_still_shows_its_free_figures(world: Any) -> None:
    """A dry run (dummy rows, no noise, no charge) evaluates even when the spec skips the
    charged evaluation: a quote's utility curve needs the figures, and they cost nothing."""
    spec = job_spec(**{"training.epochs": 1, "privacy.evaluate": False})
    job = world.svc.dry_run(world.researcher, spec, "dummy")
    r = job.result
    assert r["dry_run"] and r["plan"]["eval_sigma"] is None
    assert r["evaluation"] == "dp-histogram" and r["metrics"]["sigma"] == 0.0
    assert set(r["metrics"]["ci95"]) == {"auroc", "accuracy", "ece", "n_noisy"}
