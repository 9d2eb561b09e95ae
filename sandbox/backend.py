"""The job backend contract: how the service hands a job to compute and gets it back.

The service calls, in order: ``check_resources`` (before anything is reserved), ``submit``
(job is QUEUED), then ``wait`` until the worker returns or fails. A backend never touches the
ledger, the policy store or the data: the worker it runs does the data part, the service the
rest. ``InProcessBackend`` runs the worker in the calling thread (unit tests pass it in at
the boundary); ``sandbox.ray_backend.RayBackend`` is the real one (embedded local Ray or a
cluster address).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from foundation.errors import ComputeError, ZoneError

Payload = dict[str, Any]
#: a worker returns its typed result (``sandbox.results``); the backend passes it through
WorkerFn = Callable[[Payload], Any]


@dataclass(frozen=True)
class Resources:
    cpus: float
    gpus: float
    #: the Ray namespace the job's worker is named in: its project's (``run_on_backend``
    #: sets it), so one project's jobs are listed, found and killed apart from another's
    namespace: str | None = None


class JobBackend(ABC):
    #: shown in records and the model card
    name: str = "abstract"
    #: whether ``stop`` can end a running job's worker
    can_stop: bool = False

    @abstractmethod
    def check_resources(self, resources: Resources) -> None:
        """Raise SpecError(resources.*) if the cluster can never run this (e.g. no GPU)."""

    @abstractmethod
    def submit(self, fn: WorkerFn, payload: Payload, resources: Resources) -> Any:
        """Start ``fn(payload)`` on compute; return an opaque handle. Idempotent per payload."""

    @abstractmethod
    def wait(self, handle: Any, *, poll: Callable[[], None], poll_s: float = 0.5) -> Any:
        """Block until the job ends, calling ``poll`` every ``poll_s``.

        Returns the worker's result, or raises a ZoneError: the worker's own ZoneError when it
        raised one (its message is safe by construction), else ComputeError (retryable when
        the worker was killed rather than failing on its own).
        """

    def stop(self, handle: Any) -> bool:
        """Stop a started job's worker (its ``wait`` then raises); False when this backend
        cannot stop one (it runs the work in the caller's thread)."""
        return False

    def shutdown(self) -> None:  # noqa: B027 - optional
        """Release compute held for the process."""


class InProcessBackend(JobBackend):
    """Runs the worker in the caller's thread. For unit tests: no Ray, same contract."""

    name = "in-process"

    def __init__(self, gpus: int = 0) -> None:
        self._gpus = gpus

    def check_resources(self, resources: Resources) -> None:
        from foundation.errors import SpecError

        if resources.gpus > self._gpus:
            raise SpecError(
                "resources.gpus",
                f"asks for {resources.gpus:g} GPU(s) but this backend has {self._gpus}",
                "set gpus = 0",
            )

    def submit(self, fn: WorkerFn, payload: Payload, resources: Resources) -> Any:
        return (fn, payload)

    def wait(self, handle: Any, *, poll: Callable[[], None], poll_s: float = 0.5) -> Any:
        fn, payload = handle
        try:
            return fn(payload)
        except ZoneError:
            raise
        except Exception as exc:  # never surface a raw message: it might quote data
            raise ComputeError(f"the job failed in its worker ({type(exc).__name__})") from None
        finally:
            poll()
