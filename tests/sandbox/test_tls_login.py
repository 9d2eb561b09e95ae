"""Transport and login over a real ``sandbox serve``: HTTPS and the client's trust in it,
plain http refused off this machine, expired and revoked tokens, and a steward's required
second factor (enrol, confirm, a code per command, no replay)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from served import Server, client_cli, served_zone

from foundation.sql import make_engine
from policies.store_logins import LoginStore
from policies.totp import STEP_S
from sandbox.backend import InProcessBackend
from sandbox.service import Service
from sandbox.zone import Zone

pytestmark = pytest.mark.ray

OPENSSL = "/usr/bin/openssl"


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key; the certificate is its own CA."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return cert, key


@dataclass
class World:
    server: Server
    ca: Path
    other_ca: Path
    tokens: dict[str, str]
    root: Path

    def cli(self, *args: str, token: str, ca: Path | None = None, otp: str = "") -> Any:
        env = {"SANDBOX_CA": str(ca or self.ca)}
        if otp:
            env["SANDBOX_OTP"] = otp
        return client_cli(*args, server=self.server.url, token=token, extra_env=env)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("tls")
    root = base / "zone"
    svc, op_token = Service.init_zone(root, InProcessBackend())
    op = svc.authenticate(op_token)
    tokens = {"operator": op_token}
    for name, role in [("sam", "steward"), ("rita", "researcher"), ("rex", "researcher")]:
        _, tokens[name] = svc.add_user(op, name, role)
    svc.close()
    with open(root / "zone.toml", "a") as f:
        f.write('\n[login]\nrequire_totp = ["steward"]\n')
    cert, key = self_signed(base, "zone")
    other, _ = self_signed(base, "other")
    args = ["--tls-cert", str(cert), "--tls-key", str(key)]
    with served_zone(root, extra_args=args, ca=cert) as server:
        yield World(server, cert, other, tokens, root)


def test_https_with_a_trusted_ca_works_end_to_end(world: World) -> None:
    assert world.server.url.startswith("https://")
    r = world.cli("dataset", "list", "--json", token=world.tokens["rita"])
    assert r.returncode == 0, r.stderr
    assert "datasets" in json.loads(r.stdout)


def test_an_untrusted_certificate_is_one_clear_line(world: World) -> None:
    r = world.cli("dataset", "list", token=world.tokens["rita"], ca=world.other_ca)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not trust" in lines[0] and "SANDBOX_CA" in lines[0], lines


def test_plain_http_to_another_machine_is_refused(world: World) -> None:
    r = client_cli("dataset", "list", server="http://10.9.8.7:8750", token=world.tokens["rita"])
    assert r.returncode == 2
    assert "--server" in r.stderr and "https://" in r.stderr and "clear" in r.stderr


def test_an_expired_token_is_refused(world: World) -> None:
    engine = make_engine(Zone.open(world.root).db_url)
    try:
        LoginStore(engine).set_expiry("rex", datetime.now(UTC) - timedelta(minutes=1))
    finally:
        engine.dispose()
    r = world.cli("dataset", "list", token=world.tokens["rex"])
    assert r.returncode == 2 and "expired" in r.stderr and "operator" in r.stderr, r.stderr


def test_revoke_works_served(world: World) -> None:
    op = world.tokens["operator"]
    r = world.cli("user", "add", "tmp", "--role", "analyst", "--json", token=op)
    assert r.returncode == 0, r.stderr
    tmp = json.loads(r.stdout)["token"]
    assert world.cli("dataset", "list", token=tmp).returncode == 0
    r = world.cli("user", "revoke", "tmp", token=op)
    assert r.returncode == 0, r.stderr
    r = world.cli("dataset", "list", token=tmp)
    assert r.returncode == 2 and "revoked" in r.stderr, r.stderr


def test_a_steward_must_use_a_second_factor(world: World) -> None:
    sam = world.tokens["sam"]
    r = world.cli("dataset", "list", token=sam)
    assert r.returncode == 2 and "totp-enrol" in r.stderr, r.stderr
    r = world.cli("user", "totp-enrol", "--json", token=sam)
    assert r.returncode == 0, r.stderr
    totp = pyotp.TOTP(json.loads(r.stdout)["secret"])
    now = time.time()
    r = world.cli("user", "totp-confirm", totp.at(now), token=sam)
    assert r.returncode == 0, r.stderr
    # without a code: refused
    r = world.cli("dataset", "list", token=sam)
    assert r.returncode == 2 and "one-time code" in r.stderr, r.stderr
    # the next step's code: accepted (one command, several requests, one code)
    code = totp.at(now + STEP_S)
    r = world.cli("dataset", "list", "--json", token=sam, otp=code)
    assert r.returncode == 0, r.stderr
    # the same code again: refused
    r = world.cli("dataset", "list", token=sam, otp=code)
    assert r.returncode == 2 and "used already" in r.stderr, r.stderr
    # a wrong one: refused, and every refusal is in the audit log
    r = world.cli("dataset", "list", token=sam, otp="000000" if code != "000000" else "111111")
    assert r.returncode == 2
    r = world.cli("audit", "list", "--json", token=world.tokens["operator"])
    assert r.returncode == 0, r.stderr
    reasons = {
        e.get("details", {}).get("reason")
        for e in json.loads(r.stdout)["events"]
        if e.get("action") == "auth"
    }
    assert {"no code", "code replayed", "expired"} <= reasons, reasons
