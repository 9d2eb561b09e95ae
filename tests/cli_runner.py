"""The installed ``sandbox`` command in a subprocess, as an attacker (or a script) meets it.

Shared by ``tests/attacks`` and ``tests/sandbox`` (``tests/`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SANDBOX = Path(sys.executable).parent / "sandbox"
if not SANDBOX.exists():  # pragma: no cover - the venv installs it (`make install`)
    SANDBOX = Path(shutil.which("sandbox") or SANDBOX)


def sandbox(
    *args: str, zone: Path, token: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run one command with the zone and token in the environment, nothing else of ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SANDBOX_TOKEN", "SANDBOX_ZONE", "RAY_ADDRESS")
    }
    env["SANDBOX_ZONE"] = str(zone)
    if token:
        env["SANDBOX_TOKEN"] = token
    return subprocess.run(
        [str(SANDBOX), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    assert lines, (proc.returncode, proc.stdout, proc.stderr)
    return dict(json.loads(lines[-1]))


def ok(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return last_json(proc)


def refused(proc: subprocess.CompletedProcess[str], code: int = 2) -> dict[str, Any]:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return last_json(proc)
