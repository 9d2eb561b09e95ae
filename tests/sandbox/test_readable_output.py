"""Readable output (issue 13, item 8): ids are never cut, figures read at 3 significant
digits (``--json`` keeps them whole), and a quote's utility curve has readable axes, each
AUROC's 95% interval and a mark at the asked epsilon.

Every command runs through the installed ``sandbox`` entry point in a subprocess. The
tables run against an embedded zone at a narrow terminal (``COLUMNS``, which rich reads);
the curve runs against the zone served on loopback from this process (uvicorn in a thread
over an ``InProcessBackend``), so its dry runs need no Ray. The figure itself is read back
through matplotlib's objects in a unit test.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from cli_runner import ok, sandbox
from factories import FEATURES, LABEL, job_spec, make_world
from served import client_cli, free_port

from sandbox.backend import InProcessBackend
from sandbox.cli.common import figure
from sandbox.service_synth import SynthCalls

#: CLI calls at once (each is one short process)
PARALLEL = 2
#: the epsilon the curve's job asks for (between two of the curve's points, not one of them)
ASKED = 3.0


@dataclass
class World:
    root: Path
    svc: Any
    tokens: dict[str, str]
    job: Any  # rita's succeeded job
    pending: Any  # rita's pending request, at an epsilon with many digits

    def run(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        return sandbox(*args, zone=self.root, token=self.tokens[who], timeout=120)

    def many(self, *calls: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(PARALLEL) as pool:
            return list(pool.map(lambda c: self.run(c[0], *c[1:]), calls))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("readable") / "zone"
    w = make_world(root, InProcessBackend())
    try:
        job = w.svc.submit(w.researcher, job_spec(**{"training.epochs": 1}))
        assert job.state == "succeeded", job.error
        pending = w.svc.request_access(
            w.researcher, "readmission", "cohort", ["age"], ["dp-sgd"], 0.123456789, 1e-6
        )
        tokens = {"sam": w.steward_token, "rita": w.researcher_token}
        yield World(root, w.svc, tokens, job, pending)
    finally:
        w.svc.close()


# --- tables: ids whole at any width ---------------------------------------------------------


@pytest.mark.parametrize("columns", [80, 60])
def test_list_commands_never_cut_an_id(
    world: World, columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))  # the subprocess's terminal width
    (grant,) = world.svc.list_grants(world.svc.authenticate(world.tokens["sam"]))
    calls = {
        ("rita", "jobs", "list"): [world.job.id, "readmission", "cohort"],
        ("sam", "access", "list"): [world.pending.id, grant["request_id"], "readmission"],
        ("sam", "access", "grants"): [grant["id"], "readmission", "cohort"],
        ("rita", "project", "list"): ["readmission", "rita"],
        ("sam", "dataset", "list"): ["cohort"],
    }
    for (call, ids), proc in zip(calls.items(), world.many(*calls), strict=True):
        assert proc.returncode == 0, (call, proc.stdout, proc.stderr)
        for shown in ids:
            assert re.search(rf"(?<![\w-]){re.escape(shown)}(?![\w-])", proc.stdout), (
                call,
                shown,
                proc.stdout,
            )
        assert "…" not in proc.stdout, (call, proc.stdout)  # nothing cut with an ellipsis
        assert max(len(line) for line in proc.stdout.splitlines()) <= columns, proc.stdout


def test_a_wide_terminal_keeps_the_table(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    proc = world.run("rita", "jobs", "list")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "created_at" in line)
    assert "┃ id" in header and "epsilon" in header, proc.stdout


# --- figures: 3 significant digits in prose, whole in --json ----------------------------------


def test_figures_read_at_three_significant_digits_and_json_keeps_them_whole(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    eps = world.job.result["epsilon"]
    assert eps != float(f"{eps:.3g}")  # the accountant's figure has more digits than shown
    jobs, jobs_json, status, requests, requests_json, grants = world.many(
        ("rita", "jobs", "list"),
        ("rita", "jobs", "list", "--json"),
        ("rita", "jobs", "status", world.job.id),
        ("sam", "access", "list"),
        ("sam", "access", "list", "--json"),
        ("sam", "access", "grants"),
    )
    shown = figure(eps)
    assert re.search(rf"│ {re.escape(shown)}\s+│", jobs.stdout), jobs.stdout
    assert repr(eps) not in jobs.stdout and f"{eps:.4g}" not in jobs.stdout
    (listed,) = [j for j in ok(jobs_json)["jobs"] if j["id"] == world.job.id]
    assert listed["result"]["epsilon"] == eps  # --json: the figure whole
    assert status.returncode == 0, status.stderr
    assert f"epsilon spent {shown} " in status.stdout, status.stdout
    assert "0.123 " in requests.stdout and "0.1234" not in requests.stdout, requests.stdout
    (req,) = [r for r in ok(requests_json)["requests"] if r["id"] == world.pending.id]
    assert req["epsilon"] == 0.123456789
    assert "1e-05" in grants.stdout, grants.stdout  # a delta stays scientific


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.999, "0.999"),
        (0.99930123, "0.999"),
        (1.0000001, "1"),
        (1e-05, "1e-05"),
        (0.70234, "0.702"),
        (0.000123456, "0.000123"),
        (12.345, "12.3"),
        (12345.6, "12346"),  # no exponent for a figure of 100 or more
        (-0.0, "0"),
        (5, "5"),  # an int is a count: as it is
        (50000, "50000"),
        (None, "-"),
        ("withheld", "withheld"),
        (True, "True"),
    ],
)
def test_figure(value: Any, shown: str) -> None:
    assert figure(value) == shown
    assert figure(float("nan")) == "nan"


# --- the utility curve ------------------------------------------------------------------------


def _points() -> list[dict[str, Any]]:
    return [
        {"epsilon": e, "auroc": a, "auroc_ci95": None if a is None else [a - 0.04, a + 0.03]}
        for e, a in [
            (0.25, 0.5123456789),
            (0.5, 0.581234),
            (1.0, 0.6421987),
            (2.0, 0.69),
            (4.0, 0.7103),
            (8.0, None),
        ]
    ]


def _overlap(a: Any, b: Any) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_curve_has_its_interval_the_asked_mark_and_readable_axes() -> None:
    from matplotlib.collections import PolyCollection

    from sandbox import utility_curve

    fig = utility_curve.draw(_points(), on="dummy", asked_epsilon=ASKED)
    (ax,) = fig.axes
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # the constrained layout places everything

    # the mark at the asked epsilon, named in the legend
    (mark,) = [ln for ln in ax.lines if ln.get_gid() == utility_curve.GID_ASKED]
    assert list(mark.get_xdata()) == [ASKED, ASKED]
    assert f"your epsilon {figure(ASKED)}" in [t.get_text() for t in ax.get_legend().get_texts()]
    # the 95% interval as a band, through every point that has one
    (band,) = [c for c in ax.collections if c.get_gid() == utility_curve.GID_INTERVAL]
    assert isinstance(band, PolyCollection)
    verts = band.get_paths()[0].vertices
    assert verts[:, 1].min() == pytest.approx(0.5123456789 - 0.04)
    assert verts[:, 1].max() == pytest.approx(0.7103 + 0.03)
    # each AUROC labelled at 3 significant digits; the undefined one says so
    labels = {t.get_text() for t in ax.texts}
    assert {"0.512", "0.581", "0.642", "0.690", "0.710", "undefined"} <= labels
    # a log epsilon axis (the points span a decade), ticked at the points, all in view
    assert ax.get_xscale() == "log"
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks] == ["0.25", "0.5", "1", "2", "4", "8"]
    low, high = ax.get_xlim()
    assert low < 0.25 and high > 8
    assert all(len(t.get_text()) <= 5 for t in ax.get_yticklabels())
    # nothing overlaps: tick labels with each other and with the axis labels
    for axis, label in ((ax.xaxis, ax.xaxis.label), (ax.yaxis, ax.yaxis.label)):
        boxes = [t.get_window_extent(renderer) for t in _shown(ax, axis)]
        assert len(boxes) >= 3
        for a, b in combinations(boxes, 2):
            assert not _overlap(a, b), (a, b)
        own = label.get_window_extent(renderer)
        assert not any(_overlap(own, b) for b in boxes), label.get_text()
    # and everything lies inside the figure (nothing cut at its edges)
    inside = fig.bbox
    for artist in [*_shown(ax, ax.xaxis), *_shown(ax, ax.yaxis), ax.xaxis.label, ax.title]:
        box = artist.get_window_extent(renderer)
        assert inside.x0 <= box.x0 <= box.x1 <= inside.x1, artist
        assert inside.y0 <= box.y0 <= box.y1 <= inside.y1, artist


def _shown(ax: Any, axis: Any) -> list[Any]:
    """The tick labels drawn: with text, at a tick inside the axes' limits."""
    low, high = sorted(ax.get_xlim() if axis is ax.xaxis else ax.get_ylim())
    at = 0 if axis is ax.xaxis else 1
    return [
        t for t in axis.get_ticklabels() if t.get_text() and low <= t.get_position()[at] <= high
    ]


def test_a_narrow_span_stays_linear_and_keeps_the_mark_in_view() -> None:
    from sandbox import utility_curve

    fig = utility_curve.draw(_points()[:3], on="synthetic:job-1", asked_epsilon=2.0)
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear"
    low, high = ax.get_xlim()
    assert low < 0.25 and high > 2.0
    assert ax.get_ylabel() == "AUROC on synthetic rows"


@pytest.fixture
def served(world: World) -> Iterator[str]:
    """The module's zone served on loopback from this process (its jobs run in-process)."""
    import uvicorn

    from sandbox.server.app import create_app

    config = uvicorn.Config(
        create_app(world.svc), host="127.0.0.1", port=free_port(), log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _job_toml(path: Path) -> Path:
    feats = ", ".join(f'"{f}"' for f in FEATURES)
    path.write_text(
        f"""project = "readmission"
dataset = "cohort"
label = "{LABEL}"
features = [{feats}]
[model]
kind = "logistic"
[privacy]
epsilon = {ASKED}
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = 1
batch_size = 128
lr = 0.5
seed = 7
""",
        encoding="utf-8",
    )
    return path


def test_quote_curve_through_the_cli_prints_intervals_and_writes_a_marked_png(
    world: World, served: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.image

    # three dry runs instead of six (the same paths), spanning a decade: a log axis
    monkeypatch.setattr(SynthCalls.quote_curve, "__defaults__", ((0.5, 2.0, 8.0),))
    out = tmp_path / "quote"
    proc = client_cli(
        "quote",
        str(_job_toml(tmp_path / "job.toml")),
        "--curve",
        "--out",
        str(out),
        server=served,
        token=world.tokens["rita"],
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    text = " ".join(proc.stdout.split())
    assert "utility curve (dry runs on dummy rows, no charge)" in text, proc.stdout
    sig3 = r"(?:0\.\d{3}|1\.00)"  # an AUROC at 3 significant digits
    shown = rf"(?:undefined|{sig3} \(95% CI {sig3}-{sig3}\))"
    for eps in ("0.5", "2", "8"):
        assert re.search(rf"epsilon {eps}: AUROC {shown}", text), (
            eps,
            proc.stdout,
        )
    assert f"your epsilon {figure(ASKED)} marked" in text, proc.stdout

    png = out / "quote_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png).shape
    assert width > 600 and height > 400
    # the saved quote keeps every figure whole, each point with its interval
    saved = json.loads((out / "quote.json").read_text())
    points = saved["curve"]["points"]
    assert [p["epsilon"] for p in points] == [0.5, 2.0, 8.0]
    for p in points:
        if p["auroc"] is not None:
            low, high = p["auroc_ci95"]
            assert low <= p["auroc"] <= high and not math.isclose(low, high)
            assert f"{p['auroc']:#.3g}" in text
