"""The example notebooks (``notebooks/``) run top to bottom in the safe-zone kernel.

One served zone for the module: a small demo cohort, a project with an analyst as member, a
grant for every mechanism, a released DP synthetic job (fitted in-process before serving) and
a finished federated job (two sites, two rounds, on the service's own Ray). Each notebook runs
under nbclient in the installed kernelspec, as the analyst: a URL and a token in its
environment, no zone path. Checks: no cell fails, figures are drawn, the budget moved by
exactly what the queries were quoted and charged, and each notebook prints what it should.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nbformat
import pytest
from served import served_zone

from policies.decisions import Mechanism
from sandbox.api.calls import BY_NAME
from sandbox.backend import InProcessBackend
from sandbox.client import RemoteZone
from sandbox.kernel import KERNEL_NAME, install_kernelspec
from sandbox.service import Service

pytestmark = pytest.mark.ray

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
PATIENTS = 1200
LABEL = "readmitted_30d"
COLUMNS = [
    "hospital", "age", "sex", "diabetes", "hba1c", "prior_admissions", "length_of_stay", LABEL,
]  # fmt: skip
SYNTH_COLUMNS = ["age", "diabetes", "hba1c", "prior_admissions", LABEL]
FED_SPEC = {
    "project": "readmission",
    "dataset": "cohort",
    "label": LABEL,
    "features": ["age", "sex", "diabetes", "hba1c", "prior_admissions"],
    "mode": "federated",
    "model": {"kind": "logistic"},
    "privacy": {"epsilon": 1.0, "delta": 1e-6, "max_grad_norm": 1.0},
    "training": {"batch_size": 64, "lr": 0.5, "seed": 3},
    # one Flower actor on a two-CPU machine (each costs ~5 CPU-s to start): the sites in turn
    "resources": {"gpus": 0, "cpus": 2},
    "federated": {
        "rounds": 2,
        "sites": ["hospital-a", "hospital-b"],
        "min_sites": 2,
        "local_epochs": 1,
        "min_site_rows": 50,
    },
}
NO_QUERIES = "the DP query API (`run_query` in sandbox/api/calls.py) is not there yet"


def _mechanisms() -> list[str]:
    wanted = ["dp-sgd", "federated", "synthetic", "dp-query"]
    return [m for m in wanted if m in {x.value for x in Mechanism}]


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("notebooks")
    root = base / "zone"
    svc, op_token = Service.init_zone(root, InProcessBackend())
    operator = svc.authenticate(op_token)
    _, sam_token = svc.add_user(operator, "sam", "steward")
    _, rita_token = svc.add_user(operator, "rita", "researcher")
    _, ana_token = svc.add_user(operator, "ana", "analyst")
    sam, rita = svc.authenticate(sam_token), svc.authenticate(rita_token)
    svc.ingest_demo(sam, "cohort", PATIENTS, seed=1)
    svc.create_project(rita, "readmission", "30-day readmission risk")
    svc.add_project_member(rita, "readmission", "ana")
    req = svc.request_access(
        rita, "readmission", "cohort", COLUMNS, _mechanisms(), 20.0, 1e-5
    )  # fmt: skip
    svc.approve(sam, req.id, expires_at=datetime.now(UTC) + timedelta(days=5))
    # the DP synthetic job, in-process (no Ray start for it), then released by the steward
    synth = svc.synth_fit(
        rita, "readmission", "cohort", epsilon=1.0, method="mst", rows=400,
        columns=SYNTH_COLUMNS, label=LABEL,
    )  # fmt: skip
    assert str(synth.state) == "succeeded", synth.error
    svc.synth_release(sam, synth.id)
    svc.close()
    kernels = base / "kernels"
    install_kernelspec(prefix=kernels)
    home = base / "home"
    home.mkdir()
    mp = pytest.MonkeyPatch()  # nbclient finds the kernelspec on this process's JUPYTER_PATH
    mp.setenv("JUPYTER_PATH", str(kernels / "share" / "jupyter"))
    try:
        with served_zone(root) as server:
            rita_api = RemoteZone(server.url, rita_token)
            fed = _finished(rita_api, rita_api.submit(None, FED_SPEC)["id"])
            env = {
                "PATH": os.environ["PATH"],
                "HOME": str(home),
                "LANG": os.environ.get("LANG", "C.UTF-8"),
                "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
                "SANDBOX_SERVER": server.url,
                "SANDBOX_TOKEN": ana_token,
                "SANDBOX_PROJECT": "readmission",
                "SAFE_ZONE_SYNTH_JOB": synth.id,
                "SAFE_ZONE_FED_JOB": fed,
            }
            yield {
                "env": env,
                "ana": RemoteZone(server.url, ana_token),
                "rita": rita_api,
                "synth": synth.id,
                "fed": fed,
                "work": base,
            }
    finally:
        mp.undo()


def _finished(api: RemoteZone, job: str, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while True:
        rec = api.job_status(None, job)
        if rec["state"] in ("succeeded", "failed"):
            assert rec["state"] == "succeeded", rec.get("error")
            return job
        assert time.monotonic() < deadline, f"{job} still {rec['state']}"
        time.sleep(1.0)


def run_notebook(name: str, zone: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Execute ``notebooks/NAME`` in the safe-zone kernel; all its stdout and outputs."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    work = zone["work"] / name.removesuffix(".ipynb")
    work.mkdir()
    client = NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=300, resources={"metadata": {"path": str(work)}}
    )
    try:
        client.execute(env=zone["env"])  # raises CellExecutionError, with the cell, on an error
    finally:
        nbformat.write(nb, work / name)  # the executed copy, to look at when a check fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    stdout = "".join(o["text"] for o in outputs if o["output_type"] == "stream")
    return stdout, outputs


def _pngs(outputs: list[dict[str, Any]]) -> int:
    return sum(1 for o in outputs if "image/png" in (o.get("data") or {}))


def _html(outputs: list[dict[str, Any]]) -> str:
    return "".join(str((o.get("data") or {}).get("text/html", "")) for o in outputs)


def _spent(api: RemoteZone) -> float:
    (whole,) = [b for b in api.budget(None, "readmission") if not b["key"]["site"]]
    return float(whole["spent_epsilon"])


def test_the_notebooks_are_saved_without_outputs() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == KERNEL_NAME, path.name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
                compile(cell.source, f"{path.name}:{cell.id}", "exec")  # no magics, valid Python


@pytest.mark.skipif("run_query" not in BY_NAME, reason=NO_QUERIES)
def test_explore_spends_exactly_what_its_queries_were_quoted(zone: dict[str, Any]) -> None:
    ana = zone["ana"]
    before = _spent(ana)
    stdout, outputs = run_notebook("01_explore_cohort.ipynb", zone)
    spent = _spent(ana) - before
    quoted = [float(x) for x in re.findall(r"^quote: \w+ costs epsilon (\S+)", stdout, re.M)]
    charged = [float(x) for x in re.findall(r"^charged epsilon (\S+);", stdout, re.M)]
    # the dry quote, then four charged queries each quoted first; the repeat is free
    assert len(quoted) == 5 and len(charged) == 4, stdout
    assert charged == quoted[1:]
    released = ana.list_queries(None, "readmission")
    assert len(released) == 4
    assert spent == pytest.approx(sum(r["epsilon"] for r in released), rel=1e-9, abs=1e-12)
    assert spent == pytest.approx(sum(charged), rel=1e-5)
    assert "charged: False | same figures: True" in stdout
    assert re.search(r"this notebook spent epsilon (\S+); its queries were charged \1", stdout)
    assert _pngs(outputs) >= 2  # the counts per hospital and the age histogram


def test_develop_runs_on_dummy_then_synthetic_then_trains(zone: dict[str, Any]) -> None:
    stdout, _ = run_notebook("02_develop_on_dummy_then_synthetic.ipynb", zone)
    assert "(1000, " in stdout and "AUROC on dummy rows:" in stdout
    assert f"400 synthetic rows from {zone['synth']} (mst, epsilon" in stdout
    job = re.search(r"^job (job-[0-9a-f]+) \w+; follow it with zone.wait", stdout, re.M)
    assert job, stdout
    rec = zone["rita"].job_status(None, job.group(1))
    assert rec["state"] == "succeeded" and rec["submitted_by"] == "ana"
    assert f"{job.group(1)}: succeeded" in stdout and "DP auroc" in stdout


def test_federated_results_show_each_site(zone: dict[str, Any]) -> None:
    stdout, outputs = run_notebook("03_federated_results.ipynb", zone)
    assert f"{zone['fed']}: succeeded, 2 round(s)" in stdout
    html = _html(outputs)
    assert "hospital-a" in html and "hospital-b" in html
    assert _pngs(outputs) >= 1
    assert "global DP auroc" in stdout
