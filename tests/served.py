"""A served zone for tests: ``sandbox serve`` in a subprocess on a free loopback port.

``served_zone(root)`` starts the installed entry point (real uvicorn, the service's own local
Ray), waits for ``/v1/health`` and stops it at the end (SIGTERM, then SIGKILL). ``as_user``
runs it, or a CLI call, as another OS account (``runuser``) when the test runs as root.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli_runner import SANDBOX

#: what a test may pass through to the service (nothing else of the caller's shell)
_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SZ_TEST_SITECUSTOMIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


def _wait_healthy(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float, verify: Any = True
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/health", timeout=1.0, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"sandbox serve did not come up: {log.read_text()[-2000:]}")


def start_server(
    root: Path,
    *,
    user: str | None = None,
    extra_env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    ca: Path | None = None,
) -> Server:
    """``ca``: the server serves HTTPS (``extra_args`` has --tls-cert/--tls-key) with a
    certificate this CA file vouches for."""
    port = free_port()
    log = root.parent / f"serve-{port}.log"
    env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env.update(extra_env or {})
    argv: Sequence[str] = [
        str(SANDBOX),
        "serve",
        "--zone",
        str(root),
        "--port",
        str(port),
        *extra_args,
    ]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            list(argv), env=env, stdout=sink, stderr=sink, start_new_session=True
        )
    url = f"{'https' if ca else 'http'}://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    _wait_healthy(url, proc, log, timeout=120, verify=verify)
    return Server(url, proc, log)


def stop_server(server: Server) -> None:
    """SIGTERM to the service alone first: it shuts its own Ray down in ~2.5 s, where a
    SIGTERM to the whole group kills Ray under it and its shutdown then waits ~9 s on the
    dead processes. Started through ``runuser`` (which may not pass the signal on), or not
    gone in time: the whole group, then SIGKILL. Whatever is left of the group goes last."""
    if server.proc.poll() is None:
        alone = str(server.proc.args[0]) != "runuser"
        if alone:
            os.kill(server.proc.pid, signal.SIGTERM)
        else:
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(timeout=20 if alone else 30)
        except subprocess.TimeoutExpired:
            _signal_group(server.proc.pid, signal.SIGTERM)
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=30)
    _signal_group(server.proc.pid, signal.SIGKILL)  # strays of the session, if any


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def served_zone(root: Path, **kw: object) -> Iterator[Server]:
    server = start_server(root, **kw)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_server(server)


def client_cli(
    *args: str,
    server: str,
    token: str | None,
    timeout: float = 300,
    user: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """One CLI command as a thin client: a URL and a token, no zone path (``extra_env``: the
    client's own shell, e.g. an attacker's PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP}
    env.update(extra_env or {})
    env["SANDBOX_SERVER"] = server
    if token:
        env["SANDBOX_TOKEN"] = token
    argv = [str(SANDBOX), *args]
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def let_accounts_run_python() -> None:
    """Other accounts must be able to run the installed CLI (see the product's own rule)."""
    from sandbox.demo_served import let_accounts_run_the_install

    let_accounts_run_the_install()
