"""Errors raised in a Ray worker reach the caller whole (type, message, attributes, retryable).

Every class of ``foundation.errors`` must survive ``pickle`` (Ray moves a worker's exception
to the driver by pickling it), and ``RayBackend.wait`` must re-raise a worker's ZoneError as
itself while never showing the message of any other exception (it might quote data).
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import cloudpickle
import pytest

import foundation.errors as errors_mod
from foundation.errors import (
    AuthError,
    BackendError,
    BudgetExceeded,
    ComputeError,
    IntegrityError,
    NotFoundError,
    PolicyDenied,
    SchemaError,
    SpecError,
    UserError,
    ZoneError,
)
from sandbox.backend import Resources

#: one instance of every error class, with every attribute its constructor takes set
SAMPLES: list[ZoneError] = [
    ZoneError("the zone failed"),
    UserError("you can fix this"),
    SpecError("training.batch_size", "is larger than the training split", "set it below 300"),
    SpecError("privacy.epsilon", "must be positive"),
    SchemaError("column 'age': data row 4 is not a number", column="age", row=4),
    SchemaError("schema contract: columns: no columns are declared"),
    NotFoundError("dataset 'nope' is not registered"),
    AuthError("unknown or revoked token"),
    PolicyDenied("columns not granted", missing=("age", "sex"), grantor="steward"),
    PolicyDenied("no token given"),
    BudgetExceeded("epsilon 2.5 would exceed the grant's remaining 2"),
    BackendError("the state database is locked", retryable=True),
    ComputeError("the job's worker died (WorkerCrashedError); a retry may help", retryable=True),
    ComputeError("the job failed in its worker (ValueError)"),
    IntegrityError("the ledger and the job table disagree"),
]

ATTRS = ("field", "problem", "fix", "column", "row", "reason", "missing", "grantor", "retryable")


def _same(a: ZoneError, b: ZoneError) -> None:
    assert type(b) is type(a)
    assert str(b) == str(a)
    assert b.args == a.args
    assert b.kind == a.kind
    assert b.retryable is a.retryable
    for name in ATTRS:
        assert getattr(b, name, "<absent>") == getattr(a, name, "<absent>"), name
    assert b.__dict__ == a.__dict__


def test_samples_cover_every_error_class() -> None:
    classes = {
        c
        for _, c in inspect.getmembers(errors_mod, inspect.isclass)
        if issubclass(c, ZoneError) and c.__module__ == errors_mod.__name__
    }
    assert classes == {type(e) for e in SAMPLES}


@pytest.mark.parametrize("err", SAMPLES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_every_error_round_trips_through_pickle(err: ZoneError, dumps) -> None:
    back = pickle.loads(dumps(err))
    _same(err, back)


def test_round_trip_keeps_what_was_set_after_construction() -> None:
    err = SpecError("training.lr", "must be positive", "e.g. lr = 0.1")
    err.add_note("raised while reading job.toml")
    try:
        raise err
    except SpecError as raised:
        back = pickle.loads(pickle.dumps(raised))
    _same(err, back)
    assert back.__notes__ == ["raised while reading job.toml"]
    assert back.__traceback__ is None  # tracebacks never travel


def test_user_errors_are_never_retryable() -> None:
    for err in SAMPLES:
        if isinstance(err, UserError):
            assert err.retryable is False


# --- through a real local Ray -------------------------------------------------------------


def _run(tmp_path: Path, fn) -> object:
    from sandbox.ray_backend import RayBackend

    backend = RayBackend(tmp_path / "zone")
    handle = backend.submit(fn, {"job_id": "job-transport"}, Resources(cpus=1, gpus=0))
    try:
        return backend.wait(handle, poll=lambda: None, poll_s=0.2)
    finally:
        backend.shutdown()  # leaves the shared session Ray running (it did not start it)


@pytest.mark.ray
def test_worker_spec_error_arrives_as_itself(tmp_path: Path, ray_local) -> None:
    expected = SpecError(
        "training.batch_size",
        "is 512 but the training split has 240 rows",
        "set batch_size to at most 240",
    )

    def worker(payload: dict) -> dict:
        from foundation.errors import SpecError

        raise SpecError(
            "training.batch_size",
            "is 512 but the training split has 240 rows",
            "set batch_size to at most 240",
        )

    with pytest.raises(SpecError) as caught:
        _run(tmp_path, worker)
    err = caught.value
    _same(expected, err)
    assert err.retryable is False
    # exactly the message the user would get locally: one line, no Ray wrapping
    assert str(err) == str(expected) and "\n" not in str(err)
    assert "Ray" not in str(err)


@pytest.mark.ray
def test_worker_backend_error_keeps_its_retryable_flag(tmp_path: Path, ray_local) -> None:
    def worker(payload: dict) -> dict:
        from foundation.errors import PolicyDenied

        raise PolicyDenied("column not granted", missing=("ethnicity",), grantor="steward")

    with pytest.raises(PolicyDenied) as caught:
        _run(tmp_path, worker)
    assert caught.value.missing == ("ethnicity",) and caught.value.grantor == "steward"

    def flaky(payload: dict) -> dict:
        from foundation.errors import ComputeError

        raise ComputeError("the data store timed out", retryable=True)

    with pytest.raises(ComputeError) as caught2:
        _run(tmp_path, flaky)
    assert type(caught2.value) is ComputeError
    assert str(caught2.value) == "the data store timed out"
    assert caught2.value.retryable is True


@pytest.mark.ray
def test_other_worker_exception_names_only_its_type(tmp_path: Path, ray_local) -> None:
    def worker(payload: dict) -> dict:
        raise ValueError("secret-value-123")

    with pytest.raises(ComputeError) as caught:
        _run(tmp_path, worker)
    err = caught.value
    assert type(err) is ComputeError
    assert err.retryable is False
    assert "ValueError" in str(err)
    assert "secret-value-123" not in str(err)
    assert "secret-value-123" not in repr(err.args)
    # `raise ... from None` hides Ray's exception (which quotes the message) from tracebacks
    assert err.__suppress_context__


@pytest.mark.ray
def test_unpicklable_worker_exception_names_nothing_of_it(tmp_path: Path, ray_local) -> None:
    def worker(payload: dict) -> dict:
        class Local(Exception):
            def __init__(self, a: str, b: str) -> None:  # pickle cannot rebuild this
                super().__init__(f"{a}{b}")

        raise Local("secret-", "value-456")

    with pytest.raises(ComputeError) as caught:
        _run(tmp_path, worker)
    assert caught.value.retryable is False
    assert "secret-" not in str(caught.value) and "value-456" not in str(caught.value)
