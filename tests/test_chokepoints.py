"""Each privacy chokepoint of docs/privacy-chokepoints.md, pinned so a bypass fails a test."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from factories import job_spec, make_world

from foundation.errors import ComputeError, IntegrityError, PolicyDenied, SpecError, ZoneError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState

ROOT = Path(__file__).resolve().parents[1]
KEY = BudgetKey("readmission", "cohort")


class SpyBackend(InProcessBackend):
    """Runs the real worker in-process and records what the ledger said when it started."""

    def __init__(self, *, fail_before: bool = False) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []
        self.fail_before = fail_before
        self.world: Any = None

    def wait(self, handle: Any, *, poll: Any, poll_s: float = 0.5) -> dict[str, Any]:
        fn, payload = handle
        rec = self.world.svc.jobs.get(payload["job_id"])
        res = self.world.svc.ledger.reservation(rec.reservation_id)
        self.seen.append(
            {"reservation_state": str(res.state.value), "data_opened": rec.data_opened}
        )
        if self.fail_before:
            raise RuntimeError("node lost before the job started")
        return super().wait(handle, poll=poll, poll_s=poll_s)


def _world(tmp_path: Path, backend: InProcessBackend, **kw: Any):
    w = make_world(tmp_path / "zone", backend, **kw)
    if isinstance(backend, SpyBackend):
        backend.world = w
    return w


def test_denied_job_never_opens_data(tmp_path: Path) -> None:
    backend = SpyBackend()
    w = _world(tmp_path, backend, columns=["age", "readmitted_30d"])
    with pytest.raises(PolicyDenied) as err:
        w.svc.submit(w.researcher, job_spec())
    assert "sex" in str(err.value)  # names the ungranted column
    assert backend.seen == []  # the worker never ran
    assert w.svc.jobs.list() == []
    bal = w.svc.ledger.balance(KEY)
    assert bal.reserved_epsilon == 0 and bal.spent_epsilon == 0
    last = w.svc.audit.list(limit=1)[0]
    assert (last.action, last.outcome) == ("job.submit", "denied")


def test_handle_requires_authorization(tmp_path: Path) -> None:
    from connectors.cohort import cohort_contract
    from connectors.dataset_handle import DatasetHandle

    with pytest.raises(PolicyDenied):
        DatasetHandle(name="cohort", path=tmp_path, contract=cohort_contract(), authorization="")


def test_reserved_before_worker_runs(tmp_path: Path, db_url: str) -> None:
    backend = SpyBackend()
    w = _world(tmp_path, backend, db_url=db_url)
    job = w.svc.submit(w.researcher, job_spec())
    assert backend.seen == [{"reservation_state": "open", "data_opened": False}]
    assert job.state is JobState.SUCCEEDED
    res = w.svc.ledger.reservation(job.reservation_id)
    assert res.state.value == "committed"
    bal = w.svc.ledger.balance(KEY)
    # the commit is the accountant's figure: at most the reserved epsilon, and not zero
    assert 0 < bal.spent_epsilon <= 1.0 + 1e-9
    assert bal.spent_epsilon == pytest.approx(job.result["epsilon"])
    assert bal.reserved_epsilon == 0


def test_failure_before_data_releases(tmp_path: Path, db_url: str) -> None:
    backend = SpyBackend(fail_before=True)
    w = _world(tmp_path, backend, db_url=db_url)
    with pytest.raises(ZoneError):
        w.svc.submit(w.researcher, job_spec())
    (job,) = w.svc.jobs.list()
    assert job.state is JobState.FAILED and not job.data_opened
    assert w.svc.ledger.reservation(job.reservation_id).state.value == "released"
    bal = w.svc.ledger.balance(KEY)
    assert bal.spent_epsilon == 0 and bal.reserved_epsilon == 0


class FailAfterOpenBackend(InProcessBackend):
    """A worker that opens the data and then dies."""

    def submit(self, fn: Any, payload: Any, resources: Any) -> Any:
        def opened_then_failed(p: dict[str, Any]) -> dict[str, Any]:
            from foundation.sql import make_engine
            from sandbox.jobs import JobStore

            JobStore(make_engine(p["db_url"])).mark_data_opened(p["job_id"])
            raise ComputeError("the job's worker died", retryable=True)

        return (opened_then_failed, payload)


def test_failure_after_data_keeps_charge(tmp_path: Path, db_url: str) -> None:
    w = _world(tmp_path, FailAfterOpenBackend(), patients=300, db_url=db_url)
    with pytest.raises(ComputeError):
        w.svc.submit(w.researcher, job_spec())
    (job,) = w.svc.jobs.list()
    assert job.state is JobState.FAILED and job.data_opened
    assert w.svc.ledger.reservation(job.reservation_id).state.value == "committed"
    assert w.svc.ledger.balance(KEY).spent_epsilon == pytest.approx(1.0)


def test_batch_over_public_size_is_refused_before_any_charge(tmp_path: Path) -> None:
    """The demo cohort's counts are public: a batch larger than the training split is a spec
    error found before the ledger reserves anything."""
    w = _world(tmp_path, InProcessBackend(), patients=300)
    with pytest.raises(SpecError, match="training.batch_size"):
        w.svc.submit(w.researcher, job_spec(**{"training.batch_size": 100_000}))
    assert w.svc.jobs.list() == []
    bal = w.svc.ledger.balance(KEY)
    assert bal.spent_epsilon == 0 and bal.reserved_epsilon == 0


def test_release_requires_committed_charge(tmp_path: Path, db_url: str) -> None:
    w = _world(tmp_path, InProcessBackend(), db_url=db_url)
    job = w.svc.submit(w.researcher, job_spec())
    # forge a job whose reservation is still open: the gate must refuse it
    rid = w.svc.ledger.reserve(KEY, 0.1, 1e-7, job_id="job-forged", actor="test")
    forged = w.svc.jobs.create(
        project="readmission",
        dataset="cohort",
        user="rita",
        spec=job.spec,
        spec_hash=job.spec_hash,
        reservation_id=rid,
        job_id="job-forged",
    )
    w.svc.jobs.move(forged.id, JobState.RUNNING)
    w.svc.jobs.move(forged.id, JobState.SUCCEEDED, result=job.result)
    with pytest.raises(IntegrityError):
        w.svc.job_result(w.researcher, "job-forged", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the real one is released
    out = w.svc.job_result(w.researcher, job.id, tmp_path / "ok")
    assert sorted(Path(f).name for f in out["files"]) == [
        "model.safetensors",
        "model_card.json",
        "preprocessing.json",
    ]


ROW_READERS = {
    "pyarrow.parquet",
    "pyarrow.dataset",
    "pyarrow.csv",
    "pyarrow.feather",
    "pyarrow.orc",
}
PANDAS_READERS = {
    "read_csv",
    "read_parquet",
    "read_feather",
    "read_sql",
    "read_table",
    "read_json",
    "read_excel",
}


def _row_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name in ROW_READERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ROW_READERS:
                found.append(node.module)
            if node.module == "pyarrow":
                found += [
                    f"pyarrow.{a.name}" for a in node.names if f"pyarrow.{a.name}" in ROW_READERS
                ]
        elif isinstance(node, ast.Attribute) and node.attr in PANDAS_READERS:
            found.append(node.attr)
    return found


#: the one reader outside connectors/ that is not the zone's: the notebook client reads the
#: files the API returned to the analyst (dummy rows, released synthetic rows), in a temporary
#: folder of theirs; it runs in the kernel, whose account cannot read the zone at all
CLIENT_SIDE_READS = {"sandbox/notebook_frames.py": ["read_parquet"]}


def test_only_connectors_reads_rows() -> None:
    offenders = {}
    for pkg in ("sandbox", "privacy", "policies", "training", "foundation"):
        for f in (ROOT / pkg).rglob("*.py"):
            hits = _row_reads(f)
            if hits:
                offenders[str(f.relative_to(ROOT))] = hits
    # the client-side reader reads exactly what it is allowed to, and nothing else does
    for name, hits in CLIENT_SIDE_READS.items():
        assert offenders.pop(name, None) == hits, name
    assert offenders == {}, f"row reads outside connectors/: {offenders}"
    # and the scan itself works: connectors does read rows
    assert any(_row_reads(f) for f in (ROOT / "connectors").rglob("*.py"))


def test_resources_refused_up_front(tmp_path: Path) -> None:
    w = _world(tmp_path, InProcessBackend(gpus=0))
    with pytest.raises(SpecError, match="resources.gpus"):
        w.svc.submit(w.researcher, job_spec(**{"resources.gpus": 1}))
    assert w.svc.ledger.balance(KEY).reserved_epsilon == 0
    assert w.svc.jobs.list() == []


def test_dp_noise_is_fresh_for_every_run(tmp_path: Path) -> None:
    """Same data, same spec (same seed), same zone: two runs draw different noise, so a free
    run can never share (and cancel) a charged run's noise; the worker refuses a payload
    that carries no per-run secret rather than fall back to a derivable seed."""
    from sandbox.worker import run_dpsgd_job

    w = _world(tmp_path, InProcessBackend(), patients=800)
    spec = job_spec(**{"training.epochs": 1})
    weights = []
    for _ in range(2):
        job = w.svc.submit(w.researcher, spec)
        weights.append((w.svc.zone.job_dir(job.id) / "model.safetensors").read_bytes())
    assert weights[0] != weights[1]
    with pytest.raises(IntegrityError, match="noise secret"):
        run_dpsgd_job({"job_id": "job-x", "zone_root": str(w.svc.zone.root)})


# which of our packages each package may import (docs/architecture.md: sandbox -> training,
# policies -> privacy -> connectors; nothing imports sandbox)
ALLOWED_IMPORTS = {
    "foundation": {"foundation"},
    "connectors": {"connectors", "foundation"},
    "privacy": {"privacy", "connectors", "foundation"},
    "policies": {"policies", "privacy", "connectors", "foundation"},
    "training": {"training", "privacy", "connectors", "foundation"},
    "sandbox": {"sandbox", "training", "policies", "privacy", "connectors", "foundation"},
}


def test_imports_run_one_way() -> None:
    bad = []
    for pkg, allowed in ALLOWED_IMPORTS.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top in ALLOWED_IMPORTS and top not in allowed:
                        bad.append(f"{f.relative_to(ROOT)} imports {n}")
    assert bad == []
