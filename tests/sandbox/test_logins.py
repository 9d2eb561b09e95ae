"""Token expiry and second factors (TOTP), at the service: a frozen clock, no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import text

from foundation.errors import AuthError, SpecError
from policies.roles import Role
from policies.totp import STEP_S
from sandbox.backend import InProcessBackend
from sandbox.login_policy import LoginPolicy
from sandbox.service import Service
from sandbox.zone import Zone

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _zone(root: Path, login: str = "") -> tuple[Service, dict[str, str]]:
    svc, op_token = Service.init_zone(root, InProcessBackend())
    svc.clock = lambda: NOW
    op = svc.authenticate(op_token)
    tokens = {"operator": op_token}
    _, tokens["sam"] = svc.add_user(op, "sam", "steward")
    _, tokens["rita"] = svc.add_user(op, "rita", "researcher", expires_in=1)
    if login:
        svc.close()
        with open(root / "zone.toml", "a") as f:
            f.write(login)
        svc = Service(Zone.open(root), InProcessBackend())
        svc.clock = lambda: NOW
    return svc, tokens


def _reasons(svc: Service) -> list[str]:
    return [str(e.details.get("reason")) for e in svc.audit.list(limit=100) if e.action == "auth"]


def test_a_token_expires_and_is_refused_with_what_to_do(tmp_path: Path) -> None:
    svc, tokens = _zone(tmp_path / "zone")
    try:
        assert svc.authenticate(tokens["rita"]).name == "rita"
        svc.clock = lambda: NOW + timedelta(days=1, seconds=1)
        with pytest.raises(AuthError, match="expired.*ask an operator for a new one"):
            svc.authenticate(tokens["rita"])
        assert "expired" in _reasons(svc)
        # the zone's default (90 days) holds for sam; a reissue gives rita a new life
        assert svc.authenticate(tokens["sam"]).name == "sam"
        op = svc.authenticate(tokens["operator"])
        out = svc.reissue_token(op, "rita", expires_in=30)
        assert svc.authenticate(out["token"]).name == "rita"
        with pytest.raises(AuthError):
            svc.authenticate(tokens["rita"])
        svc.clock = lambda: NOW + timedelta(days=91)
        with pytest.raises(AuthError, match="expired"):
            svc.authenticate(tokens["sam"])
    finally:
        svc.close()


def test_expiry_days_are_checked(tmp_path: Path) -> None:
    svc, tokens = _zone(tmp_path / "zone")
    try:
        op = svc.authenticate(tokens["operator"])
        with pytest.raises(SpecError, match="--expires-in"):
            svc.add_user(op, "x", "analyst", expires_in=0)
    finally:
        svc.close()


def test_revoke_ends_a_token(tmp_path: Path) -> None:
    svc, tokens = _zone(tmp_path / "zone")
    try:
        svc.revoke_user(svc.authenticate(tokens["operator"]), "sam")
        with pytest.raises(AuthError, match="revoked"):
            svc.authenticate(tokens["sam"])
    finally:
        svc.close()


def test_totp_enrol_confirm_require_and_no_replay(tmp_path: Path) -> None:
    svc, tokens = _zone(tmp_path / "zone", '\n[login]\nrequire_totp = ["steward"]\n')
    try:
        assert svc.logins.policy.require_totp == {Role.STEWARD}
        # a steward without a second factor may only enrol
        with pytest.raises(AuthError, match="requires a second factor.*totp-enrol"):
            svc.authenticate(tokens["sam"])
        sam = svc.authenticate(tokens["sam"], enrolling=True)
        out = svc.totp_enrol(sam)
        assert out["uri"].startswith("otpauth://totp/") and out["secret"] in out["uri"]
        # the secret is stored sealed, never in clear
        with svc.engine.connect() as conn:
            sealed = conn.execute(text("select totp_sealed from user_logins where name='sam'"))
            assert out["secret"] not in str(sealed.scalar())
        totp = pyotp.TOTP(out["secret"])
        with pytest.raises(SpecError, match="CODE"):
            svc.totp_confirm(sam, "000000" if totp.at(NOW) != "000000" else "111111")
        assert svc.totp_confirm(sam, totp.at(NOW))["confirmed"]
        with pytest.raises(SpecError, match="already has a second factor"):
            svc.totp_enrol(sam)
        with pytest.raises(AuthError, match="one-time code"):
            svc.authenticate(tokens["sam"])
        # the confirming code is spent; the next step's code works once
        with pytest.raises(AuthError, match="used already"):
            svc.authenticate(tokens["sam"], totp.at(NOW))
        later = NOW + timedelta(seconds=STEP_S)
        actor, session = svc.login(tokens["sam"], totp.at(later))
        assert actor.name == "sam" and session
        with pytest.raises(AuthError, match="used already"):
            svc.authenticate(tokens["sam"], totp.at(later))
        with pytest.raises(AuthError, match="wrong or too old"):
            svc.authenticate(tokens["sam"], totp.at(NOW + timedelta(hours=1)))
        # the session stands for the code, for this token only
        assert svc.authenticate(tokens["sam"], session=session).name == "sam"
        assert {"no code", "code replayed", "wrong code"} <= set(_reasons(svc))
        # researchers are not required to
        assert svc.authenticate(tokens["rita"]).name == "rita"
        # a reissue clears it: the steward enrols again
        new = svc.reissue_token(svc.authenticate(tokens["operator"]), "sam")["token"]
        with pytest.raises(AuthError, match="totp-enrol"):
            svc.authenticate(new, session=session)
    finally:
        svc.close()


def test_login_settings_are_checked(tmp_path: Path) -> None:
    (tmp_path / "zone.toml").write_text('[login]\nrequire_totp = ["root"]\n')
    with pytest.raises(SpecError, match="require_totp"):
        LoginPolicy.of_zone(tmp_path)
    (tmp_path / "zone.toml").write_text("[login]\ntoken_days = 0\n")
    with pytest.raises(SpecError, match="token_days"):
        LoginPolicy.of_zone(tmp_path)


def test_an_old_zone_without_the_table_is_refused_clearly(tmp_path: Path) -> None:
    svc, tokens = _zone(tmp_path / "zone")
    with svc.engine.begin() as conn:
        conn.execute(text("drop table user_logins"))
    try:
        with pytest.raises(SpecError, match="user_logins.*older version"):
            svc.authenticate(tokens["sam"])
    finally:
        svc.close()
