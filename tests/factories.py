"""Factories for the service-level tests: a fresh zone per test, overrides by keyword."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sandbox.backend import JobBackend
from sandbox.jobspec import JobSpec, parse_job_spec
from sandbox.service import Service

FEATURES = ["age", "sex", "diabetes", "hba1c", "creatinine", "prior_admissions", "length_of_stay"]
LABEL = "readmitted_30d"


@dataclass
class ZoneWorld:
    svc: Service
    operator: Any
    steward: Any
    researcher: Any
    steward_token: str
    researcher_token: str
    operator_token: str
    root: Path


def make_world(
    root: Path,
    backend: JobBackend | None = None,
    *,
    patients: int = 2000,
    canaries: Any = None,
    grant_epsilon: float | None = 5.0,
    columns: list[str] | None = None,
    expires_in_days: int = 30,
    db_url: str | None = None,
) -> ZoneWorld:
    svc, op_token = Service.init_zone(root, backend, db_url)
    operator = svc.authenticate(op_token)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, researcher = svc.authenticate(st), svc.authenticate(rt)
    svc.ingest_demo(steward, "cohort", patients, seed=1, canaries=canaries)
    svc.create_project(researcher, "readmission", "readmission risk")
    if grant_epsilon is not None:
        req = svc.request_access(
            researcher,
            "readmission",
            "cohort",
            columns or [*FEATURES, LABEL],
            ["dp-sgd"],
            grant_epsilon,
            1e-5,
        )
        svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=expires_in_days))
    return ZoneWorld(svc, operator, steward, researcher, st, rt, op_token, root)


def job_spec_dict(**overrides: Any) -> dict[str, Any]:
    """The test spec as its TOML table; a dotted key sets one field of a table (made if new)."""
    data: dict[str, Any] = {
        "project": "readmission",
        "dataset": "cohort",
        "label": LABEL,
        "features": list(FEATURES),
        "model": {"kind": "mlp", "hidden": [16]},
        "privacy": {"epsilon": 1.0, "delta": 1e-6, "max_grad_norm": 1.0},
        "training": {"epochs": 2, "batch_size": 128, "lr": 0.5, "seed": 3},
        "resources": {"gpus": 0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if field:
            data[section] = {**data.get(section, {}), field: value}
        else:
            data[key] = value
    return data


def job_spec(**overrides: Any) -> JobSpec:
    return parse_job_spec(job_spec_dict(**overrides))


def auto_spec(*fields: str, **overrides: Any) -> JobSpec:
    """The spec with a logistic model (the searches stay fast) and ``fields`` left out for
    the zone to choose."""
    data = job_spec(model={"kind": "logistic", "hidden": []}, **overrides).to_dict()
    for f in fields:
        section, key = f.split(".")
        del data[section][key]
    return parse_job_spec(data)
