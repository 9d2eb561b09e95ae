"""The model card says whether the model learned, and names its optimizer.

``learned`` is read off the DP AUROC's 95% interval (post-processing of the charged
evaluation): "yes" when the interval lies above 0.5, "not shown" with a plain sentence when
it holds 0.5 (or lies below it, or the AUROC is undefined), "not evaluated" when no
evaluation ran. Built here from fixed metric values; the CLI's ``jobs status`` / ``submit``
summary and ``jobs result`` print the same sentence and the optimizer with its lr.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from factories import job_spec

from sandbox.api.wire import from_service
from sandbox.jobs import JobRecord, JobState
from sandbox.release import (
    LEARNED_NOT_EVALUATED,
    LEARNED_NOT_SHOWN,
    LEARNED_YES,
    learned_verdict,
    write_model_card,
)
from sandbox.release_check import MODEL_CARD_KEYS, _json_object
from sandbox.results import ChargeRecord, DpsgdResult


def metrics(auroc: float | None, lo: float, hi: float) -> dict[str, Any]:
    return {
        "auroc": auroc,
        "accuracy": 0.7,
        "ece": 0.05,
        "n_noisy": 300.0,
        "bins": 32,
        "sigma": 20.0,
        "ci95": {
            "auroc": [lo, hi],
            "accuracy": [0.6, 0.8],
            "ece": [0.0, 0.1],
            "n_noisy": [250.0, 350.0],
        },
        "unreliable": False,
        "unreliable_reason": None,
        "ci_method": "test",
    }


@pytest.mark.parametrize(
    ("m", "verdict", "sentence"),
    [
        (
            metrics(0.70, 0.655, 0.748),
            LEARNED_YES,
            "the DP AUROC's 95% interval 0.655-0.748 lies above 0.5 (chance): "
            "the model ranks better than chance",
        ),
        (
            metrics(0.53, 0.45, 0.62),
            LEARNED_NOT_SHOWN,
            "the DP AUROC's 95% interval 0.450-0.620 includes 0.5: "
            "the model may not have learned anything",
        ),
        (
            metrics(0.52, 0.5, 0.6),  # touching 0.5 is including it
            LEARNED_NOT_SHOWN,
            "the DP AUROC's 95% interval 0.500-0.600 includes 0.5: "
            "the model may not have learned anything",
        ),
        (
            metrics(0.40, 0.31, 0.45),
            LEARNED_NOT_SHOWN,
            "the DP AUROC's 95% interval 0.310-0.450 lies below 0.5: "
            "the model ranks worse than chance",
        ),
        (
            metrics(None, 0.0, 1.0),
            LEARNED_NOT_SHOWN,
            "the DP AUROC is undefined under the evaluation noise: "
            "nothing shows that the model learned",
        ),
        (
            {"auroc": 0.8, "accuracy": 0.7},  # a result stored before the intervals
            LEARNED_NOT_SHOWN,
            "the DP AUROC 0.800 has no 95% interval: nothing shows that the model learned",
        ),
        (
            {},
            LEARNED_NOT_EVALUATED,
            "no DP evaluation was run (privacy.evaluate = false): "
            "nothing shows whether the model learned",
        ),
    ],
)
def test_the_verdict_reads_the_auroc_interval(m: dict, verdict: str, sentence: str) -> None:
    assert learned_verdict(m) == {"verdict": verdict, "statement": sentence}


def _job(spec: dict[str, Any], result: DpsgdResult | None = None) -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(
        id="job-test",
        project="readmission",
        dataset="cohort",
        submitted_by="rita",
        spec=spec,
        spec_hash="0" * 64,
        state=JobState.SUCCEEDED,
        reservation_id="r",
        data_opened=True,
        progress=None,
        result=None if result is None else result.to_dict(),
        error=None,
        created_at=now,
        started_at=now,
        finished_at=now,
    )


def _result(m: dict[str, Any], optimizer: dict[str, Any] | None) -> DpsgdResult:
    return DpsgdResult(
        epsilon=1.0,
        delta=1e-6,
        plan={"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 40, "eval_sigma": 20.0},
        steps_taken=40,
        epochs_done=2,
        clipping="book-keeping",
        device="cpu",
        metrics=m,
        n_features=4,
        feature_names=["a", "b", "c", "d"],
        optimizer=optimizer,
        charge=ChargeRecord("ev-1", 7, "h" * 64),
    )


def _card(tmp_path: Path, spec: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    job = _job(spec)
    path = write_model_card(tmp_path, job, None, _result(m, None), backend="in-process")
    raw = path.read_bytes()
    # the release gate's own check: known keys only, in the form the service writes
    return _json_object("model_card.json", raw, MODEL_CARD_KEYS, job.id)


def test_the_card_says_whether_it_learned_and_names_the_optimizer(tmp_path: Path) -> None:
    card = _card(tmp_path, job_spec().to_dict(), metrics(0.53, 0.45, 0.62))
    assert card["learned"] == {
        "verdict": LEARNED_NOT_SHOWN,
        "statement": "the DP AUROC's 95% interval 0.450-0.620 includes 0.5: "
        "the model may not have learned anything",
    }
    assert card["dp_metrics_display"]["auroc"] == "0.530 (95% CI 0.450-0.620)"
    assert card["training"]["optimizer"] == "adam" and card["training"]["lr"] == 0.5
    assert "post-processing" in card["privacy"]["optimizer"]

    skipped = job_spec(**{"privacy.evaluate": False}).to_dict()
    card = _card(tmp_path, skipped, {})
    assert card["learned"]["verdict"] == LEARNED_NOT_EVALUATED


def test_the_card_of_an_old_job_names_sgd(tmp_path: Path) -> None:
    """A job stored before training.optimizer existed trained with SGD: its card says so."""
    old = job_spec(**{"training.optimizer": "sgd"}).to_dict()
    del old["training"]["optimizer"]
    card = _card(tmp_path, old, metrics(0.70, 0.655, 0.748))
    assert card["training"]["optimizer"] == "sgd"
    assert card["learned"]["verdict"] == LEARNED_YES


def _printed(fn: Any, *args: Any) -> str:
    from sandbox.cli.common import console

    with console.capture() as cap:
        fn(*args)
    return " ".join(cap.get().split())  # the console wraps long lines


def test_the_cli_prints_the_sentence_and_the_optimizer(tmp_path: Path) -> None:
    from sandbox.cli.jobs import _released, _summary

    spec = job_spec(**{"training.optimizer": "adamw", "training.lr": 0.03})
    m = metrics(0.53, 0.45, 0.62)
    rec = from_service(_job(spec.to_dict(), _result(m, spec.training.optimizer_summary())))
    text = _printed(_summary, rec)
    assert "optimizer adamw, lr 0.03, weight decay 0.01" in text
    assert (
        "learned: not shown; the DP AUROC's 95% interval 0.450-0.620 includes 0.5: "
        "the model may not have learned anything"
    ) in text
    # a result stored before the optimizer was recorded shows no optimizer line
    old = from_service(_job(spec.to_dict(), _result(metrics(0.7, 0.6, 0.8), None)))
    text = _printed(_summary, old)
    assert "optimizer" not in text and "learned: yes;" in text

    card = tmp_path / "release" / "model_card.json"
    card.parent.mkdir()
    card.write_text(
        json.dumps(
            {
                "training": spec.to_dict()["training"],
                "learned": learned_verdict(metrics(0.7, 0.655, 0.748)),
            }
        )
    )
    text = _printed(_released, {"out": str(card.parent), "files": [str(card)]})
    assert "released 1 files" in text
    assert "optimizer adamw, lr 0.03, weight decay 0.01" in text
    assert "learned: yes; the DP AUROC's 95% interval 0.655-0.748 lies above 0.5" in text
