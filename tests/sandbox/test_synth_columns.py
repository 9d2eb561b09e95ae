"""``synth fit --columns`` on a many-rows-per-person dataset: the identifier bounds each
person's contribution without the researcher naming it (was: "no column has role
identifier")."""

from __future__ import annotations

import csv
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from connectors.schema import SchemaContract
from sandbox.backend import InProcessBackend
from sandbox.jobs import JobState
from sandbox.service import Service

CONTRACT = """
[dataset]
rows_per_person = "many"

[columns.patient]
type = "string"
role = "identifier"

[columns.age]
type = "float64"
role = "feature"
min = 18
max = 105

[columns.readmitted]
type = "int8"
role = "label"
min = 0
max = 1
"""


def test_synth_fit_on_chosen_columns_of_a_visits_table(tmp_path: Path) -> None:
    rng = random.Random(1)
    src = tmp_path / "visits.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "age", "readmitted"])
        for i in range(1500):
            for _ in range(1 + i % 3):  # one to three visits each
                w.writerow([f"p{i}", rng.randint(18, 90), int(rng.random() < 0.2)])
    svc, op = Service.init_zone(tmp_path / "zone", InProcessBackend())
    operator = svc.authenticate(op)
    steward = svc.authenticate(svc.add_user(operator, "sam", "steward")[1])
    rita = svc.authenticate(svc.add_user(operator, "rita", "researcher")[1])
    svc.ingest_dataset(steward, "visits", src, SchemaContract.from_toml_text(CONTRACT))
    svc.create_project(rita, "p", "x")
    req = svc.request_access(rita, "p", "visits", ["age", "readmitted"], ["synthetic"], 2.0, 1e-5)
    svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=2))

    job = svc.synth_fit(
        rita, "p", "visits", epsilon=1.0, method="mst", rows=500, columns=["age", "readmitted"]
    )
    assert job.state is JobState.SUCCEEDED
    assert job.result is not None and job.result["rows"] == 500
    assert {"age", "readmitted"} <= set(job.result["columns"])
