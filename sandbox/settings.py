"""Settings read once, at the edge (the CLI or a test), and passed in.

Nothing in the zone reads ``os.environ`` at import time; the CLI builds one ``Settings`` from
its options and the environment and hands it to the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ZONE_ENV = "SANDBOX_ZONE"
TOKEN_ENV = "SANDBOX_TOKEN"
RAY_ENV = "RAY_ADDRESS"
SERVER_ENV = "SANDBOX_SERVER"
#: the CA certificate (PEM) a served zone's HTTPS certificate must chain to
CA_ENV = "SANDBOX_CA"
#: the one-time code of a user with a second factor
OTP_ENV = "SANDBOX_OTP"
DEFAULT_ZONE = Path("zone")


@dataclass(frozen=True)
class Settings:
    zone: Path
    token: str | None
    ray_address: str | None
    #: a served zone's URL: when set, the CLI is a thin client and ``zone`` is not used
    server: str | None = None
    #: the CA file that vouches for the server's certificate (else the system's CAs)
    ca: Path | None = None
    otp: str | None = None

    @classmethod
    def resolve(
        cls,
        environ: Mapping[str, str],
        *,
        zone: Path | None = None,
        token: str | None = None,
        ray_address: str | None = None,
        server: str | None = None,
        ca: Path | None = None,
        otp: str | None = None,
    ) -> Settings:
        """Options win over the environment, the environment over the defaults."""
        zone_path = zone or (Path(environ[ZONE_ENV]) if environ.get(ZONE_ENV) else DEFAULT_ZONE)
        return cls(
            zone=zone_path,
            token=token or environ.get(TOKEN_ENV) or None,
            ray_address=ray_address or environ.get(RAY_ENV) or None,
            server=server or environ.get(SERVER_ENV) or None,
            ca=ca or (Path(environ[CA_ENV]) if environ.get(CA_ENV) else None),
            otp=otp or environ.get(OTP_ENV) or None,
        )
