"""The served zone through the installed CLI as a thin client (``SANDBOX_SERVER`` + token).

One ``sandbox serve`` (real uvicorn, the service's own local Ray) for the module, on a zone
set up in-process. Each test runs the CLI in a subprocess with a URL and a token and no zone
path, as a researcher would, and checks exit codes and ``--json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cli_runner import last_json, sandbox
from factories import FEATURES, LABEL, make_world
from served import client_cli, served_zone

from sandbox.api.calls import CALLS
from sandbox.backend import InProcessBackend

pytestmark = pytest.mark.ray


@dataclass
class World:
    root: Path
    url: str
    tokens: dict[str, str]

    def cli(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        return client_cli(*args, server=self.url, token=self.tokens[who])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("served") / "zone"
    w = make_world(root, InProcessBackend(), patients=400, grant_epsilon=5.0)
    _, ana = w.svc.add_user(w.operator, "ana", "analyst")
    w.svc.close()
    tokens = {
        "operator": w.operator_token,
        "sam": w.steward_token,
        "rita": w.researcher_token,
        "ana": ana,
    }
    with served_zone(root) as server:
        yield World(root, server.url, tokens)


def _job_toml(path: Path, epsilon: float = 0.5, epochs: int = 2, batch: int = 64) -> Path:
    feats = ", ".join(f'"{f}"' for f in FEATURES)
    path.write_text(
        f"""project = "readmission"
dataset = "cohort"
label = "{LABEL}"
features = [{feats}]
[model]
kind = "logistic"
hidden = []
[privacy]
epsilon = {epsilon}
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = {epochs}
batch_size = {batch}
lr = 0.5
seed = 7
[resources]
gpus = 0
""",
        encoding="utf-8",
    )
    return path


def test_openapi_is_published_with_every_call(world: World) -> None:
    spec = httpx.get(world.url + "/openapi.json", timeout=10).json()
    paths = set(spec["paths"])
    for call in CALLS:
        assert call.path in paths, call.name


def test_no_token_and_a_wrong_token_are_refused_with_exit_2(world: World) -> None:
    for token in (None, "not-a-token"):
        proc = client_cli("dataset", "list", "--json", server=world.url, token=token)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert last_json(proc)["error"] in ("auth_error", "policy_denied")
        assert "Traceback" not in proc.stderr


def test_an_unreachable_server_is_one_clear_line_exit_3(world: World) -> None:
    proc = client_cli("dataset", "list", server="http://127.0.0.1:9", token="x")
    assert proc.returncode == 3
    assert "cannot reach the zone" in proc.stderr and "Traceback" not in proc.stderr


def test_reads_print_the_same_json_served_and_embedded(world: World) -> None:
    for who, args in [
        ("rita", ("dataset", "show", "cohort", "--json")),
        ("rita", ("project", "show", "readmission", "--json")),
        ("sam", ("access", "grants", "--json")),
        ("operator", ("user", "list", "--json")),
    ]:
        served = world.cli(who, *args)
        embedded = sandbox(*args, zone=world.root, token=world.tokens[who])
        assert served.returncode == 0 == embedded.returncode, (served.stderr, embedded.stderr)
        assert last_json(served) == last_json(embedded), args


def test_tune_runs_in_the_service_and_writes_the_chosen_spec(world: World, tmp_path: Path) -> None:
    """``sandbox tune`` served: the spec's "auto" fields cross the wire as "auto", the search
    runs in the service on free rows, and the client writes the resolved spec."""
    from sandbox.jobspec import load_job_spec

    spec = _job_toml(tmp_path / "job.toml")
    spec.write_text(spec.read_text().replace("lr = 0.5\n", 'lr = "auto"\n'), encoding="utf-8")
    out = tmp_path / "tuned.toml"
    got = world.cli("rita", "tune", str(spec), "--out", str(out), "--json")
    assert got.returncode == 0, got.stderr
    tuning = last_json(got)["tuning"]
    assert tuning["fields"] == ["training.lr"] and tuning["source"] == "dummy"
    tuned = load_job_spec(out)
    assert tuned.auto_fields == () and tuned.training.lr == tuning["chosen"]["lr"]


def test_submit_returns_at_once_then_follow_shows_the_end_and_result_downloads(
    world: World, tmp_path: Path
) -> None:
    spec = _job_toml(tmp_path / "job.toml")
    sub = world.cli("rita", "submit", str(spec), "--json")
    assert sub.returncode == 0, sub.stderr
    queued = last_json(sub)
    assert queued["state"] in ("queued", "running")
    job = queued["id"]
    done = world.cli("rita", "jobs", "status", job, "--follow", "--json")
    assert done.returncode == 0, done.stderr
    final = last_json(done)
    assert final["state"] == "succeeded", final
    out = tmp_path / "release"
    got = world.cli("rita", "jobs", "result", job, "--out", str(out), "--json")
    assert got.returncode == 0, got.stderr
    release = last_json(got)
    assert release["out"] == str(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["model.safetensors", "model_card.json", "preprocessing.json"]
    card = json.loads((out / "model_card.json").read_text())
    assert card["job"] == job
    budget = last_json(world.cli("rita", "budget", "readmission", "--json"))
    spent = sum(b["spent_epsilon"] for b in budget["budgets"])
    assert spent == pytest.approx(final["result"]["epsilon"], rel=1e-9)
    # the analyst is no member: the job is not theirs to see
    denied = world.cli("ana", "jobs", "status", job, "--json")
    assert denied.returncode == 2 and last_json(denied)["error"] == "policy_denied"


def test_a_running_job_is_cancelled_its_worker_stopped_and_its_charge_kept(
    world: World, tmp_path: Path
) -> None:
    def spent_and_reserved() -> tuple[float, float]:
        b = last_json(world.cli("rita", "budget", "readmission", "--json"))["budgets"]
        return (
            sum(x["spent_epsilon"] for x in b),
            sum(x["reserved_epsilon"] for x in b),
        )

    before = spent_and_reserved()
    spec = _job_toml(tmp_path / "long.toml", epsilon=0.25, epochs=1000, batch=8)
    job = last_json(world.cli("rita", "submit", str(spec), "--json"))["id"]
    deadline = time.monotonic() + 120
    while True:  # running, and past its first epoch: its worker has read the rows
        rec = last_json(world.cli("rita", "jobs", "status", job, "--json"))
        if rec["state"] == "running" and (rec.get("progress") or {}).get("epoch", 0) >= 1:
            break
        assert rec["state"] in ("queued", "running"), rec
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.5)
    other = world.cli("sam", "jobs", "cancel", job, "--json")
    assert other.returncode == 2  # only its submitter stops a job
    asked = world.cli("rita", "jobs", "cancel", job, "--json")
    assert asked.returncode == 0, asked.stderr
    done = last_json(world.cli("rita", "jobs", "status", job, "--follow", "--json"))
    assert done["state"] == "failed" and "cancelled" in done["error"], done
    spent, reserved = spent_and_reserved()
    # it read rows: its whole reservation is spent, nothing left held, nothing refunded
    assert spent == pytest.approx(before[0] + 0.25, rel=1e-9)
    assert reserved == pytest.approx(before[1], abs=1e-12)
    again = world.cli("rita", "jobs", "cancel", job, "--json")
    assert again.returncode == 2 and "has ended" in last_json(again)["message"]


def test_the_thin_client_imports_nothing_that_reads_rows_keys_or_the_ledger(
    world: World,
) -> None:
    probe = (
        "import sys\n"
        "from sandbox.cli.main import main\n"
        "code = main(['dataset', 'list', '--json'])\n"
        "bad = ('sandbox.service', 'sandbox.zone', 'privacy.ledger', 'policies.store',\n"
        "       'policies.audit', 'connectors.reader', 'connectors.ingest',\n"
        "       'connectors.governed_file', 'connectors.dataset_handle', 'pyarrow.parquet',\n"
        "       'torch', 'ray', 'sandbox.worker', 'sandbox.server')\n"
        "print('LOADED', [m for m in bad if m in sys.modules], code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    env.update(SANDBOX_SERVER=world.url, SANDBOX_TOKEN=world.tokens["rita"])
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED")][-1]
    assert line == "LOADED [] 0", line
