"""``sandbox kernel install`` and ``sandbox notebook`` through the installed CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cli_runner import SANDBOX, last_json
from served import free_port

AS_ROOT = os.geteuid() == 0


def _env(**extra: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SANDBOX), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_kernel_install_writes_the_kernelspec_under_the_prefix(tmp_path: Path) -> None:
    proc = _run("kernel", "install", "--prefix", str(tmp_path), "--json", env=_env())
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc)
    assert out["name"] == "safe-zone" and out["display_name"] == "Safe zone (Python)"
    spec = json.loads((Path(out["path"]) / "kernel.json").read_text())
    assert spec["argv"][1:3] == ["-m", "sandbox.kernel"]
    both = _run("kernel", "install", "--user", "--prefix", str(tmp_path), env=_env())
    assert both.returncode == 2 and "--prefix: cannot be given with --user" in both.stderr


def test_the_notebook_refuses_to_start_without_a_zone_url_or_a_token() -> None:
    proc = _run("notebook", "--no-browser", env=_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "SANDBOX_SERVER: is not set" in proc.stderr and "export SANDBOX_SERVER=" in proc.stderr
    proc = _run("notebook", "--no-browser", env=_env(SANDBOX_SERVER="http://127.0.0.1:9"))
    assert proc.returncode == 2 and "SANDBOX_TOKEN: is not set" in proc.stderr
    remote = _env(SANDBOX_SERVER="http://10.1.2.3:8750", SANDBOX_TOKEN="t")
    proc = _run("notebook", "--no-browser", env=remote)
    assert proc.returncode == 2 and "plain http to another machine" in proc.stderr
    if AS_ROOT:
        local = _env(SANDBOX_SERVER="http://127.0.0.1:9", SANDBOX_TOKEN="t")
        proc = _run("notebook", "--no-browser", env=local)
        assert proc.returncode == 2 and "--allow-root" in proc.stderr


def test_the_lab_offers_only_the_safe_zone_kernel_behind_a_fresh_token(tmp_path: Path) -> None:
    port = free_port()
    env = _env(SANDBOX_SERVER="http://127.0.0.1:9", SANDBOX_TOKEN="analyst-token")
    argv = [str(SANDBOX), "notebook", "--no-browser", "--port", str(port)]
    argv += ["--notebook-dir", str(tmp_path), *(["--allow-root"] if AS_ROOT else [])]
    log = tmp_path / "lab.log"
    with open(log, "wb") as sink:
        lab = subprocess.Popen(argv, env=env, stdout=sink, stderr=sink, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        token = _wait_for_lab(base, lab, log)
        # the token in a header: Jupyter's error log would echo a query string
        api = httpx.Client(base_url=base, headers={"Authorization": f"token {token}"}, timeout=30)
        specs = api.get("/api/kernelspecs").json()
        assert specs["default"] == "safe-zone" and set(specs["kernelspecs"]) == {"safe-zone"}
        shown = specs["kernelspecs"]["safe-zone"]["spec"]
        assert shown["display_name"] == "Safe zone (Python)"
        assert shown["argv"][1:3] == ["-m", "sandbox.kernel"] and not shown.get("env")
        # the native kernel is not started by name either (the allow-list alone would list
        # it away but start it), no terminal opens, nothing answers without the token
        assert api.post("/api/kernels", json={"name": "python3"}).status_code >= 400
        started = api.post("/api/kernels", json={"name": "safe-zone"})
        assert started.status_code == 201 and started.json()["name"] == "safe-zone"
        assert api.delete(f"/api/kernels/{started.json()['id']}").status_code == 204
        assert api.get("/api/terminals").status_code == 404
        assert httpx.get(f"{base}/api/kernelspecs", timeout=10).status_code == 403
        # the token is printed once, by us: Jupyter's own log elides it
        assert log.read_text().count(token) == 1
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
            lab.wait(timeout=30)


def _wait_for_lab(base: str, lab: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 90
    token = None
    while time.monotonic() < deadline:
        if lab.poll() is not None:
            pytest.fail(f"sandbox notebook exited {lab.returncode}: {log.read_text()[-2000:]}")
        if token is None:
            found = re.search(r"/lab\?token=(\S+)", log.read_text())
            token = found.group(1) if found else None
        if token is not None:
            try:
                auth = {"Authorization": f"token {token}"}
                got = httpx.get(f"{base}/api/status", headers=auth, timeout=2)
                if got.status_code == 200:
                    return token
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    pytest.fail(f"the lab did not come up: {log.read_text()[-2000:]}")
