"""What runs on a Ray worker for one synthetic-data job (DP fit, or a steward's non-DP baseline).

It reads the governed rows through ``connectors`` (one row per person, the train part of the
person split; the handle records ``data_opened`` first), fits and samples with
``privacy.synth``, recomputes the epsilon from the charged steps with the accountant, and
writes into the job's folder:

    synthetic.parquet       the synthetic rows (released for DP methods once charged)
    report_full.json        the steward's report (column-level scores, DCR): never released
    report_aggregate.json   scalar scores: shown to the researcher once a steward releases them
    plots/*.png             steward only (they draw real distributions)

Its return value carries only the accountant's figures and sizes, never a score or a value.
Its ``steps`` are its report of the releases it made: the service checks them against the
releases it planned (``privacy.job_plan.plan_synth``) and charges the plan's epsilon; the
worker's own epsilon is for display (and for its own refusal to release above the target).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from foundation.errors import IntegrityError
from sandbox.results import SynthResult


def restricted_contract(contract_dict: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """The contract limited to ``columns`` (what the grant covers)."""
    d = json.loads(json.dumps(contract_dict))
    cols = d["columns"]
    if isinstance(cols, dict):
        d["columns"] = {k: v for k, v in cols.items() if k in columns}
    else:
        d["columns"] = [c for c in cols if c["name"] in columns]
    return d


def run_synth_job(payload: dict[str, Any]) -> SynthResult:
    from connectors.dataset_handle import DatasetHandle
    from connectors.external import write_table
    from connectors.person_split import Split
    from connectors.schema import SchemaContract
    from connectors.tables import load_table
    from foundation.engine_env import configure_engine_env
    from foundation.sql import make_engine
    from privacy.accountant import epsilon_for
    from privacy.synth.base import fit_and_sample, is_dp
    from privacy.synth.report import build_report
    from privacy.synth.report_plots import save_plots
    from sandbox.jobs import JobStore
    from sandbox.worker import noise_seed

    zone_root = Path(payload["zone_root"])
    configure_engine_env(zone_root)
    job_id: str = payload["job_id"]
    jobs = JobStore(make_engine(payload["db_url"]))
    contract = SchemaContract.from_dict(payload["contract"])
    columns = [c.name for c in contract.columns]
    handle = DatasetHandle(
        name=payload["dataset"],
        path=Path(payload["dataset_path"]),
        contract=contract,
        authorization=job_id,
        on_open=lambda: jobs.mark_data_opened(job_id),
    )
    seed = int(payload["seed"])
    train = load_table(handle, columns, part=Split.TRAIN, seed=seed, keep_identifier=True)
    test = load_table(handle, columns, part=Split.TEST, seed=seed, keep_identifier=True)
    method = payload["method"]
    dp = is_dp(method)
    result = fit_and_sample(
        method,
        train,
        contract,
        epsilon=float(payload["epsilon"]) if dp else None,
        delta=float(payload["delta"]) if dp else None,
        rows=int(payload["rows"]),
        seed=seed,
        noise_seed=noise_seed(payload, "synth"),
    )
    epsilon = None
    if dp:
        # recompute from the charged steps with the accountant, independently of the method
        epsilon = epsilon_for(list(result.steps), float(payload["delta"]))
        if epsilon > float(payload["epsilon"]) * (1 + 1e-9):
            raise IntegrityError("the synthesizer spent more than its epsilon; nothing is released")
    out = zone_root / "jobs" / job_id
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "synthetic.parquet", result.table)
    label = payload.get("label")
    features = payload.get("features") or []
    report_ok = False
    if label and features:
        report = build_report(
            train, test, result.table, contract, label=label, features=features, seed=seed
        )
        (out / "report_full.json").write_text(
            json.dumps(report.steward_view(), indent=2, sort_keys=True, default=str)
        )
        (out / "report_aggregate.json").write_text(
            json.dumps(report.aggregate_view(), indent=2, sort_keys=True, default=str)
        )
        save_plots(report, train, result.table, contract, out / "plots")
        report_ok = True
    # no timings in the result: how long training took depends on the data (docs/privacy-model.md)
    return SynthResult(
        method=str(result.method),
        dp=dp,
        epsilon=epsilon,
        delta=float(payload["delta"]) if dp else None,
        steps=[s.to_dict() for s in result.steps],
        rows=result.table.num_rows,
        columns=columns,
        report=report_ok,
    )
