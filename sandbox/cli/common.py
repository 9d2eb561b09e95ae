"""What every command shares: the options, opening the service, printing records."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sandbox.settings import Settings

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
    service: Any
    user: Any

    def close(self) -> None:
        self.service.close()


def settings(
    zone: Path | None, token: str | None = None, ray_address: str | None = None
) -> Settings:
    return Settings.resolve(os.environ, zone=zone, token=token, ray_address=ray_address)


def open_session(zone: Path | None, token: str | None, ray_address: str | None = None) -> Session:
    from sandbox.ray_backend import RayBackend
    from sandbox.service import Service
    from sandbox.zone import Zone

    s = settings(zone, token, ray_address)
    z = Zone.open(s.zone)
    svc = Service(z, RayBackend(z.root, s.ray_address))
    user = svc.authenticate(s.token)
    return Session(svc, user)


@contextmanager
def session(
    zone: Path | None, token: str | None, ray_address: str | None = None
) -> Iterator[Session]:
    """An authenticated session for one command; the service is closed whatever happens."""
    s = open_session(zone, token, ray_address)
    try:
        yield s
    finally:
        s.close()


def metric(value: object) -> float:
    """A DP metric for display: None (undefined under noise) shows as nan."""
    return float("nan") if value is None else float(value)  # type: ignore[arg-type]


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return sorted(to_jsonable(o) for o in obj)
    if isinstance(obj, list | tuple):
        return [to_jsonable(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


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
