"""What a finished job holds: one frozen result type per mechanism, read by attribute.

Workers return these with their report of what they ran; the service checks the report
against its own plan (``sandbox.mechanisms.plans``), replaces every privacy figure with the
plan's (the charge, the plan, the steps), writes cards from the result and stores it
(``to_dict``) in the job's row; the CLI and the cards read them back with ``parse_result``.
None of them holds a value from a row: figures from the accountant and the plan, DP metrics,
sizes the researcher chose.

``ChargeRecord`` is what the service adds once the ledger committed (the ledger event and the
audit event that recorded the charge): a release is only ever made from a charged result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Self


@dataclass(frozen=True)
class ChargeRecord:
    ledger_event: str | None = None
    audit_seq: int | None = None
    audit_hash: str | None = None


class _Result:
    """Shared codec: the stored dict is the dataclass's fields, charge fields flattened."""

    charge: ChargeRecord

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "charge"}  # type: ignore[arg-type]
        out.update(asdict(self.charge))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        names = {f.name for f in fields(cls)} - {"charge"}  # type: ignore[arg-type]
        charge = ChargeRecord(
            **{k: data.get(k) for k in ("ledger_event", "audit_seq", "audit_hash")}
        )
        return cls(**{k: v for k, v in data.items() if k in names}, charge=charge)  # type: ignore[call-arg]

    def charged(self, charge: ChargeRecord) -> Self:
        return replace(self, charge=charge)  # type: ignore[type-var]


@dataclass(frozen=True)
class DpsgdResult(_Result):
    """A DP-SGD run (charged, or a dry run on dummy / released synthetic data).

    From the worker, ``epsilon`` is its own figure (display only) and ``run`` its report of
    what it ran: ``noise_multiplier``, ``sample_rate``, ``steps``, ``max_grad_norm``,
    ``eval_sigma`` (None when no evaluation histogram was released) and ``delta``. Once the
    service checked the report, ``epsilon``, ``plan`` and ``steps_taken`` are the service's
    plan figures and ``run`` is dropped (it equals the plan)."""

    epsilon: float
    delta: float
    plan: dict[str, Any]
    steps_taken: int
    epochs_done: int
    clipping: str
    device: str
    metrics: dict[str, Any]
    n_features: int
    feature_names: list[str]
    #: "dp-histogram", or "skipped" (``privacy.evaluate = false``)
    evaluation: str = "dp-histogram"
    #: None for a charged job; "dummy" or "synthetic:JOB" for a dry run (charges nothing)
    dry_run: str | None = None
    #: the worker's report of what it ran (checked against the plan, then dropped)
    run: dict[str, Any] | None = None
    #: the update rule applied to the privatized gradient, as the job's stored spec sets it
    #: (the service writes it, never the worker): ``{"name": "adam", "lr": 0.03}``
    #: (+ ``weight_decay`` for adamw); None in results stored before it was recorded
    optimizer: dict[str, Any] | None = None
    #: the search that chose the spec's "auto" hyperparameters on free data
    #: (``sandbox.mechanisms.tuning.Tuning``), as the service recorded it; None when the
    #: spec wrote them all
    tuning: dict[str, Any] | None = None
    #: a dry run: what the job would be charged if submitted (the quote's ``epsilon`` and
    #: ``delta``; the service's figures); None for a charged job
    would_spend: dict[str, float] | None = None
    kind: str = "dp-sgd"
    charge: ChargeRecord = field(default_factory=ChargeRecord)


@dataclass(frozen=True)
class SynthResult(_Result):
    """A synthetic-data fit: DP (charged) or a steward's non-DP baseline (held).

    From the worker, ``steps`` is its report of the Gaussian releases it made (noise
    multiplier, sample rate, steps each) and ``epsilon`` its own figure (display only); the
    service checks the steps against its plan (``privacy.job_plan.plan_synth``) and charges,
    stores and shows the plan's epsilon."""

    method: str
    dp: bool
    epsilon: float | None
    delta: float | None
    steps: list[dict[str, Any]]
    rows: int
    columns: list[str]
    report: bool
    report_released: bool = False
    #: set by the steward's release of the report: names it a non-DP release, who and when
    report_release: dict[str, Any] | None = None
    #: a steward released a non-DP baseline's rows
    steward_release: bool = False
    kind: str = "synthetic"
    charge: ChargeRecord = field(default_factory=ChargeRecord)


@dataclass(frozen=True)
class FederatedResult(_Result):
    """A federated job: each site's charge, the rounds run, the pooled DP metrics.

    Before the charge, ``sites`` is the server's report per site (``summary.json``: the
    site's plan figures, steps, evaluations and rounds); the service checks each against
    the site's plan it rebuilds itself, then replaces ``sites`` with what each site was
    charged (the plan's figure, never the reported epsilon)."""

    sites: dict[str, dict[str, Any]]
    epsilon: float
    delta: float
    rounds: int
    dropped: list[str]
    excluded: list[Any]
    left_out: dict[str, str]
    server_epsilon: float | None
    metrics: dict[str, Any]
    evaluation: str | None = None
    #: each site's update rule, as ``DpsgdResult.optimizer``
    optimizer: dict[str, Any] | None = None
    mode: str = "federated"
    kind: str = "federated"
    charge: ChargeRecord = field(default_factory=ChargeRecord)


JobResult = DpsgdResult | SynthResult | FederatedResult


def parse_result(data: Mapping[str, Any] | None) -> JobResult | None:
    """The typed result of a stored job result (None for a job with none yet)."""
    if not data:
        return None
    if data.get("mode") == "federated" or data.get("kind") == "federated":
        return FederatedResult.from_dict(data)
    if data.get("kind") == "synthetic":
        return SynthResult.from_dict(data)
    return DpsgdResult.from_dict(data)
