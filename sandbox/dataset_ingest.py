"""``sandbox dataset ingest``: a steward's file (or the demo cohort) becomes a governed dataset,
or the next version of one.

Ingesting a new name registers version 1. Ingesting the name of a live dataset again adds
its next version, which becomes the latest: grants that follow the latest (those that name no
version) read it from their next job on; grants pinned to an older version, and the jobs and
cards that ran on it, keep reading theirs, until a steward deletes that version
(``sandbox dataset delete NAME --version N``). Every version has its own folder and data key:
version 1 in ``data/NAME``, version k in ``data/NAME.vK`` (a dataset name has no dot, so no
other dataset's folder can be one). The privacy budget is the dataset's, across versions: a
version holds the same people, so grants, caps and the ledger name the dataset, not the version.

A deleted dataset's name stays with its history (grants, ledger, audit) and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connectors.cohort import cohort_contract, generate_cohort
from connectors.ingest import IngestReport, ingest_file, ingest_table
from connectors.schema import SchemaContract
from foundation.errors import NotFoundError, SpecError
from policies.roles import Action, Actor
from sandbox.context import ZoneContext


def ingest_dataset(
    ctx: ZoneContext, actor: Actor, name: str, source: Path, contract: SchemaContract
) -> dict[str, Any]:
    with ctx.act(actor, Action.DATASET_INGEST, name) as extra:
        version = next_version(ctx, name)
        report = ingest_file(
            source,
            contract,
            version_dir(ctx, name, version),
            ctx.zone.secret(),
            zone_key_file=ctx.zone.data_key_file(),
        )
        rec = _register(ctx, actor, name, contract, report, version)
        cleaned = sum(n for per in report.cleaned.values() for n in per.values())
        extra.update(
            rows=report.rows, persons=report.persons, version=version, cleaned_cells=cleaned
        )
        # the record, and what the contract's declared cleaning changed (counts per column,
        # never values), for the steward who ingested
        return {**rec.to_dict(), "cleaned": report.cleaned}


def ingest_demo(
    ctx: ZoneContext, actor: Actor, name: str, patients: int, seed: int = 0, canaries: Any = None
) -> Any:
    with ctx.act(actor, Action.DATASET_INGEST, name, {"demo": True}) as extra:
        if patients < 100:
            raise SpecError("--patients", "must be at least 100", "ask for more patients")
        version = next_version(ctx, name)
        contract = cohort_contract()
        report = ingest_table(
            generate_cohort(patients, seed=seed, canaries=canaries),
            contract,
            version_dir(ctx, name, version),
            ctx.zone.secret(),
            zone_key_file=ctx.zone.data_key_file(),
        )
        rec = _register(ctx, actor, name, contract, report, version)
        extra.update(rows=report.rows, persons=report.persons, version=version)
        return rec


def next_version(ctx: ZoneContext, name: str) -> int:
    """1 for a new name, the latest plus one for a live dataset; a deleted one's is refused."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SpecError("NAME", "must be letters, digits, '-' or '_'", "e.g. cohort-2026")
    try:
        current = ctx.store.get_dataset(name, include_deleted=True)
    except NotFoundError:
        return 1
    if ctx.store.is_dataset_deleted(name):
        raise SpecError(
            "NAME",
            f"dataset {name!r} was deleted; its name stays with its history",
            "pick another name",
        )
    return current.latest_version + 1


def version_dir(ctx: ZoneContext, name: str, version: int) -> Path:
    """Where a version's governed file and data key live (module docstring)."""
    return ctx.zone.version_dir(name, version)


def _register(
    ctx: ZoneContext,
    actor: Actor,
    name: str,
    contract: SchemaContract,
    report: IngestReport,
    version: int,
) -> Any:
    register = ctx.store.register_dataset if version == 1 else ctx.store.add_dataset_version
    return register(
        name,
        contract.to_dict(),
        str(report.path),
        report.rows,
        report.persons,
        dict(report.sites),
        actor.name,
        cross_site_persons=report.cross_site_persons,
    )
