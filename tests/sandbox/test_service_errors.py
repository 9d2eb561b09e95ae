"""Bad input gets one clear error naming the field and the fix, and changes nothing."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from factories import FEATURES, LABEL, job_spec, make_world

from foundation.errors import (
    AuthError,
    BudgetExceeded,
    PolicyDenied,
    SchemaError,
    SpecError,
    UserError,
)
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.jobspec import parse_job_toml
from sandbox.service import Service

KEY = BudgetKey("readmission", "cohort")


def _state(w: Any) -> tuple:
    """Everything a refused call must leave unchanged (the audit log grows by one line)."""
    bal = w.svc.ledger.balance(KEY)
    return (
        len(w.svc.jobs.list()),
        bal.granted_epsilon,
        bal.reserved_epsilon,
        bal.spent_epsilon,
        len(w.svc.store.list_requests()),
        len(w.svc.store.list_datasets()),
    )


@pytest.fixture
def world(tmp_path: Path):
    w = make_world(tmp_path / "zone", InProcessBackend())
    yield w
    w.svc.close()


def _refused(
    w: Any, exc_type: type[UserError], fn, *args, match: str | None = None, **kw
) -> UserError:
    before = _state(w)
    n_audit = w.svc.audit.verify().checked
    with pytest.raises(exc_type, match=match) as err:
        fn(*args, **kw)
    assert _state(w) == before
    after = w.svc.audit.verify()
    assert after.ok and after.checked == n_audit + 1  # the refusal is on the record
    assert "\n" not in str(err.value)
    return err.value


def test_unknown_column(world) -> None:
    spec = job_spec(features=[*FEATURES, "blood_type"])
    e = _refused(world, SpecError, world.svc.submit, world.researcher, spec, match="features")
    assert "blood_type" in str(e) and "known columns" in str(e)


def test_label_must_be_a_label(world) -> None:
    _refused(
        world,
        SpecError,
        world.svc.submit,
        world.researcher,
        job_spec(label="age", features=["sex"]),
        match="label",
    )


def test_expired_grant(tmp_path: Path) -> None:
    w = make_world(tmp_path / "z", InProcessBackend())
    later = datetime.now(UTC) + timedelta(days=60)
    w.svc.clock = lambda: later
    e = _refused(w, PolicyDenied, w.svc.submit, w.researcher, job_spec(), match="expire")
    assert "steward" in str(e)


def test_over_budget(world) -> None:
    e = _refused(
        world,
        BudgetExceeded,
        world.svc.submit,
        world.researcher,
        job_spec(**{"privacy.epsilon": 6.0}),
    )
    assert "epsilon" in str(e)


def test_wrong_role(world) -> None:
    e = _refused(world, PolicyDenied, world.svc.submit, world.steward, job_spec())
    assert "job.submit" in str(e)
    _refused(world, PolicyDenied, world.svc.add_user, world.researcher, "mallory", "steward")
    _refused(world, PolicyDenied, world.svc.approve, world.researcher, "req-x")


def test_unknown_and_revoked_token(world) -> None:
    with pytest.raises(AuthError):
        world.svc.authenticate("sz_not-a-token")
    world.svc.revoke_user(world.operator, "rita")
    with pytest.raises(AuthError):
        world.svc.authenticate(world.researcher_token)
    with pytest.raises(PolicyDenied, match="token"):
        world.svc.authenticate(None)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("project = ", "job.toml"),
        (
            'project = "p"\ndataset = "d"\nlabel = "y"\nfeatures = ["a"]\n[model]\nkind = "mlp"\nhidden = [4]\n'
            "[privacy]\nepsilon = 0\ndelta = 1e-6\n[training]\nepochs = 1\nbatch_size = 8\nlr = 0.1\n",
            "privacy.epsilon",
        ),
        (
            'project = "p"\ndataset = "d"\nlabel = "y"\nfeatures = ["a"]\n[model]\nkind = "svm"\n',
            "model.kind",
        ),
        ('project = "p"\ndataset = "d"\nlabel = "y"\nfeatures = ["a"]\nepochs = 3\n', "epochs"),
    ],
)
def test_bad_spec_names_field(text: str, field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_job_toml(text)
    assert err.value.field == field


def test_csv_breaking_schema_names_column_and_row(world, tmp_path: Path) -> None:
    from connectors.cohort import Canaries, cohort_contract, write_cohort

    canaries = Canaries.make(5)
    src = tmp_path / "bad.csv"
    write_cohort(src, 50, seed=2, canaries=canaries, format="csv")
    with src.open(newline="") as fh:
        rows = list(csv.reader(fh))
    rows[7][rows[0].index("age")] = "not-an-age"  # data row 7 (the header is line 0)
    with src.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    e = _refused(
        world, SchemaError, world.svc.ingest_dataset, world.steward, "bad", src, cohort_contract()
    )
    msg = str(e)
    assert "age" in msg and "7" in msg and "not-an-age" not in msg
    assert not (world.svc.zone.dataset_dir("bad")).exists() or not any(
        world.svc.zone.dataset_dir("bad").iterdir()
    )


def test_request_for_unknown_column(world) -> None:
    _refused(
        world,
        UserError,
        world.svc.request_access,
        world.researcher,
        "readmission",
        "cohort",
        ["age", "shoe_size", LABEL],
        ["dp-sgd"],
        1.0,
        1e-6,
    )


def test_init_twice_refused(tmp_path: Path) -> None:
    Service.init_zone(tmp_path / "z")[0].close()
    with pytest.raises(SpecError, match="--zone"):
        Service.init_zone(tmp_path / "z")
