"""``sandbox dataset delete``: remove a governed dataset for good, keep its history.

What a deletion does, in order:

1. Refuses while a queued or running job uses the dataset (naming the jobs): a worker may be
   reading it, and its charge is settled against the dataset's record.
2. Marks the dataset deleted in the state database. Its row stays: requests, grants, caps
   and the ledger name it, and the audit chain must keep verifying. From then on
   ``dataset list`` leaves it out, ``dataset show`` and every new request, grant, cap or job
   on it is refused (``NotFoundError``), and its name is never given to another dataset.
3. Destroys its data key (``connectors.dataset_key``), then removes its files: a copy or a
   backup of its Parquet, taken before, is unreadable from then on (a backup of the whole
   zone folder, keys included, is not: that is a backup of the zone, kept under its rules).

The audit event (``dataset.delete``) records who, and whether a key was destroyed (a dataset
ingested before encryption at rest has none, so its copies stay readable plain Parquet).

A job admitted in the instant between step 1 and step 2 is not refused here; it finds no
file, fails before reading a row and has its reservation released.

Deleting the dataset deletes every version of it. ``--version N`` deletes one older version
alone (its files and key; its row stays, marked deleted): jobs and grants pinned to it can no
longer read it. The latest version is not deleted alone: delete the dataset, or ingest a
newer version first.
"""

from __future__ import annotations

from typing import Any

from connectors.governed_file import remove_governed
from foundation.errors import SpecError
from policies.roles import Action, Actor
from sandbox.context import ZoneContext
from sandbox.dataset_ingest import version_dir
from sandbox.jobs import TERMINAL

#: how many busy job ids a refusal names before it says "and N more"
_SHOWN_JOBS = 10


def delete_dataset(
    ctx: ZoneContext, actor: Actor, name: str, version: int | None = None
) -> dict[str, Any]:
    """The whole dataset (every version), or with ``version`` one older version of it."""
    if version is not None:
        return _delete_version(ctx, actor, name, version)
    with ctx.act(actor, Action.DATASET_DELETE, name) as extra:
        ctx.store.get_dataset(name)  # a live dataset, else NotFoundError (unknown or deleted)
        _refuse_if_busy(ctx, name)
        live = [v["version"] for v in ctx.store.list_dataset_versions(name) if not v["deleted"]]
        ctx.store.mark_dataset_deleted(name, actor.name)
        destroyed = [_remove(ctx, name, v) for v in live]
        key_destroyed = all(destroyed)
        extra.update(key_destroyed=key_destroyed, versions=len(live))
        return {"name": name, "deleted": True, "key_destroyed": key_destroyed}


def _delete_version(ctx: ZoneContext, actor: Actor, name: str, version: int) -> dict[str, Any]:
    with ctx.act(actor, Action.DATASET_DELETE, name, {"version": version}) as extra:
        ctx.store.get_dataset(name, version=version)  # live, else NotFoundError
        _refuse_if_busy(ctx, name, version)
        ctx.store.mark_version_deleted(name, version, actor.name)
        key_destroyed = _remove(ctx, name, version)
        extra.update(key_destroyed=key_destroyed)
        return {
            "name": name,
            "version": version,
            "deleted": True,
            "key_destroyed": key_destroyed,
        }


def _remove(ctx: ZoneContext, name: str, version: int) -> bool:
    return remove_governed(version_dir(ctx, name, version))


def _refuse_if_busy(ctx: ZoneContext, name: str, version: int | None = None) -> None:
    busy = sorted(
        j.id
        for j in ctx.jobs.list()
        if j.dataset == name
        and j.state not in TERMINAL
        and (version is None or j.dataset_version == version)
    )
    if not busy:
        return
    shown = ", ".join(busy[:_SHOWN_JOBS])
    if len(busy) > _SHOWN_JOBS:
        shown += f" and {len(busy) - _SHOWN_JOBS} more"
    raise SpecError(
        "NAME",
        f"dataset {name!r} is used by queued or running jobs: {shown}",
        "wait for them to end or cancel them (`sandbox jobs cancel JOB`), then delete again",
    )
