"""``kill -9`` mid-job: of the service, and of the Ray worker running the job.

After either, the job ends in a final state and the budget is neither double-charged nor
refunded after rows were read: a job that opened its data has its reservation committed in
full, one that never started has it released. Real ``sandbox serve`` (uvicorn, its own local
Ray) in a subprocess; the researcher's side is plain HTTP with a token.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from factories import job_spec, make_world
from served import start_server, stop_server

from sandbox.backend import InProcessBackend

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _get(url: str, token: str, path: str) -> Any:
    r = httpx.get(url + path, headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _submit(url: str, token: str, epochs: int) -> str:
    spec = job_spec(**{"training.epochs": epochs, "training.batch_size": 32}).to_dict()
    r = httpx.post(
        url + "/v1/jobs",
        json={"spec": spec},
        headers={"authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _budget(url: str, token: str) -> dict[str, float]:
    rows = _get(url, token, "/v1/projects/readmission/budget")
    (row,) = rows
    return {k: float(row[k]) for k in ("spent_epsilon", "reserved_epsilon", "granted_epsilon")}


def _opened(url: str, token: str, job: str) -> bool:
    rec = _get(url, token, f"/v1/jobs/{job}")
    return bool(rec["state"] == "running" and (rec.get("progress") or {}).get("epoch", 0) >= 1)


def test_service_killed_mid_job_ends_it_charged_once_and_releases_the_queued_one(
    tmp_path: Path,
) -> None:
    root = tmp_path / "zone"
    w = make_world(root, InProcessBackend(), patients=1500, grant_epsilon=5.0)
    w.svc.close()
    token = w.researcher_token
    server = start_server(root, extra_args=("--jobs", "1"))
    try:
        running = _submit(server.url, token, epochs=200)
        queued = _submit(server.url, token, epochs=1)  # one job at a time: this one waits
        _wait(lambda: _opened(server.url, token, running), 120, "the first job to read rows")
        before = _budget(server.url, token)
        assert before["reserved_epsilon"] == pytest.approx(2.0)  # two jobs of 1.0 reserved
        server.kill9()
    finally:
        stop_server(server)
    server = start_server(root)
    try:
        first = _get(server.url, token, f"/v1/jobs/{running}")
        second = _get(server.url, token, f"/v1/jobs/{queued}")
        assert first["state"] == "failed" and "service stopped" in first["error"]
        assert second["state"] == "failed"
        after = _budget(server.url, token)
        # the job that read rows is charged its whole reservation, once; the queued one freed
        assert after["spent_epsilon"] == pytest.approx(1.0)
        assert after["reserved_epsilon"] == pytest.approx(0.0)
        # a second restart changes nothing (no double charge)
    finally:
        stop_server(server)
    server = start_server(root)
    try:
        assert _budget(server.url, token) == after
    finally:
        stop_server(server)


def test_ray_worker_killed_mid_job_fails_it_and_commits_its_reservation(tmp_path: Path) -> None:
    root = tmp_path / "zone"
    w = make_world(root, InProcessBackend(), patients=1500, grant_epsilon=5.0)
    w.svc.close()
    token = w.researcher_token
    server = start_server(root)
    try:
        job = _submit(server.url, token, epochs=200)
        _wait(lambda: _opened(server.url, token, job), 120, "the job to read rows")
        # Ray names the worker's process after the task, which the backend names by job id
        pids = _wait(
            lambda: subprocess.run(
                ["pgrep", "-f", f"ray::{job}"], capture_output=True, text=True
            ).stdout.split(),
            30,
            "the job's worker process",
        )
        subprocess.run(["kill", "-9", *pids], check=True)
        rec = _wait(
            lambda: (r := _get(server.url, token, f"/v1/jobs/{job}"))["state"] == "failed" and r,
            120,
            "the job to fail",
        )
        assert rec["result"] is None
        after = _budget(server.url, token)
        assert after["spent_epsilon"] == pytest.approx(1.0)
        assert after["reserved_epsilon"] == pytest.approx(0.0)
    finally:
        stop_server(server)
