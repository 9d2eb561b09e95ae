"""Rows that cost nothing: what dry runs and the hyperparameter search train on.

Two kinds, never a real row:

- ``"dummy"``: a table drawn from the dataset's schema contract alone
  (``connectors.dummy.dummy_table``); its labels carry no signal.
- ``"synthetic:JOB"``: the rows of a DP synthetic-data job (``sandbox synth fit``) of the
  spec's project and dataset whose charge is committed: a DP release, already paid for,
  which post-processing may use freely.

``default_source`` is what the zone uses when nobody names one (the search at submit): the
newest such synthetic job whose columns cover the spec's, else dummy.
"""

from __future__ import annotations

import pyarrow as pa

from connectors.dummy import dummy_table
from connectors.external import read_user_table
from connectors.schema import SchemaContract
from foundation.errors import NotFoundError, PolicyDenied, SpecError
from policies.store_records import DatasetRecord
from sandbox.context import ZoneContext
from sandbox.jobs import JobRecord, JobState
from sandbox.jobspec import JobSpec
from sandbox.mechanisms.base import is_charged
from sandbox.mechanisms.dpsgd_plan import check_columns, spec_mechanism
from sandbox.mechanisms.synthetic import governed_contract
from sandbox.synth_worker import restricted_contract

DUMMY = "dummy"
SYNTHETIC = "synthetic:"


def synthetic_job(ctx: ZoneContext, job_id: str) -> JobRecord:
    rec = ctx.jobs.get(job_id)
    if (rec.result or {}).get("kind") != "synthetic":
        raise NotFoundError(f"{job_id} is not a synthetic-data job; `sandbox jobs list` shows them")
    return rec


def free_table(
    ctx: ZoneContext,
    spec: JobSpec,
    on: str,
    *,
    dummy_rows: int,
    dataset: DatasetRecord | None = None,
) -> tuple[pa.Table, SchemaContract]:
    """The free rows ``on`` names for ``spec`` and their contract: ``"dummy"`` (``dummy_rows``
    rows drawn from the contract alone) or ``"synthetic:JOB"`` (a DP synthetic table of the
    spec's project and dataset, charged, so already released to the project). No real row is
    read: dry runs and the hyperparameter search (``sandbox.tuning``) run on these.
    ``dataset``: the version record when the caller has looked it up already."""
    rec = dataset or ctx.dataset_version_for(spec.project, spec.dataset, spec_mechanism(spec))
    contract = governed_contract(SchemaContract.from_dict(rec.contract))
    # the checks a submit runs on the spec, so a dry run never accepts what submit refuses
    check_columns(spec, contract)
    if on == DUMMY:
        return dummy_table(contract, dummy_rows, spec.training.seed), contract
    if not on.startswith(SYNTHETIC):
        raise SpecError("--on", "must be dummy or synthetic:JOB", "e.g. --on dummy")
    src = synthetic_job(ctx, on.split(":", 1)[1])
    if (
        src.project != spec.project
        or src.dataset != spec.dataset
        or not (src.result or {}).get("dp")
        or not is_charged(ctx, src)
    ):
        raise PolicyDenied(
            f"{on} is not a released DP synthetic table of project {spec.project} "
            f"and dataset {spec.dataset}",
            missing=("a DP synthetic job of this project",),
            grantor="project researcher",
        )
    released = set((src.result or {}).get("columns") or [])
    path = ctx.zone.job_dir(src.id) / "synthetic.parquet"
    table = read_user_table(path, [c for c in contract.names if c in released])
    contract = SchemaContract.from_dict(
        restricted_contract(contract.to_dict(), list(table.column_names))
    )
    return table, contract


def default_source(ctx: ZoneContext, spec: JobSpec) -> str:
    """``"synthetic:JOB"`` for the newest DP synthetic job of the spec's project and dataset
    that succeeded, is charged and holds every column the spec reads; else ``"dummy"``."""
    for rec in reversed(ctx.jobs.list(project=spec.project)):
        result = rec.result or {}
        if (
            rec.dataset == spec.dataset
            and rec.state is JobState.SUCCEEDED
            and result.get("kind") == "synthetic"
            and result.get("dp")
            and spec.columns <= set(result.get("columns") or ())
            and is_charged(ctx, rec)
        ):
            return SYNTHETIC + rec.id
    return DUMMY
