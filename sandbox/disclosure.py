"""What a researcher may see of a job or a dataset: the one place views are cut.

Every number that reaches a researcher is either DP and charged, public by contract, or a
steward's release (``docs/privacy-chokepoints.md`` lists each one). Two kinds of figure are
cut here before anything leaves the service for a researcher or an analyst:

- **Timings.** ``started_at`` and ``finished_at`` of a job: how long a job ran depends on
  how many rows it read.
- **Exact counts and what reveals them**, unless the dataset's contract declares its counts
  public (``[dataset] counts = "public"``): the training split's size sets DP-SGD's sample
  rate (``batch_size / n``) and the number of steps per epoch, and the noise multiplier is
  calibrated from both, so each of them gives ``n`` back. They stay in the zone's job record
  (the steward's view) and leave the researcher's view, the model card and the quote.

Stewards and operators see the zone's records whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policies.roles import Role
from sandbox.jobs import JobRecord

#: keys, at any depth, whose values are exact counts or figures from which a count follows
COUNT_DERIVED = frozenset(
    {
        "n",
        "n_train",
        "n_train_estimate",
        "n_persons",
        "rows_read",
        "sample_rate",
        "step",
        "steps",
        "steps_per_epoch",
        "steps_per_round",
        "steps_taken",
        "epochs_done",
        "noise_multiplier",
        "eval_sigma",
        "n_noisy",
    }
)

#: what a withheld figure shows instead, so a reader knows why it is missing
WITHHELD = "withheld: the dataset's counts are private"


def sees_everything(role: Role | str) -> bool:
    """Stewards and operators hold the zone's records; everyone else gets the cut views."""
    return Role(role) in (Role.STEWARD, Role.OPERATOR)


def redact_counts(obj: Any) -> Any:
    """A copy of ``obj`` with every count-derived figure replaced by :data:`WITHHELD`."""
    if isinstance(obj, Mapping):
        return {
            k: (WITHHELD if k in COUNT_DERIVED and obj[k] is not None else redact_counts(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [redact_counts(v) for v in obj]
    return obj


def cut_released_card(card: Path) -> dict[str, Any]:
    """Rewrite a card that leaves the zone with the same cut as every researcher view (for a
    dataset whose counts are private); returns what it now holds."""
    shown = redact_counts(json.loads(card.read_text()))
    card.write_text(json.dumps(shown, indent=2))
    return dict(shown)


def job_view(rec: JobRecord, *, role: Role | str, counts_public: bool) -> JobRecord:
    """The job as ``role`` may see it (see the module docstring)."""
    if sees_everything(role):
        return rec
    result, progress = rec.result, rec.progress
    if not counts_public:
        result = redact_counts(result) if result is not None else None
        progress = redact_counts(progress) if progress is not None else None
    return dataclasses.replace(
        rec, result=result, progress=progress, started_at=None, finished_at=None
    )


def dataset_view(rec: Any, *, role: Role | str) -> dict[str, Any]:
    """A dataset card: whole for stewards, the contract (and public counts) for the rest."""
    view: dict[str, Any] = rec.to_dict() if sees_everything(role) else rec.to_public_dict()
    return view
