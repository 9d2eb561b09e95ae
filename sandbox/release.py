"""The release gate's artefacts: what may leave the zone after a job, and its model card.

Only these files leave: the DP-trained weights (safetensors), the preprocessing recorded from
the schema contract (no parameter learned from rows), and the model card. The job's own logs
and the loss curve (functions of the private data without a DP guarantee) stay in the zone.
A name alone lets nothing out: ``sandbox.release_check`` checks what each file holds first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.jobs import JobRecord
from sandbox.results import DpsgdResult, SynthResult

if TYPE_CHECKING:
    from sandbox.release_check import Expected

RELEASED_FILES = ("model.safetensors", "preprocessing.json", "model_card.json")
#: a synthetic-data job releases its rows and its card; the report and plots stay in the zone
#: (the aggregate scores reach the researcher through ``synth report`` once a steward releases them)
SYNTH_FILES = ("synthetic.parquet", "synth_card.json")


#: ``learned["verdict"]``: the DP AUROC's 95% interval lies wholly above 0.5
LEARNED_YES = "yes"
#: the interval includes 0.5 (or lies below it, or the AUROC is undefined under the noise)
LEARNED_NOT_SHOWN = "not shown"
#: no DP evaluation was run (``privacy.evaluate = false``)
LEARNED_NOT_EVALUATED = "not evaluated"


def learned_verdict(metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """Whether the DP evaluation shows that the model learned: ``{"verdict", "statement"}``.

    Read off the DP AUROC's 95% interval alone (``metrics["ci95"]["auroc"]``, from
    ``privacy.dp_metrics``): post-processing of the charged evaluation, nothing new is
    charged. Chance ranks at 0.5, so an interval that holds 0.5 does not show learning."""
    if not metrics:
        return {
            "verdict": LEARNED_NOT_EVALUATED,
            "statement": "no DP evaluation was run (privacy.evaluate = false): "
            "nothing shows whether the model learned",
        }
    auroc = metrics.get("auroc")
    interval = (metrics.get("ci95") or {}).get("auroc")
    if not isinstance(auroc, int | float) or math.isnan(auroc):
        return {
            "verdict": LEARNED_NOT_SHOWN,
            "statement": "the DP AUROC is undefined under the evaluation noise: "
            "nothing shows that the model learned",
        }
    if not interval:
        # a result stored before the intervals existed: the point figure alone
        return {
            "verdict": LEARNED_NOT_SHOWN,
            "statement": f"the DP AUROC {auroc:#.3g} has no 95% interval: "
            "nothing shows that the model learned",
        }
    lo, hi = (float(x) for x in interval)
    span = f"the DP AUROC's 95% interval {lo:#.3g}-{hi:#.3g}"
    if lo > 0.5:
        return {
            "verdict": LEARNED_YES,
            "statement": f"{span} lies above 0.5 (chance): the model ranks better than chance",
        }
    if hi < 0.5:
        return {
            "verdict": LEARNED_NOT_SHOWN,
            "statement": f"{span} lies below 0.5: the model ranks worse than chance",
        }
    return {
        "verdict": LEARNED_NOT_SHOWN,
        "statement": f"{span} includes 0.5: the model may not have learned anything",
    }


def card_training(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The card's ``training``: the spec's training settings with the optimizer named (a spec
    stored before ``training.optimizer`` existed trained with SGD: ``parse_stored_spec``)."""
    from sandbox.jobspec import parse_stored_spec

    return parse_stored_spec(spec).to_dict()["training"]


def write_model_card(
    job_dir: Path, job: JobRecord, dataset: Any, result: DpsgdResult, *, backend: str
) -> Path:
    from privacy.dp_intervals import INTERVAL_METHOD, describe_metrics

    plan = result.plan
    spec = job.spec
    training = card_training(spec)
    # privacy.evaluate = false: no evaluation histogram was released or charged
    skipped = result.evaluation == "skipped" or plan.get("eval_sigma") is None
    metrics = None if skipped else result.metrics
    card = {
        "job": job.id,
        "project": job.project,
        "dataset": job.dataset,
        "label": spec["label"],
        "features": spec["features"],
        "columns": sorted([*spec["features"], spec["label"]]),
        "model": spec["model"],
        "mechanism": "dp-sgd",
        "privacy": {
            "epsilon": result.epsilon,
            "delta": result.delta,
            "epsilon_requested": spec["privacy"]["epsilon"],
            "unit": "person (pseudonymous identifier)",
            "neighbouring_relation": "add/remove one person",
            "contribution_bound": "one row per person; per-sample gradient clipping",
            "accountant": plan.get("accountant", "rdp"),
            "noise_multiplier": plan["noise_multiplier"],
            "sample_rate": plan["sample_rate"],
            "steps": result.steps_taken,
            "max_grad_norm": spec["privacy"]["max_grad_norm"],
            "eval_sigma": plan.get("eval_sigma"),
            "composition": (
                "DP-SGD steps only (evaluation skipped), by RDP"
                if skipped
                else "DP-SGD steps and one DP evaluation histogram on other persons (the "
                "person split), composed in parallel: the larger of their RDP epsilons"
                if plan.get("composition") == "parallel"
                else "DP-SGD steps and one DP evaluation histogram, composed by RDP"
            ),
            "clipping": result.clipping,
            "optimizer": f"{training['optimizer']} on the noised, clipped, averaged gradient: "
            "post-processing, no privacy cost of its own",
        },
        "training": training,
        "evaluation": "skipped" if skipped else "one DP histogram of the held-out real split",
        "dp_metrics": metrics,
        # each metric as "0.702 (95% CI 0.655-0.748)", and "unreliable": <reason> when flagged
        "dp_metrics_display": describe_metrics(metrics),
        # "yes" / "not shown" / "not evaluated", with its sentence (post-processing only)
        "learned": learned_verdict(metrics),
        "dp_metrics_note": (
            "no DP evaluation was run or charged (privacy.evaluate = false)"
            if skipped
            else "computed on the held-out real split with Gaussian noise; charged above. "
            f"Intervals: {INTERVAL_METHOD}. unreliable: the noise swamps the test counts "
            "or an interval is too wide to inform"
        ),
        "spec_hash": job.spec_hash,
        "ledger_event": result.charge.ledger_event,
        "audit_event": {"seq": result.charge.audit_seq, "hash": result.charge.audit_hash},
        "compute": {"backend": backend, "device": result.device},
        "preprocessing": "preprocessing.json (parameters from the schema contract, not from rows)",
    }
    if result.tuning is not None:
        # the hyperparameters the zone chose (``training`` holds them): how, on which free
        # rows, and every candidate's score there (docs/tuning.md)
        card["tuning"] = result.tuning
    path = job_dir / "model_card.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True))
    return path


def write_synth_card(job_dir: Path, job: JobRecord, result: SynthResult) -> Path:
    spec = job.spec
    card = {
        "job": job.id,
        "project": job.project,
        "dataset": job.dataset,
        "mechanism": "synthetic",
        "method": result.method,
        "differentially_private": result.dp,
        "columns": result.columns,
        "rows": result.rows,
        "privacy": {
            "epsilon": result.epsilon,
            "delta": result.delta,
            "epsilon_requested": spec.get("epsilon"),
            "unit": "person (pseudonymous identifier); one row per person",
            "neighbouring_relation": "add/remove one person",
            "accountant": "rdp",
            "releases": result.steps,
        },
        "fitted_on": "the train part of the person split; the test part is held out for the report",
        "spec_hash": job.spec_hash,
        "ledger_event": result.charge.ledger_event,
        "audit_event": {"seq": result.charge.audit_seq, "hash": result.charge.audit_hash},
    }
    path = job_dir / "synth_card.json"
    path.write_text(json.dumps(card, indent=2, sort_keys=True))
    return path


def release_artefacts(
    job_dir: Path, out: Path, names: tuple[str, ...] = RELEASED_FILES, *, expected: Expected
) -> list[Path]:
    """Copy the job's releasable files to ``out`` once every one passed its content check
    (``sandbox.release_check``): a refusal raises ``IntegrityError`` and ``out`` is untouched.
    The bytes written are the bytes checked (each file is read once)."""
    # the gate reads preprocessing plans (numpy): loaded when a release is made, not when the
    # service is (see sandbox.service's docstring)
    from sandbox.release_check import check_release

    contents = check_release(job_dir, names, expected)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, data in contents.items():
        (out / name).write_bytes(data)
        copied.append(out / name)
    return copied
