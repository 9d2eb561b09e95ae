"""Least privilege in PostgreSQL: the service's role cannot alter history.

The schema is made by an owner role (``sandbox init --db-url OWNER --service-db-url SERVICE``,
through the installed CLI); the zone then runs as the service role. Connected as that role, a
test tries every way to rewrite the ledger and the audit log (UPDATE, DELETE, TRUNCATE, DROP
TRIGGER, ALTER, a new table) and each fails with PostgreSQL's permission error, while the
zone's own work (users, a job, its charge) goes on as that role.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pg_cluster
import pytest
from cli_runner import last_json, sandbox
from factories import job_spec
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError

from foundation.errors import SpecError
from privacy.budget_events import BudgetKey
from sandbox.backend import InProcessBackend
from sandbox.db_roles import service_grants
from sandbox.service import Service
from sandbox.zone import Zone

REWRITES = [
    "UPDATE ledger_events SET epsilon = 1000",
    "DELETE FROM ledger_events",
    "TRUNCATE ledger_events",
    "UPDATE audit_events SET actor = 'nobody'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
    "DROP TRIGGER ledger_events_append_only ON ledger_events",
    "ALTER TABLE ledger_events DISABLE TRIGGER ALL",
    "ALTER TABLE audit_events DROP COLUMN actor",
    "UPDATE zone_meta SET value = 'another-zone'",
    "CREATE TABLE mallory (x int)",
]


@pytest.fixture
def roles(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """An owner and a service role, and a database the owner owns: their URLs."""
    tag = uuid.uuid4().hex[:8]
    owner, service, db = f"sz_owner_{tag}", f"sz_service_{tag}", f"sz_zone_{tag}"
    pg_cluster.admin_exec(
        pg_admin_url,
        f"CREATE ROLE {owner} LOGIN PASSWORD 'owner-pw'",
        f"CREATE ROLE {service} LOGIN PASSWORD 'service-pw'",
        f"CREATE DATABASE {db} OWNER {owner}",
    )
    base = make_url(pg_admin_url).set(database=db)
    yield (
        base.set(username=owner, password="owner-pw").render_as_string(hide_password=False),
        base.set(username=service, password="service-pw").render_as_string(hide_password=False),
    )
    pg_cluster.admin_exec(
        pg_admin_url,
        f"DROP DATABASE IF EXISTS {db} WITH (FORCE)",
        f"DROP ROLE IF EXISTS {service}",
        f"DROP ROLE IF EXISTS {owner}",
    )


def test_the_service_role_cannot_alter_history(tmp_path: Path, roles: tuple[str, str]) -> None:
    owner_url, service_url = roles
    root = tmp_path / "zone"
    init = sandbox(
        "init", "--db-url", owner_url, "--service-db-url", service_url, "--json", zone=root
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    token = last_json(init)["token"]
    assert "service-pw" not in init.stdout and "owner-pw" not in init.stdout
    # the zone runs as the service role from now on
    zone = Zone.open(root)
    assert make_url(zone.db_url).username == make_url(service_url).username

    # the zone's own work goes on as that role: a user, a dataset, a grant, a job, its charge
    svc = Service(zone, InProcessBackend())
    operator = svc.authenticate(token)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, rita = svc.authenticate(st), svc.authenticate(rt)
    svc.ingest_demo(steward, "cohort", 300, seed=1)
    svc.create_project(rita, "readmission", "readmission risk")
    from datetime import UTC, datetime, timedelta

    from factories import FEATURES, LABEL

    req = svc.request_access(
        rita, "readmission", "cohort", [*FEATURES, LABEL], ["dp-sgd"], 2.0, 1e-5
    )
    svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=3))
    job = svc.submit(rita, job_spec(**{"training.epochs": 1}))
    assert job.state.value == "succeeded"
    spent = svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon
    assert spent > 0
    assert svc.audit_verify(operator).ok
    svc.close()

    engine = create_engine(service_url)
    try:
        for sql in REWRITES:
            with engine.connect() as conn:
                with pytest.raises(ProgrammingError) as err:
                    conn.execute(text(sql))
                    conn.commit()
                assert "permission denied" in str(err.value.orig) or "must be owner" in str(
                    err.value.orig
                ), sql
        with engine.connect() as conn:
            ledger = conn.execute(text("SELECT sum(epsilon) FROM ledger_events")).scalar()
            assert ledger is not None and ledger > 0
    finally:
        engine.dispose()
    svc = Service(Zone.open(root), InProcessBackend())
    assert svc.ledger.balance(BudgetKey("readmission", "cohort")).spent_epsilon == spent
    assert svc.audit_verify(svc.authenticate(token)).ok
    svc.close()


def test_the_grants_are_exactly_the_services_rights() -> None:
    sql = service_grants(["ledger_events", "audit_events", "zone_meta", "jobs"], "sz_service")
    assert 'GRANT SELECT, INSERT ON TABLE "ledger_events" TO "sz_service"' in sql
    assert 'GRANT SELECT, INSERT ON TABLE "audit_events" TO "sz_service"' in sql
    assert 'GRANT SELECT ON TABLE "zone_meta" TO "sz_service"' in sql
    assert 'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE "jobs" TO "sz_service"' in sql
    assert not any("TRUNCATE" in s or "ALL PRIVILEGES" in s for s in sql)


@pytest.mark.parametrize("bad", ["Robert'); DROP TABLE users;--", "", "UPPER", "a" * 70])
def test_a_role_name_that_is_not_a_plain_identifier_is_refused(bad: str) -> None:
    with pytest.raises(SpecError, match="role"):
        service_grants(["jobs"], bad)


def test_least_privilege_on_sqlite_is_refused_naming_the_option(tmp_path: Path) -> None:
    proc = sandbox(
        "init", "--service-db-url", f"sqlite:///{tmp_path / 'x.db'}", "--json",
        zone=tmp_path / "z",
    )  # fmt: skip
    assert proc.returncode == 2
    err = last_json(proc)
    assert err["message"].startswith("--service-db-url:") and "PostgreSQL" in err["message"]
    assert not (tmp_path / "z" / "zone.toml").exists()
