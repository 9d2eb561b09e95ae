"""``DatasetHandle``: permission to read one governed dataset, the only way rows are read.

A handle cannot exist without an ``authorization`` (the job or grant id that allowed the
read), and it calls its ``on_open`` callback exactly once, before the first row is read, so
the job runner can record that data was touched. Every read in ``connectors.reader`` and
``connectors.tables`` takes one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from connectors.schema import SchemaContract
from foundation.errors import PolicyDenied, SpecError


class _OpenLatch:
    """Runs ``on_open`` at most once per handle, even with concurrent readers.

    The handle's fields are frozen; this latch only remembers whether the callback has run.
    A callback that raises leaves the latch open, so the read is refused and a retry calls
    it again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False

    def fire(self, callback: Callable[[], None] | None) -> None:
        with self._lock:
            if self._done:
                return
            if callback is not None:
                callback()
            self._done = True

    @property
    def done(self) -> bool:
        return self._done

    # a lock cannot be pickled; a handle sent to another process starts with a fresh lock
    def __getstate__(self) -> dict[str, bool]:
        return {"done": self._done}

    def __setstate__(self, state: dict[str, bool]) -> None:
        self._lock = threading.Lock()
        self._done = bool(state.get("done", False))


@dataclass(frozen=True)
class DatasetHandle:
    """Permission to read one governed dataset, tied to the job or grant that gave it."""

    name: str
    #: the dataset directory written by ingest, or its ``data.parquet``
    path: Path
    contract: SchemaContract
    #: the job or grant id that authorised this read; required
    authorization: str
    #: called exactly once, before the first row is read (the job runner records data access)
    on_open: Callable[[], None] | None = None
    _latch: _OpenLatch = field(init=False, repr=False, compare=False, default_factory=_OpenLatch)

    def __post_init__(self) -> None:
        if not isinstance(self.authorization, str) or not self.authorization.strip():
            raise PolicyDenied(
                f"reading dataset {self.name!r} needs an authorization",
                missing=("authorization (a job or grant id)",),
                grantor="data steward",
            )
        if not isinstance(self.contract, SchemaContract):
            raise SpecError("contract", "must be a SchemaContract", "pass the dataset's contract")
        if self.on_open is not None and not callable(self.on_open):
            raise SpecError("on_open", "must be callable or None", "pass a function")
        object.__setattr__(self, "path", Path(self.path))

    @property
    def opened(self) -> bool:
        """Whether ``on_open`` has run (a row read has started through this handle)."""
        return self._latch.done
