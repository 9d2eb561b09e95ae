"""The attacks of issue "the served zone", run as a researcher's OS account against a
service that runs as another account.

The test (CI runs as root) makes two accounts: ``sz-svc`` runs ``sandbox serve`` over a zone
it alone owns (mode 0700), ``sz-rita`` is the researcher: a shell with plain Python, a URL
and a token. Each attack that worked when the CLI *was* the service must now fail with a
clear error, and nothing in the ledger or the audit log may change because of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from factories import FEATURES, LABEL, make_world
from served import client_cli, let_accounts_run_python, start_server, stop_server

from sandbox.backend import InProcessBackend

pytestmark = [
    # slow: two OS accounts and a served zone started for them (~70 s in all); CI runs it as
    # root after `make test` (make test-slow)
    pytest.mark.slow,
    pytest.mark.ray,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("useradd") is None,
        reason="needs root to create the OS accounts (CI runs as root)",
    ),
]

SERVICE_USER, RESEARCHER_USER = "sz-svc", "sz-rita"


def _account(name: str) -> None:
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


@dataclass
class World:
    base: Path
    root: Path
    url: str
    token: str
    home: Path

    def as_researcher(self, code: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Plain Python as the researcher's account, with no rights of the service's."""
        full = {"PATH": os.environ["PATH"], "HOME": str(self.home), **env}
        return subprocess.run(
            ["runuser", "-u", RESEARCHER_USER, "--", sys.executable, "-c", code],
            env=full,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return client_cli(
            *args,
            server=self.url,
            token=self.token,
            user=RESEARCHER_USER,
            extra_env={"HOME": str(self.home), **env},
        )


def _ledger_and_audit(root: Path) -> tuple[int, int]:
    import sqlite3

    con = sqlite3.connect(root / "state.db")
    try:
        ledger = con.execute("select count(*) from ledger_events").fetchone()[0]
        audit = con.execute("select count(*) from audit_events").fetchone()[0]
    finally:
        con.close()
    return int(ledger), int(audit)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _account(SERVICE_USER)
    _account(RESEARCHER_USER)
    let_accounts_run_python()
    # outside root's private pytest folder, so both accounts can reach their own parts
    base = Path(tempfile.mkdtemp(prefix="sz-boundary-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "zone"
    w = make_world(root, InProcessBackend(), patients=400, grant_epsilon=5.0)
    w.svc.close()
    home = base / "rita-home"
    home.mkdir()
    shutil.chown(home, RESEARCHER_USER)
    subprocess.run(["chown", "-R", f"{SERVICE_USER}:", str(root)], check=True)
    server = start_server(root, user=SERVICE_USER, extra_env={"HOME": str(base)})
    try:
        yield World(base, root, server.url, w.researcher_token, home)
    finally:
        stop_server(server)
        shutil.rmtree(base, ignore_errors=True)


def test_the_zone_folder_is_the_service_accounts_alone(world: World) -> None:
    assert (world.root.stat().st_mode & 0o777) == 0o700
    assert world.root.stat().st_uid != os.geteuid()  # not root's: the service account's


@pytest.mark.parametrize(
    "target",
    ["data/cohort/data.parquet", "secret.key", "audit.key", "state.db"],
)
def test_the_researcher_cannot_read_data_keys_or_the_database(world: World, target: str) -> None:
    path = world.root / target
    proc = world.as_researcher(f"open({str(path)!r}, 'rb').read(1); print('READ')")
    assert proc.returncode != 0 and "READ" not in proc.stdout
    assert "PermissionError" in proc.stderr


def test_the_researcher_cannot_write_the_ledger_users_or_audit(world: World) -> None:
    before = _ledger_and_audit(world.root)
    code = (
        "import sqlite3\n"
        f"con = sqlite3.connect({str(world.root / 'state.db')!r})\n"
        "con.execute(\"insert into users(name, role) values ('mallory', 'steward')\")\n"
        "con.execute('drop trigger if exists ledger_events_no_delete')\n"
        "con.commit(); print('WROTE')\n"
    )
    proc = world.as_researcher(code)
    assert proc.returncode != 0 and "WROTE" not in proc.stdout
    assert _ledger_and_audit(world.root) == before


def test_the_services_ray_folder_is_closed_to_the_researcher(world: World) -> None:
    """Ray's sockets and session files (object store, worker logs) live in its temp folder;
    Ray opens that folder to everyone (0777), so what must hold is its private parent."""
    from foundation.engine_env import RAY_TEMP_RECORD

    record = world.root / RAY_TEMP_RECORD
    parent = Path(record.read_text().strip()) if record.exists() else world.root / "ray"
    assert parent.is_dir(), "the service started Ray somewhere this test does not know"
    st = parent.stat()
    assert st.st_mode & 0o077 == 0 and st.st_uid != os.geteuid()
    proc = world.as_researcher(f"import os; print(os.listdir({str(parent / 'r')!r}))")
    assert proc.returncode != 0 and "PermissionError" in proc.stderr


def test_pyarrow_on_the_parquet_file_is_refused(world: World) -> None:
    code = (
        "import pyarrow.parquet as pq\n"
        f"print(pq.read_table({str(world.root / 'data')!r}).num_rows)\n"
    )
    proc = world.as_researcher(code)
    assert proc.returncode != 0
    assert "Permission" in proc.stderr or "permission" in proc.stderr


def test_a_sitecustomize_on_the_researchers_pythonpath_never_reaches_a_worker(
    world: World,
) -> None:
    evil = world.home / "evil"
    evil.mkdir(exist_ok=True)
    marker = world.home / "reached.txt"
    (evil / "sitecustomize.py").write_text(
        "import sys\n"
        f"with open({str(marker)!r}, 'a') as f:\n"
        "    f.write(' '.join(sys.argv) + '\\n')\n"
    )
    subprocess.run(["chown", "-R", RESEARCHER_USER, str(evil)], check=True)
    os.chmod(world.home, 0o777)  # whoever imports it may write the marker
    spec = world.home / "job.toml"
    feats = ", ".join(f'"{f}"' for f in FEATURES)
    spec.write_text(
        f'project = "readmission"\ndataset = "cohort"\nlabel = "{LABEL}"\n'
        f"features = [{feats}]\n"
        '[model]\nkind = "logistic"\nhidden = []\n'
        "[privacy]\nepsilon = 0.5\ndelta = 1e-6\nmax_grad_norm = 1.0\n"
        "[training]\nepochs = 1\nbatch_size = 64\nlr = 0.5\nseed = 1\n[resources]\ngpus = 0\n"
    )
    shutil.chown(spec, RESEARCHER_USER)
    before = _ledger_and_audit(world.root)
    proc = world.cli("submit", str(spec), "--follow", "--json", PYTHONPATH=str(evil))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert rec["state"] == "succeeded"
    # the client's own process imported it (its shell, its business); nothing of the zone did:
    # every line is the CLI's own command, none a Ray worker's or the service's
    seen = marker.read_text().splitlines() if marker.exists() else []
    assert seen, "the probe did not run in the client either: the test proves nothing"
    assert all(ln.split(" ")[0].endswith("/sandbox") for ln in seen), seen
    assert _ledger_and_audit(world.root)[0] > before[0]  # the job's charge, and no other


def test_killing_the_client_mid_job_leaves_the_job_to_the_service(world: World) -> None:
    spec = world.home / "job.toml"
    env = {"PATH": os.environ["PATH"], "HOME": str(world.home)}
    env.update(SANDBOX_SERVER=world.url, SANDBOX_TOKEN=world.token)
    from cli_runner import SANDBOX

    sub = subprocess.run(
        ["runuser", "-u", RESEARCHER_USER, "--", str(SANDBOX), "submit", str(spec), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sub.returncode == 0, sub.stderr
    job = json.loads(sub.stdout.strip().splitlines()[-1])["id"]
    follower = subprocess.Popen(
        ["runuser", "-u", RESEARCHER_USER, "--", str(SANDBOX), "jobs", "status", job, "--follow"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    follower.kill()
    follower.wait(timeout=30)
    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline:
        out = world.cli("jobs", "status", job, "--json")
        state = json.loads(out.stdout.strip().splitlines()[-1])["state"]
        if state in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    assert state == "succeeded"
