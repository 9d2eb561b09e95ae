"""A steward deletes a dataset: its files and data key go, its history stays.

Through the service (in-process) and once through the installed ``sandbox`` command.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import last_json, sandbox
from factories import FEATURES, LABEL, ZoneWorld, job_spec, make_world

from connectors.cohort import cohort_contract
from connectors.dataset_key import WRAPPED_KEY_FILE
from connectors.governed_file import DATA_FILE, dataset_summary
from foundation.errors import NotFoundError, PolicyDenied, SchemaError, SpecError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState

KEY = BudgetKey("readmission", "cohort")


def _world(root: Path) -> ZoneWorld:
    return make_world(root, InProcessBackend(), patients=600)


def _ledger_events(w: ZoneWorld) -> list[tuple[str, str, float]]:
    return [(e.kind, e.reservation_id or "", e.epsilon) for e in w.svc.ledger.events(KEY)]


def test_deletion_destroys_the_key_and_keeps_the_history(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone")
    job = w.svc.submit(w.researcher, job_spec(**{"training.epochs": 1}))
    assert job.state is JobState.SUCCEEDED
    folder = w.root / "data" / "cohort"
    backup = tmp_path / "backup.parquet"
    shutil.copy(folder / DATA_FILE, backup)  # a backup of the Parquet, taken before
    events = _ledger_events(w)
    assert any(kind == "commit" for kind, _, _ in events)

    out = w.svc.delete_dataset(w.steward, "cohort")
    assert out == {"name": "cohort", "deleted": True, "key_destroyed": True}
    assert not folder.exists()

    # the backup, put back where the zone would read it, opens under no key the zone holds
    folder.mkdir()
    shutil.copy(backup, folder / DATA_FILE)
    assert not (folder / WRAPPED_KEY_FILE).exists()
    with pytest.raises(SchemaError, match="data key is gone"):
        dataset_summary(folder, cohort_contract())
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(backup)

    # gone from every live view; new requests, jobs and caps are refused by name
    assert [d["name"] for d in w.svc.list_datasets(w.steward)] == []
    for actor in (w.steward, w.researcher):
        with pytest.raises(NotFoundError, match="'cohort' was deleted"):
            w.svc.show_dataset(actor, "cohort")
    with pytest.raises(NotFoundError, match="deleted"):
        w.svc.submit(w.researcher, job_spec(**{"training.epochs": 1}))
    with pytest.raises(NotFoundError, match="deleted"):
        w.svc.request_access(
            w.researcher, "readmission", "cohort", [*FEATURES, LABEL], ["dp-sgd"], 1.0, 1e-5
        )
    with pytest.raises(NotFoundError, match="deleted"):
        w.svc.set_dataset_cap(w.steward, "cohort", 1.0)
    with pytest.raises(NotFoundError, match="deleted"):
        w.svc.delete_dataset(w.steward, "cohort")
    # the name stays with its history
    with pytest.raises(SpecError, match="its name stays with its history"):
        w.svc.ingest_demo(w.steward, "cohort", 200)

    # the history stays: the ledger's events, the past job's view, a verifying audit chain
    assert _ledger_events(w) == events
    assert w.svc.job_status(w.researcher, job.id).state is JobState.SUCCEEDED
    assert w.svc.audit_verify(w.operator).ok
    deletions = [e for e in w.svc.audit.list(limit=1000) if e.action == "dataset.delete"]
    (event,) = [e for e in deletions if e.outcome == "ok"]  # the second try was refused
    assert (event.actor, event.target) == ("sam", "cohort")
    assert event.details.get("key_destroyed") is True


def test_a_queued_job_blocks_deletion_until_it_ends(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone")
    spec = job_spec(**{"training.epochs": 1})
    job_id = w.svc.runner.admit("dp-sgd", w.researcher, spec, target=spec.project)
    assert w.svc.jobs.get(job_id).state is JobState.QUEUED
    with pytest.raises(SpecError) as err:
        w.svc.delete_dataset(w.steward, "cohort")
    assert err.value.field == "NAME"
    assert "'cohort'" in str(err.value) and job_id in str(err.value)
    assert (w.root / "data" / "cohort" / WRAPPED_KEY_FILE).exists()
    assert [d["name"] for d in w.svc.list_datasets(w.steward)] == ["cohort"]
    (event,) = [e for e in w.svc.audit.list(limit=1000) if e.action == "dataset.delete"]
    assert event.outcome == "denied"

    w.svc.cancel_job(w.researcher, job_id)
    assert w.svc.delete_dataset(w.steward, "cohort")["deleted"]


def test_a_researcher_cannot_delete(tmp_path: Path) -> None:
    w = _world(tmp_path / "zone")
    for actor in (w.researcher, w.operator):
        with pytest.raises(PolicyDenied):
            w.svc.delete_dataset(actor, "cohort")
    assert (w.root / "data" / "cohort" / DATA_FILE).exists()
    assert w.svc.show_dataset(w.researcher, "cohort")["name"] == "cohort"


@pytest.mark.slow
def test_delete_through_the_installed_cli(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    w = _world(root)
    w.svc.close()
    denied = sandbox("dataset", "delete", "cohort", "--json", zone=root, token=w.researcher_token)
    assert denied.returncode != 0 and "Traceback" not in denied.stderr
    assert last_json(denied).get("error") == "policy_denied"

    done = sandbox("dataset", "delete", "cohort", "--json", zone=root, token=w.steward_token)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert last_json(done) == {"name": "cohort", "deleted": True, "key_destroyed": True}
    assert not (root / "data" / "cohort").exists()

    listed = sandbox("dataset", "list", "--json", zone=root, token=w.researcher_token)
    assert last_json(listed)["datasets"] == []
    verify = sandbox("audit", "verify", "--json", zone=root, token=w.operator_token)
    assert verify.returncode == 0, (verify.stdout, verify.stderr)
