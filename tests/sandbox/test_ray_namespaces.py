"""Each project's jobs run in their own Ray namespace (issue 10, item 3).

A job's worker is an actor named after the job in its project's namespace
(``RayBackend.submit``): listed apart per project, not found by name from another project's
namespace, killed by a stop, and gone (its CPUs and GPUs free) once its job ends. On a real
local Ray; through the service, ``run_on_backend`` names the namespace after the job's
project (pinned on a fake backend in ``test_namespace_is_the_jobs_project``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from foundation.errors import ComputeError
from sandbox.backend import InProcessBackend, Resources


def _slow_fn() -> Any:
    # made inside a function: Ray pickles it by value (a worker cannot import tests/)
    def slow(payload: dict) -> str:
        import time as _t

        _t.sleep(float(payload.get("sleep", 3.0)))
        return str(payload["job_id"])

    return slow


def _named(ray: Any) -> set[tuple[str, str]]:
    from ray.util import list_named_actors

    return {(a["name"], a["namespace"]) for a in list_named_actors(all_namespaces=True)}


@pytest.mark.ray
def test_two_projects_jobs_run_in_two_namespaces(tmp_path: Path, ray_local) -> None:
    from sandbox.ray_backend import RayBackend

    ray = ray_local
    backend = RayBackend(tmp_path / "zone")
    a = backend.submit(
        _slow_fn(), {"job_id": "job-ns-a", "sleep": 4}, Resources(cpus=1, gpus=0, namespace="alpha")
    )
    b = backend.submit(
        _slow_fn(), {"job_id": "job-ns-b", "sleep": 4}, Resources(cpus=1, gpus=0, namespace="beta")
    )
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            named = _named(ray)
            if {("job-ns-a", "alpha"), ("job-ns-b", "beta")} <= named:
                break
            time.sleep(0.2)
        assert ("job-ns-a", "alpha") in named and ("job-ns-b", "beta") in named
        # a name is looked up in one namespace: project beta does not find alpha's job
        with pytest.raises(ValueError):
            ray.get_actor("job-ns-a", namespace="beta")
        assert ray.get_actor("job-ns-a", namespace="alpha") is not None
        assert backend.wait(a, poll=lambda: None, poll_s=0.2) == "job-ns-a"
        assert backend.wait(b, poll=lambda: None, poll_s=0.2) == "job-ns-b"
        # an ended job's actor is gone: it no longer holds its CPU
        deadline = time.time() + 15
        while time.time() < deadline and {n for n, _ in _named(ray)} & {"job-ns-a", "job-ns-b"}:
            time.sleep(0.2)
        assert not {n for n, _ in _named(ray)} & {"job-ns-a", "job-ns-b"}
    finally:
        backend.shutdown()


@pytest.mark.ray
def test_stop_kills_the_jobs_actor(tmp_path: Path, ray_local) -> None:
    from sandbox.ray_backend import RayBackend

    backend = RayBackend(tmp_path / "zone")
    handle = backend.submit(
        _slow_fn(), {"job_id": "job-ns-stop", "sleep": 60}, Resources(cpus=1, gpus=0, namespace="p")
    )
    stopped: list[bool] = []
    timer = threading.Timer(2.0, lambda: stopped.append(backend.stop(handle)))
    timer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ComputeError) as err:
            backend.wait(handle, poll=lambda: None, poll_s=0.2)
        # the kill can end the wait before stop() has returned: let the timer finish
        timer.join(30)
        assert err.value.retryable and stopped == [True]
        assert time.perf_counter() - t0 < 30
    finally:
        timer.cancel()
        backend.shutdown()


def test_namespace_is_the_jobs_project(tmp_path: Path) -> None:
    """The mechanisms' one path to the backend places the job in its project's namespace."""
    from sandbox.mechanisms.base import run_on_backend

    seen: list[Resources] = []

    class Recording(InProcessBackend):
        def submit(self, fn: Any, payload: Any, resources: Resources) -> Any:
            seen.append(resources)
            return super().submit(fn, payload, resources)

    class Job:
        id = "job-1"
        project = "readmission"

    class Ctx:
        backend = Recording()
        stop_requests: set[str] = set()

    out = run_on_backend(
        Ctx(),  # type: ignore[arg-type]
        Job(),  # type: ignore[arg-type]
        lambda p: p["x"] + 1,
        {"job_id": "job-1", "x": 41},
        Resources(cpus=1, gpus=0),
        None,
    )
    assert out == 42
    assert seen == [Resources(cpus=1, gpus=0, namespace="readmission")]
