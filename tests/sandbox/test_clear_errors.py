"""Clear errors, never tracebacks, through the installed ``sandbox`` entry point.

* An integer label without a declared domain is a binary 0/1 outcome (``connectors.schema``):
  ``synth dummy`` and ``synth fit --method mst`` both work on it (both crashed with
  OverflowError before). A numeric column synthesis cannot bin (no domain, not a label) is a
  ``SchemaError`` naming ``columns.<name>.min``, and it reaches the user whole from the Ray
  worker: exit 2, one ``error:`` line.
* A job.toml that is not UTF-8 is a ``SpecError`` naming the file and saying to save it as
  UTF-8: exit 2, one ``error:`` line.

The zone is set up in-process through the service (quick); only the calls under test go
through ``.venv/bin/sandbox`` in a subprocess, with ``SANDBOX_ZONE`` and ``SANDBOX_TOKEN``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

SANDBOX = Path(sys.executable).with_name("sandbox")

#: a contract whose label ``outcome`` declares no domain, and a sensitive integer column
#: ``score`` without one either
CONTRACT = """
[columns.pid]
type = "string"
role = "identifier"

[columns.age]
type = "float64"
role = "feature"
min = 0
max = 100

[columns.outcome]
type = "int8"
role = "label"

[columns.score]
type = "int16"
role = "sensitive"
"""

GOOD_JOB = """project = "outcomes"
dataset = "clinic"
label = "outcome"
features = ["age"]
[model]
kind = "logistic"
[privacy]
epsilon = 1.0
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = 1
batch_size = 32
lr = 0.1
seed = 1
"""


@dataclass(frozen=True)
class World:
    root: Path
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from connectors.schema import SchemaContract
    from sandbox.service import Service

    base = tmp_path_factory.mktemp("clear-errors")
    contract_file = base / "contract.toml"
    contract_file.write_text(CONTRACT, encoding="utf-8")
    rng = np.random.default_rng(5)
    src = base / "clinic.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pid", "age", "outcome", "score"])
        for i in range(400):
            w.writerow(
                [f"p{i:04d}", round(float(rng.uniform(20, 90)), 1), int(rng.random() < 0.3), i % 7]
            )

    svc, op_token = Service.init_zone(base / "zone")
    try:
        op = svc.authenticate(op_token)
        _, sam_token = svc.add_user(op, "sam", "steward")
        _, rita_token = svc.add_user(op, "rita", "researcher")
        sam, rita = svc.authenticate(sam_token), svc.authenticate(rita_token)
        svc.ingest_dataset(sam, "clinic", src, SchemaContract.from_toml_file(contract_file))
        svc.create_project(rita, "outcomes", "outcome risk")
        req = svc.request_access(
            rita, "outcomes", "clinic", ["age", "outcome", "score"], ["synthetic"], 10.0, 1e-5
        )
        svc.approve(sam, req.id, expires_at=datetime.now(UTC) + timedelta(days=1))
    finally:
        svc.close()
    return World(base / "zone", {"sam": sam_token, "rita": rita_token})


def sandbox(
    world: World, *args: str, token: str = "rita", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("SANDBOX_TOKEN", "RAY_ADDRESS")}
    full_env.update(SANDBOX_ZONE=str(world.root), SANDBOX_TOKEN=world.tokens[token])
    full_env.update(env or {})
    return subprocess.run(
        [str(SANDBOX), *args],
        cwd=world.root.parent,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr, starting with ``error:``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- (a) an integer label without a declared domain ------------------------------------------


def test_dummy_data_for_a_label_without_domain_is_binary(world: World, tmp_path: Path) -> None:
    out = tmp_path / "dummy.parquet"
    proc = sandbox(world, "synth", "dummy", "clinic", "--rows", "300", "--out", str(out), "--json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["rows"] == 300
    table = pq.read_table(out)
    assert str(table.schema.field("outcome").type) == "int8"
    assert set(table.column("outcome").to_pylist()) == {0, 1}
    assert table.column("score").null_count == 0


@pytest.mark.ray
def test_mst_on_a_label_without_domain_and_a_column_it_cannot_bin(world: World, ray_local) -> None:
    # attach the CLI to the session's Ray instead of starting a second one
    ray_env = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    ok = sandbox(
        world,
        "synth",
        "fit",
        "clinic",
        "--project",
        "outcomes",
        "--method",
        "mst",
        "--epsilon",
        "2",
        "--columns",
        "age,outcome",
        "--label",
        "outcome",
        "--rows",
        "200",
        "--json",
        env=ray_env,
    )
    assert ok.returncode == 0, (ok.stdout, ok.stderr)
    assert "Traceback" not in ok.stderr
    job = json.loads(ok.stdout.strip().splitlines()[-1])
    assert job["state"] == "succeeded", job

    # `score` has no domain and is not a label: synthesis cannot bin it. The SchemaError is
    # raised in the Ray worker and must reach the user as itself.
    bad = sandbox(
        world,
        "synth",
        "fit",
        "clinic",
        "--project",
        "outcomes",
        "--method",
        "mst",
        "--epsilon",
        "2",
        "--columns",
        "age,score",
        "--rows",
        "200",
        env=ray_env,
    )
    line = assert_one_error_line(bad, "columns.score.min", "declare min and max")
    assert "Ray" not in line and "OverflowError" not in line

    from privacy.budget_events import BudgetKey
    from sandbox.service import Service
    from sandbox.zone import Zone

    svc = Service(Zone.open(world.root))
    try:
        bal = svc.ledger.balance(BudgetKey("outcomes", "clinic"))
    finally:
        svc.close()
    assert bal.reserved_epsilon == 0  # the failed job's reservation was released


# --- (b) a job.toml that is not UTF-8 ---------------------------------------------------------


@pytest.mark.parametrize("command", ["submit", "quote"])
def test_job_toml_not_utf8_is_one_clear_line(world: World, tmp_path: Path, command: str) -> None:
    job = tmp_path / "job.toml"
    # what an editor saving in Latin-1 writes for a comment with an accented name
    job.write_bytes(("# owner: Ren\xe9e\n" + GOOD_JOB).encode("latin-1"))
    proc = sandbox(world, command, str(job))
    line = assert_one_error_line(proc, "job.toml", str(job), "UTF-8")
    assert "save the file as UTF-8" in line

    as_json = sandbox(world, command, str(job), "--json")
    assert as_json.returncode == 2, (as_json.stdout, as_json.stderr)
    assert "Traceback" not in as_json.stderr
    obj = json.loads(as_json.stdout)
    assert obj["error"] == "spec_error" and "UTF-8" in obj["message"]


def test_job_toml_with_a_byte_order_mark_is_read() -> None:
    """A UTF-8 file with a BOM (some editors add one) is UTF-8: no error."""
    import tempfile

    from sandbox.jobspec import load_job_spec

    with tempfile.TemporaryDirectory() as d:
        job = Path(d) / "job.toml"
        job.write_bytes(b"\xef\xbb\xbf" + GOOD_JOB.encode("utf-8"))
        assert load_job_spec(job).dataset == "clinic"
