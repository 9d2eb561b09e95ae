"""A throwaway PostgreSQL server for the tests: Debian's binaries, a private folder, loopback.

``SANDBOX_TEST_PG_URL`` (an admin URL: it may create databases) names a server to use;
without it the tests start their own cluster when Debian's ``postgresql`` package is
installed (``.ci/run`` installs it) and stop it at the end. As root the cluster runs as the
package's ``postgres`` account (PostgreSQL refuses to run as root). Each test that asks gets a
fresh database of its own, dropped after it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: an admin URL of a server to use instead of starting one
PG_ENV = "SANDBOX_TEST_PG_URL"
#: the driver the product uses for PostgreSQL
DRIVER = "postgresql+psycopg"
_ADMIN = "sz_admin"


def binaries() -> Path | None:
    """The folder of ``initdb``/``pg_ctl`` (Debian keeps them out of PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def why_not() -> str | None:
    """Why the PostgreSQL cases cannot run here (None: they can)."""
    if os.environ.get(PG_ENV):
        return None
    if binaries() is None:
        return (
            f"no PostgreSQL here: install Debian's postgresql package (.ci/run does) or set "
            f"{PG_ENV} to an admin URL"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL cannot be started as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_owner(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextmanager
def cluster() -> Iterator[str]:
    """An admin URL: the one in ``SANDBOX_TEST_PG_URL``, or a fresh cluster's."""
    given = os.environ.get(PG_ENV)
    if given:
        yield given
        return
    bin_dir = binaries()
    assert bin_dir is not None, why_not()
    base = Path(tempfile.mkdtemp(prefix="sz-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    port = _free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    subprocess.run(
        _as_owner(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", _ADMIN, "-A", "trust", "--no-sync"]
        ),
        **run,  # type: ignore[call-overload]
    )
    # loopback only, its socket in the private folder, no fsync (a test server)
    opts = f"-h 127.0.0.1 -p {port} -k {base} -F -c max_connections=200"
    subprocess.run(
        _as_owner(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                opts,
                "-l",
                str(base / "log"),
                "-w",
                "start",
            ]
        ),  # fmt: skip
        **run,  # type: ignore[call-overload]
    )
    try:
        yield f"{DRIVER}://{_ADMIN}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


def admin_exec(admin_url: str, *statements: str) -> None:
    """Run statements as the server's admin (databases, roles, grants: test setup only)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the server; its URL (same credentials); dropped after."""
    from sqlalchemy.engine import make_url

    name = f"sz_{uuid.uuid4().hex[:12]}"
    admin_exec(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        for attempt in range(3):
            try:
                admin_exec(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except Exception:  # noqa: BLE001 - a test's stray connection: try again
                time.sleep(0.5 * (attempt + 1))
