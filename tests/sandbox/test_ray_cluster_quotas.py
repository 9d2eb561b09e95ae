"""A real Ray cluster (``ray start --head`` on loopback, two logical GPUs declared) behind a
served zone: the service submits to it by address, and per-project GPU quotas hold with two
projects competing.

Ray schedules by declared resources, so ``--num-gpus 2`` tests scheduling and quotas without
hardware (the worker sees no CUDA and trains on its CPU). Project ``readmission`` has a quota
of one GPU and submits two one-GPU jobs; project ``second`` (quota one) submits one. The
cluster's two GPUs then run one job of each project at once while readmission's second job
waits in the queue, saying why, and starts when its first ends. At no moment does a project
run more GPUs than its quota.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from factories import FEATURES, LABEL, job_spec, make_world
from served import free_port, served_zone

from sandbox.backend import InProcessBackend

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RAY = Path(sys.executable).parent / "ray"


@pytest.fixture
def cluster() -> Iterator[str]:
    """``ray start --head --block`` in its own process group; its address."""
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="szc-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen(
        [
            str(RAY), "start", "--head", "--block", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=2",
            "--include-dashboard=false", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run(
        [str(RAY), "status", f"--address={address}"], capture_output=True, env=env
    ).returncode:
        assert proc.poll() is None, "ray start --head exited"
        assert time.monotonic() < deadline, "the Ray head did not come up"
        time.sleep(1)
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _named_actors(address: str) -> set[tuple[str, str]]:
    """The cluster's live named actors, (name, namespace), read by a driver of its own."""
    code = (
        "import json, ray\n"
        "from ray.util import list_named_actors\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps(list_named_actors(all_namespaces=True)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return {(a["name"], a["namespace"]) for a in json.loads(out.stdout.strip().splitlines()[-1])}


def test_gpu_quotas_hold_with_two_projects_competing_on_a_ray_cluster(
    tmp_path: Path, cluster: str
) -> None:
    root = tmp_path / "zone"
    w = make_world(root, InProcessBackend(gpus=2), patients=400, grant_epsilon=5.0)
    w.svc.create_project(w.researcher, "second", "a second study")
    req = w.svc.request_access(
        w.researcher, "second", "cohort", [*FEATURES, LABEL], ["dp-sgd"], 5.0, 1e-5
    )
    w.svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    w.svc.set_gpu_quota(w.steward, "readmission", 1)
    w.svc.set_gpu_quota(w.steward, "second", 1)
    w.svc.close()

    def spec(project: str) -> dict:
        s = job_spec(
            project=project,
            model={"kind": "logistic", "hidden": []},
            **{
                "resources.gpus": 1,
                "training.epochs": 120,
                "training.batch_size": 8,
                "privacy.epsilon": 0.2,
            },
        )
        return {"spec": s.to_dict()}

    with served_zone(root, extra_env={"RAY_ADDRESS": cluster}, extra_args=["--jobs", "4"]) as srv:
        http = httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {w.researcher_token}"}, timeout=60
        )
        # the steward sees jobs' timings (researchers never do)
        steward = httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {w.steward_token}"}, timeout=60
        )
        jobs = {}
        for name, project in (("a1", "readmission"), ("a2", "readmission"), ("b1", "second")):
            r = http.post("/v1/jobs", json=spec(project))
            assert r.status_code < 300, r.text
            jobs[name] = r.json()["id"]
            time.sleep(0.5)  # a1 before a2: a2 is the one that waits
        seen_both_projects = seen_a2_waiting = False
        deadline = time.monotonic() + 480
        while True:
            states = {n: steward.get(f"/v1/jobs/{j}").json() for n, j in jobs.items()}
            running = {n for n, s in states.items() if s["state"] == "running"}
            assert not {"a1", "a2"} <= running, "readmission ran 2 GPUs on a quota of 1"
            if {"a1", "b1"} <= running and not seen_both_projects:
                seen_both_projects = True
                # each project's job is an actor named after it in the project's namespace
                named = _named_actors(cluster)
                assert (jobs["a1"], "readmission") in named, named
                assert (jobs["b1"], "second") in named, named
            a2 = states["a2"]
            if a2["state"] == "queued" and "waiting" in (a2.get("progress") or {}):
                seen_a2_waiting = True
                assert "GPU" in a2["progress"]["waiting"]
            if all(s["state"] in ("succeeded", "failed") for s in states.values()):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.3)
        http.close()
        steward.close()
    assert all(s["state"] == "succeeded" for s in states.values()), states
    assert seen_a2_waiting, "readmission's second job never waited for its quota"
    assert seen_both_projects, "the two projects never shared the cluster's two GPUs"
    # the second job started only after the first ended
    a1_end = datetime.fromisoformat(states["a1"]["finished_at"])
    a2_start = datetime.fromisoformat(states["a2"]["started_at"])
    assert a2_start >= a1_end
