"""Second factors: TOTP (RFC 6238) secrets, sealed at rest, and codes accepted once.

A secret is shown to its owner once, at enrolment (``sandbox user totp-enrol``); the database
keeps it sealed with AES-GCM under a key derived from the zone's ``secret.key`` (which lives
outside the database), bound to the user's name, so a copy of the database alone yields no
secret and a sealed secret moved to another user does not open. Each accepted code's time
step is recorded and only a later step is accepted next: a code is never accepted twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from datetime import datetime

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from foundation.errors import IntegrityError

#: the authenticator app's label for this zone's accounts
ISSUER = "safe zone"
#: seconds per code (the RFC's and every authenticator app's default)
STEP_S = 30
#: steps either side of now still accepted: a phone's clock may be a little off
WINDOW = 1
_NONCE = 12


def sealing_key(zone_secret: bytes) -> bytes:
    """The key that seals TOTP secrets: derived, so the pseudonym key itself seals nothing."""
    return hmac.new(zone_secret, b"sandbox totp seal v1", hashlib.sha256).digest()


def new_secret() -> str:
    """A fresh base32 secret (160 bits), for the owner's authenticator app."""
    return pyotp.random_base32()


def provisioning_uri(secret: str, name: str, zone_id: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads (as a QR code or pasted)."""
    return pyotp.TOTP(secret).provisioning_uri(name=name, issuer_name=f"{ISSUER} {zone_id}")


def seal(key: bytes, name: str, secret: str) -> str:
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(key).encrypt(nonce, secret.encode("ascii"), name.encode("utf-8"))
    return base64.b64encode(nonce + sealed).decode("ascii")


def unseal(key: bytes, name: str, sealed: str) -> str:
    raw = base64.b64decode(sealed)
    try:
        secret = AESGCM(key).decrypt(raw[:_NONCE], raw[_NONCE:], name.encode("utf-8"))
    except InvalidTag:
        raise IntegrityError(
            f"the second factor of {name} does not open with this zone's secret.key (was the "
            "database or the key replaced?); an operator resets it with `sandbox user reissue`"
        ) from None
    return secret.decode("ascii")


def step_of(when: datetime) -> int:
    return int(when.timestamp()) // STEP_S


def matching_step(secret: str, code: object, now: datetime) -> int | None:
    """The time step near ``now`` whose code is ``code``, or None (the latest if several)."""
    if not (isinstance(code, str) and len(code) == 6 and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    here = step_of(now)
    found = None
    for step in range(here - WINDOW, here + WINDOW + 1):
        if hmac.compare_digest(totp.at(step * STEP_S), code):
            found = step
    return found
