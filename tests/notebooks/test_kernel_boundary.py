"""The safe zone's kernel reaches data only through ``zone``.

Two halves. The import guard (any account): a real kernel, started by Jupyter's own client
from the installed kernelspec, refuses ``connectors``, ``privacy``, the service, Ray and the
like with an ImportError that says where data is. The OS boundary (root only, as in
``tests/attacks/test_served_boundary.py``): the zone is served by its own account over a
folder only that account may open (0700), the kernel runs as the analyst's account, and a
cell that opens the zone's Parquet, its keys or its database fails with a permission error
while ``zone`` answers through the API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import make_world
from served import let_accounts_run_python, start_server, stop_server

from sandbox.backend import InProcessBackend
from sandbox.kernel import KERNEL_NAME, REFUSAL, install_kernelspec

PROBE = Path(__file__).with_name("kernel_probe.py")
SERVICE_USER, ANALYST_USER = "sz-nb-svc", "sz-nb-ana"
AS_ROOT = os.geteuid() == 0 and shutil.which("runuser") is not None


def run_cells(
    cells: list[str], env: dict[str, str], user: str | None = None
) -> list[dict[str, Any]]:
    """The cells in a fresh safe-zone kernel (as ``user``'s account); each cell's record."""
    argv = [sys.executable, str(PROBE)]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    ask = json.dumps({"kernel": KERNEL_NAME, "cells": cells, "timeout": 60})
    proc = subprocess.run(
        argv, input=ask, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_kernel_refuses_the_modules_that_read_rows_keys_or_the_ledger(
    tmp_path: Path,
) -> None:
    install_kernelspec(prefix=tmp_path)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "JUPYTER_PATH": str(tmp_path / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "SANDBOX_SERVER": "http://127.0.0.1:9",  # nothing listens: no call is made
        "SANDBOX_TOKEN": "not-a-token",
    }
    refused = [
        "import connectors",
        "import connectors.reader",
        "from privacy import ledger",
        "from sandbox import service",
        "import sandbox.worker",
        "from sandbox.cli.main import main",
        "import policies.store",
        "import ray",
        "import torch",
        "import sqlalchemy",
    ]
    allowed = "print(type(zone).__name__, pd.DataFrame({'a': [1]}).shape)"
    out = run_cells([*refused, allowed], env)
    for code, cell in zip(refused, out, strict=False):
        assert cell["status"] == "error", code
        assert cell["ename"] == "ZoneImportRefused", (code, cell)
        assert REFUSAL in cell["evalue"], (code, cell)
    assert out[-1]["status"] == "ok" and out[-1]["stdout"].strip() == "Zone (1, 1)"


# -- the OS boundary: root makes the accounts -----------------------------------------------


def _account(name: str) -> None:
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)


@pytest.fixture(scope="module")
def served() -> Iterator[dict[str, Any]]:
    if not AS_ROOT:
        pytest.skip(
            "the OS half needs root, to run the kernel as an account other than the zone "
            "service's (one account can open its own zone folder: there is no boundary to show)"
        )
    _account(SERVICE_USER)
    _account(ANALYST_USER)
    let_accounts_run_python()
    base = Path(tempfile.mkdtemp(prefix="sz-nb-boundary-", dir="/tmp"))
    base.chmod(0o755)
    root = base / "zone"
    w = make_world(root, InProcessBackend(), patients=300, grant_epsilon=2.0)
    _, ana = w.svc.add_user(w.operator, "ana", "analyst")
    w.svc.add_project_member(w.researcher, "readmission", "ana")
    w.svc.close()
    kernels = base / "kernels"
    install_kernelspec(prefix=kernels)
    home = base / "ana-home"
    home.mkdir()
    shutil.chown(home, ANALYST_USER)
    subprocess.run(["chown", "-R", f"{SERVICE_USER}:", str(root)], check=True)
    server = start_server(root, user=SERVICE_USER, extra_env={"HOME": str(base)})
    try:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "JUPYTER_PATH": str(kernels / "share" / "jupyter"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "SANDBOX_SERVER": server.url,
            "SANDBOX_TOKEN": ana,
            "SANDBOX_PROJECT": "readmission",
        }
        yield {"root": root, "env": env}
    finally:
        stop_server(server)
        shutil.rmtree(base, ignore_errors=True)


# slow: two OS accounts and a served zone (~100 s); CI runs it as root (make test-slow)
@pytest.mark.slow
def test_as_the_analysts_account_the_kernel_cannot_open_the_zones_files(
    served: dict[str, Any],
) -> None:
    root = served["root"]
    assert root.stat().st_mode & 0o777 == 0o700  # `sandbox serve` closed the folder
    opens = [
        f"open({str(root / 'data.key')!r}, 'rb').read(1)",
        f"open({str(root / 'secret.key')!r}, 'rb').read(1)",
        f"open({str(root / 'state.db')!r}, 'rb').read(1)",
        f"pd.read_parquet({str(root / 'data' / 'cohort')!r})",
        f"import os; os.listdir({str(root)!r})",
    ]
    sqlite = (
        f"import sqlite3; sqlite3.connect({str(root / 'state.db')!r})"
        ".execute('select count(*) from users').fetchone()"
    )
    through_zone = "print(zone.whoami()['name'], len(zone.budget()) > 0, len(zone.contract()))"
    out = run_cells([*opens, sqlite, through_zone], served["env"], user=ANALYST_USER)
    for code, cell in zip(opens, out, strict=False):
        assert cell["status"] == "error", code
        assert cell["ename"] == "PermissionError" and "Permission denied" in cell["evalue"], cell
    assert out[len(opens)]["status"] == "error"  # sqlite cannot open what the OS refuses
    assert out[-1]["status"] == "ok", out[-1]
    name, has_budget, columns = out[-1]["stdout"].split()
    assert (name, has_budget) == ("ana", "True") and int(columns) > 5
