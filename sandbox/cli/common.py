"""What every command shares: the options, opening the service, printing records."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sandbox.api.wire import to_jsonable
from sandbox.settings import Settings

__all__ = ["to_jsonable"]

ZoneOpt = Annotated[
    Path | None, typer.Option("--zone", help="zone folder (else $SANDBOX_ZONE, else ./zone)")
]
TokenOpt = Annotated[str | None, typer.Option("--token", help="your token (else $SANDBOX_TOKEN)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of prose")]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address", help="an existing Ray cluster (else $RAY_ADDRESS, else a local Ray)"
    ),
]

console = Console()
err_console = Console(stderr=True)


@dataclass
class Session:
    #: ``sandbox.client.EmbeddedZone`` or ``RemoteZone``: the same calls, the same records
    service: Any
    user: Any

    @property
    def served(self) -> bool:
        return bool(self.service.served)

    def close(self) -> None:
        self.service.close()


#: ``sandbox --server URL --ca FILE --otp CODE ...`` (root options; else $SANDBOX_SERVER,
#: $SANDBOX_CA, $SANDBOX_OTP)
SERVER_OPTION: dict[str, str | None] = {"server": None, "ca": None, "otp": None}


def settings(
    zone: Path | None, token: str | None = None, ray_address: str | None = None
) -> Settings:
    return Settings.resolve(
        os.environ,
        zone=zone,
        token=token,
        ray_address=ray_address,
        server=SERVER_OPTION["server"],
        ca=Path(ca) if (ca := SERVER_OPTION.get("ca")) else None,
        otp=SERVER_OPTION.get("otp"),
    )


def open_session(
    zone: Path | None,
    token: str | None,
    ray_address: str | None = None,
    *,
    enrolling: bool = False,
) -> Session:
    """``enrolling``: the command sets up the caller's second factor (allowed before it has
    one, where the zone requires one)."""
    from sandbox.client import EmbeddedZone, RemoteZone

    s = settings(zone, token, ray_address)
    if s.server:
        if ray_address:
            from foundation.errors import SpecError

            raise SpecError(
                "--ray-address",
                "cannot be chosen against a served zone (its service runs its own cluster)",
                "drop --ray-address",
            )
        remote = RemoteZone(s.server, s.token, ca=s.ca, otp=s.otp)
        try:
            return Session(remote, remote.authenticate(s.token))
        except BaseException:
            remote.close()
            raise
    from sandbox.ray_backend import RayBackend
    from sandbox.service import Service
    from sandbox.zone import Zone

    z = Zone.open(s.zone)
    svc = Service(z, RayBackend(z.root, s.ray_address))
    try:
        user = svc.authenticate(s.token, s.otp, enrolling=enrolling)
    except BaseException:
        svc.close()
        raise
    return Session(EmbeddedZone(svc), user)


@contextmanager
def session(
    zone: Path | None,
    token: str | None,
    ray_address: str | None = None,
    *,
    enrolling: bool = False,
) -> Iterator[Session]:
    """An authenticated session for one command; the service is closed whatever happens."""
    s = open_session(zone, token, ray_address, enrolling=enrolling)
    try:
        yield s
    finally:
        s.close()


def metric(value: object) -> float:
    """A DP metric for display: None (undefined under noise) shows as nan."""
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def emit(obj: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        typer.echo(json.dumps(to_jsonable(obj), default=str, sort_keys=True))
    else:
        human(obj)


def show_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    from rich.table import Table

    t = Table(title=title or None)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(r.get(c)) for c in columns])
    console.print(t)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | tuple | set | frozenset):
        return ",".join(str(x) for x in v)
    return str(v)
