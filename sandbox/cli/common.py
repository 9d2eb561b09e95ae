"""What every command shares: the options, opening the service, printing records."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
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


#: columns whose values a user copies into the next command (job, request and grant ids,
#: names of datasets, projects and users): shown whole, never cut or folded by a narrow terminal
ID_COLUMNS = frozenset(
    {"id", "name", "project", "dataset", "owner", "actor", "target", "set_by", "column", "job"}
)
#: the fewest characters a wrapping column keeps in a table; below that the rows print as
#: records (one "column value" line each), which read at any width
MIN_CELL = 8


def show_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    """``rows`` as a table whose id columns (:data:`ID_COLUMNS`) never wrap and whose other
    columns fold (nothing is cut with an ellipsis); as records when that cannot fit the
    terminal (rich would squeeze every other column to nothing). Floats at 3 significant
    digits (:func:`figure`); ``--json`` keeps them whole."""
    from rich.table import Table
    from rich.text import Text

    cells = [
        [moment(v) if _is_time(c) else fmt(v) for c in columns for v in [r.get(c)]] for r in rows
    ]
    ids = [c in ID_COLUMNS for c in columns]
    if _table_width(columns, cells, ids) > console.width:
        _show_records(columns, cells, title)
        return
    t = Table(title=title or None)
    for c, is_id in zip(columns, ids, strict=True):
        t.add_column(c, no_wrap=is_id, overflow="fold")
    for row in cells:
        # Text, not markup: a value is shown as it is (brackets in a purpose stay)
        t.add_row(*[Text(v) for v in row])
    console.print(t)


def _table_width(columns: list[str], cells: list[list[str]], ids: list[bool]) -> int:
    """The narrowest the table can be: id columns whole, the others at :data:`MIN_CELL`
    (or their widest value, if narrower); each column pads 2, each border takes 1."""
    from rich.cells import cell_len

    width = len(columns) + 1
    for i, (c, is_id) in enumerate(zip(columns, ids, strict=True)):
        widest = max([cell_len(c), *(cell_len(row[i]) for row in cells)])
        width += 2 + (widest if is_id else min(widest, MIN_CELL))
    return width


def _show_records(columns: list[str], cells: list[list[str]], title: str) -> None:
    """Each row as lines of ``column  value``, a blank line between rows."""
    from rich.text import Text

    if title:
        console.print(Text(title, style="italic"))
    key = max(len(c) for c in columns)
    for n, row in enumerate(cells):
        if n:
            console.print()
        for c, v in zip(columns, row, strict=True):
            console.print(Text(f"{c:<{key}}  ") + Text(v, style="bold" if c == "id" else ""))


def _is_time(column: str) -> bool:
    return column == "at" or column.endswith("_at")


def moment(value: Any) -> str:
    """A stored ISO time for people: ``2026-12-07 07:33:18 UTC`` (to the second; ``--json``
    keeps the microseconds and the offset); anything else by :func:`fmt`."""
    if not isinstance(value, str):
        return fmt(value)
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return value
    if t.tzinfo is None:
        return t.strftime("%Y-%m-%d %H:%M:%S")
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt(v: Any) -> str:
    """One value of a table or a line: floats by :func:`figure`, lists joined by commas."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return figure(v)
    if isinstance(v, list | tuple | set | frozenset):
        return ",".join(str(x) for x in v)
    return str(v)


def figure(value: Any) -> str:
    """A figure for people: floats at 3 significant digits (``0.99930123`` -> ``0.999``,
    ``1.0000001`` -> ``1``, ``1e-05`` stays scientific), never an exponent for a figure of
    100 or more (``12345.6`` -> ``12346``: its integer part is all shown); ints (counts) as
    they are; anything else (a "withheld" note) as its text. ``--json`` prints the figures
    whole; the accountant's digits beyond the third say nothing a reader can use."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"  # not "-0"
    if 100 <= abs(value) < 1e15:
        return f"{value:.0f}"
    return f"{value:.3g}"


def show_curve(curve: dict[str, Any], asked_epsilon: float) -> None:
    """A quote's utility curve: one line a point, ``epsilon 0.5: AUROC 0.702 (95% CI
    0.655-0.748)`` (the point at the spec's own epsilon marked), then where its PNG is."""
    from privacy.dp_intervals import format_metric

    on = "dummy" if curve.get("on") == "dummy" else "synthetic"
    console.print(f"  utility curve (dry runs on {on} rows, no charge):")
    points = curve["points"]
    width = max((len(figure(p["epsilon"])) for p in points), default=0)
    for p in points:
        auroc = format_metric(p.get("auroc"), p.get("auroc_ci95"))
        mark = "  <- your epsilon" if math.isclose(p["epsilon"], asked_epsilon) else ""
        console.print(f"    epsilon {figure(p['epsilon']):>{width}}: AUROC {auroc}{mark}")
    console.print(f"  curve: {curve['png']} (your epsilon {figure(asked_epsilon)} marked)")
