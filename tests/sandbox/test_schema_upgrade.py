"""A zone made by an older version upgrades in place (Alembic), on SQLite and PostgreSQL.

``tests/fixtures/zone_v1.tar.gz`` is a whole zone made by the served-zone version (issue 9,
before migrations existed): its database has no ``alembic_version`` and none of the tables
added since. It is refused until ``sandbox upgrade`` runs; afterwards its history (grant,
ledger, audit chain) is whole and the zone works: a job on its old dataset is charged, a
steward sets a GPU quota.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from cli_runner import last_json, sandbox
from factories import job_spec
from sqlalchemy import create_engine, inspect, text

from foundation.errors import SpecError
from foundation.sql import make_engine
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.schema_upgrade import script_head
from sandbox.schema_version import BASELINE, HEAD, current
from sandbox.service import Service
from sandbox.zone import Zone

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "zone_v1.tar.gz"
KEY = BudgetKey("readmission", "cohort")
#: the tables the migrations after the baseline add
ADDED_SINCE_V1 = (
    "gpu_quotas",
    "user_logins",
    "dataset_deletions",
    "query_releases",
    "dataset_versions",
)
#: columns later revisions added to the first revision's tables (table, column)
COLUMNS_SINCE_V1 = (
    ("datasets", "version"),
    ("access_requests", "dataset_version"),
    ("grants", "dataset_version"),
    ("jobs", "dataset_version"),
)


@pytest.fixture
def old_zone(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "zone_v1"
    tokens = json.loads((root / "tokens.json").read_text())
    return root, tokens


def test_an_old_zone_is_refused_until_upgraded_then_works(
    old_zone: tuple[Path, dict[str, str]],
) -> None:
    root, tokens = old_zone
    engine = make_engine(f"sqlite:///{root / 'state.db'}")
    assert current(engine) == BASELINE
    engine.dispose()

    refused = sandbox("dataset", "list", "--json", zone=root, token=tokens["rita"])
    assert refused.returncode == 2
    err = last_json(refused)
    assert "sandbox upgrade" in err["message"] and BASELINE in err["message"]

    up = sandbox("upgrade", "--json", zone=root)
    assert up.returncode == 0, up.stderr
    assert last_json(up)["from"] == BASELINE and last_json(up)["to"] == HEAD
    again = sandbox("upgrade", "--json", zone=root)
    assert last_json(again)["from"] == HEAD  # a second upgrade changes nothing

    svc = Service(Zone.open(root), InProcessBackend())
    rita, sam, op = (svc.authenticate(tokens[n]) for n in ("rita", "sam", "operator"))
    assert svc.ledger.balance(KEY).granted_epsilon == pytest.approx(2.0)  # history kept
    spec = job_spec(
        features=["age", "sex"], model={"kind": "logistic", "hidden": []},
        **{"training.epochs": 1, "training.batch_size": 32, "privacy.epsilon": 0.5},
    )  # fmt: skip
    job = svc.submit(rita, spec)
    assert job.state.value == "succeeded"
    assert svc.ledger.balance(KEY).spent_epsilon > 0
    svc.set_gpu_quota(sam, "readmission", 1)  # a table the upgrade added
    verified = svc.audit_verify(op)
    assert verified.ok, verified
    assert any(e.action == "zone.upgrade" for e in svc.audit.list(limit=500))
    svc.close()


def test_a_new_zone_is_made_at_the_newest_revision(tmp_path: Path) -> None:
    svc, _ = Service.init_zone(tmp_path / "zone", InProcessBackend())
    assert current(svc.engine) == HEAD
    svc.close()


def test_an_old_postgresql_zone_upgrades_in_place(tmp_path: Path, pg_url: str) -> None:
    svc, token = Service.init_zone(tmp_path / "zone", InProcessBackend(), pg_url)
    svc.close()
    # the database as the issue-9 version left it: no version table, none of the newer tables
    raw = create_engine(pg_url)
    with raw.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        for table in ADDED_SINCE_V1:
            conn.execute(text(f"DROP TABLE {table}"))
        for table, column in COLUMNS_SINCE_V1:
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    raw.dispose()
    with pytest.raises(SpecError, match="sandbox upgrade"):
        Service(Zone.open(tmp_path / "zone"), InProcessBackend())
    up = sandbox("upgrade", "--json", zone=tmp_path / "zone")
    assert up.returncode == 0, up.stderr
    svc = Service(Zone.open(tmp_path / "zone"), InProcessBackend())
    assert set(ADDED_SINCE_V1) <= set(inspect(svc.engine).get_table_names())
    assert svc.audit_verify(svc.authenticate(token)).ok
    svc.close()


def test_the_fixture_is_what_it_says(old_zone: tuple[Path, dict[str, str]]) -> None:
    root, _ = old_zone
    engine = make_engine(f"sqlite:///{root / 'state.db'}")
    names = set(inspect(engine).get_table_names())
    engine.dispose()
    assert "alembic_version" not in names and not names & set(ADDED_SINCE_V1)
    assert {"users", "ledger_events", "audit_events", "jobs", "zone_meta"} <= names
    shutil.rmtree(root)


def test_the_revision_every_open_checks_is_the_newest_migration() -> None:
    # the check runs without Alembic (sandbox.schema_version): its HEAD must follow the
    # migrations, or every zone made by `sandbox init` would be refused (or pass unchecked)
    assert script_head() == HEAD
