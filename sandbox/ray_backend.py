"""The only module that imports Ray. Maps Ray's statuses and errors to ours.

Embedded default: a local Ray started by this process (``address="local"``, loopback only,
its temp dir private to the zone: ``foundation.engine_env.ray_temp_dir``). Ray's processes
inherit the environment of the process that starts them, so before it starts Ray this
process cleans its own (``foundation.engine_env.sanitise_environ``: no ``PYTHONPATH`` but the
product's import roots, no ``PYTHONSTARTUP``/``PYTHONHOME``/``LD_PRELOAD``/..., no user
site-packages): a ``sitecustomize.py`` the caller's shell put on its path never runs in a
worker. In served mode the service is the only process that starts Ray.

The cluster is the service's choice alone: ``address`` comes from the service's own
settings (the constructor argument); this module never reads ``RAY_ADDRESS``, and a local
start passes ``address="local"`` so Ray does not read it either.

Errors: a worker's own ``ZoneError`` reaches the caller as itself (same type, one-line message
and ``retryable``; see ``foundation.errors`` on pickling). Any other exception in a worker
becomes ``ComputeError(retryable=False)`` naming only its type, never its message (which may
quote data). A worker that died (crash, lost node, cancellation) is a retryable
``ComputeError``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundation.engine_env import configure_engine_env, ray_temp_dir, sanitise_environ
from foundation.errors import ComputeError, SpecError, ZoneError
from sandbox.backend import JobBackend, Payload, Resources, WorkerFn

#: how deep a chain of tasks calling tasks is unwrapped (a guard, not a limit anyone meets)
_MAX_NESTING = 32


def _from_task_error(exc: BaseException) -> ZoneError:
    """What the caller sees for a task that raised: our own error as itself, else a
    ``ComputeError`` naming only the exception's type (its message may quote data)."""
    from ray.exceptions import RayTaskError

    cause: BaseException | None = exc
    # a task that called another task fails with one RayTaskError per level
    for _ in range(_MAX_NESTING):
        if not isinstance(cause, RayTaskError):
            break
        cause = getattr(cause, "cause", None)
    if isinstance(cause, ZoneError) and not isinstance(cause, RayTaskError):
        # the error as raised in the worker (a ZoneError pickles whole: same type, message,
        # attributes and retryable flag), without the worker's traceback
        return cause.with_traceback(None)
    name = type(cause).__name__ if cause is not None else "unknown"
    return ComputeError(f"the job failed in its worker ({name})", retryable=False)


class _JobHost:
    """The actor one job's worker function runs in (``RayBackend.submit``)."""

    def run(self, fn: WorkerFn, payload: Payload) -> Any:
        return fn(payload)


@dataclass(frozen=True)
class _Running:
    """A started job: its actor (killed to stop it) and the reference to its result."""

    actor: Any
    ref: Any


class RayBackend(JobBackend):
    name = "ray"
    can_stop = True

    def __init__(
        self, zone_root: Path, address: str | None = None, num_cpus: int | None = None
    ) -> None:
        self._zone_root = zone_root
        self._address = address
        self._num_cpus = num_cpus
        self._started = False
        self._owns_ray = False
        # served mode starts jobs from several threads: Ray is started once, by one of them
        self._lock = threading.Lock()

    def _ensure(self) -> Any:
        import ray

        if self._started:
            return ray
        with self._lock:
            if self._started:
                return ray
            configure_engine_env(self._zone_root)
            if not ray.is_initialized():
                kwargs: dict[str, Any] = {
                    "ignore_reinit_error": True,
                    # worker output may quote data: it never reaches the user's terminal
                    "log_to_driver": False,
                    "logging_level": "ERROR",
                }
                if self._address:
                    kwargs["address"] = self._address
                else:
                    tmp = ray_temp_dir(self._zone_root)
                    # the raylet, and every worker it spawns, inherits this environment
                    sanitise_environ()
                    os.environ["RAY_TMPDIR"] = str(tmp)
                    kwargs.update(
                        address="local",
                        include_dashboard=False,
                        _temp_dir=str(tmp),
                        num_cpus=self._num_cpus,
                    )
                try:
                    self._init(ray, kwargs)
                    self._owns_ray = True
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    raise ComputeError(
                        f"cannot start or reach Ray ({type(exc).__name__}); check --ray-address",
                        retryable=True,
                    ) from None
            self._started = True
        return ray

    @staticmethod
    def _init(ray: Any, kwargs: dict[str, Any]) -> None:
        """``ray.init``, once more when a local start's raylet missed Ray's fixed 30 s (two
        busy cores can make it); any other failure is the caller's."""
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this one
            if kwargs.get("address") != "local" or "timed out during startup" not in str(exc):
                raise
            ray.shutdown()
            ray.init(**kwargs)

    def warm_up(self) -> float:
        """Start Ray now (seconds taken), so the first submit pays only its own cost."""
        t0 = time.perf_counter()
        self._ensure()
        return time.perf_counter() - t0

    def check_resources(self, resources: Resources) -> None:
        ray = self._ensure()
        # A task asking for GPUs the cluster lacks stays pending forever: refuse up front.
        have = ray.cluster_resources()
        gpus = float(have.get("GPU", 0))
        if resources.gpus > gpus:
            raise SpecError(
                "resources.gpus",
                f"asks for {resources.gpus:g} GPU(s) but the zone's Ray cluster has {gpus:g}",
                "set gpus = 0, or submit to a cluster with GPU nodes (--ray-address)",
            )
        cpus = float(have.get("CPU", 0))
        if resources.cpus > cpus:
            raise SpecError(
                "resources.cpus",
                f"asks for {resources.cpus:g} CPUs but the cluster has {cpus:g}",
                f"set cpus <= {cpus:g}",
            )

    def submit(self, fn: WorkerFn, payload: Payload, resources: Resources) -> Any:
        ray = self._ensure()
        job_id = str(payload.get("job_id", "job"))
        # The job's worker is an actor named after the job in its project's namespace (tasks
        # have no namespace): `ray list actors` and `ray.util.list_named_actors` show each
        # project's jobs apart. Its class carries the job id too, so the worker process's
        # title is ``ray::<job id>`` (an operator finds it with pgrep).
        host = type(job_id, (_JobHost,), {"__module__": __name__})
        options: dict[str, Any] = {
            "num_cpus": resources.cpus,
            "num_gpus": resources.gpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            "name": job_id,
        }
        if resources.namespace:
            options["namespace"] = resources.namespace
        actor = ray.remote(host).options(**options).remote()
        return _Running(actor=actor, ref=actor.run.options(name=job_id).remote(fn, payload))

    def wait(self, handle: Any, *, poll: Callable[[], None], poll_s: float = 0.5) -> Any:
        ray = self._ensure()
        running: _Running = handle
        try:
            return self._result(ray, running, poll, poll_s)
        finally:
            # the actor holds its CPUs and GPUs until it ends: end it with its job
            ray.kill(running.actor, no_restart=True)

    def _result(self, ray: Any, running: _Running, poll: Callable[[], None], poll_s: float) -> Any:
        from ray import exceptions as rex

        while True:
            ready, _ = ray.wait([running.ref], timeout=poll_s)
            poll()
            if ready:
                break
        try:
            return ray.get(running.ref)
        except rex.RayTaskError as exc:
            raise _from_task_error(exc) from None
        except rex.UnserializableException:
            # the worker raised something the driver cannot unpickle: its text (which may
            # quote data) is never shown, and the same code would fail the same way again
            raise ComputeError(
                "the job failed in its worker (an error that could not be transported)",
                retryable=False,
            ) from None
        except (
            rex.WorkerCrashedError,
            rex.NodeDiedError,
            rex.ActorDiedError,
            rex.TaskCancelledError,
        ) as exc:
            raise ComputeError(
                f"the job's worker died ({type(exc).__name__}); a retry may help", retryable=True
            ) from None
        except rex.RayError as exc:
            raise ComputeError(f"Ray failed ({type(exc).__name__})", retryable=True) from None

    def stop(self, handle: Any) -> bool:
        ray = self._ensure()
        # the worker process is killed (a DP-SGD step does not check for a cancel)
        ray.kill(handle.actor, no_restart=True)
        return True

    def shutdown(self) -> None:
        # only stop a Ray this backend started (a test session or the operator may share one)
        if self._owns_ray:
            import ray

            ray.shutdown()
        self._started = False
        self._owns_ray = False
