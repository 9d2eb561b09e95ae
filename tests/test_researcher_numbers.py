"""Every number a researcher can see is listed in ``docs/privacy-chokepoints.md``.

The doc's table "Every number a researcher sees" names each numeric leaf of the CLI's
``--json`` outputs (and of the released ``model_card.json``, ``synth_card.json`` and
``quote.json``) by a dot path, with its status: "DP and charged", "public by contract",
"steward release" or "the researcher's own input (echo)". This test runs a researcher's
read and job commands through the CLI entry point on two datasets, the demo cohort (counts
public by its contract) and a cohort ingested with a contract that keeps its counts private,
collects every int/float leaf with its path (ids, site names and list indexes as ``*``), and
fails on any path the doc does not list. On the private-count dataset no path whose status
is "public by contract" (counts) may appear at all.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandbox.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "privacy-chokepoints.md"
SECTION = "## Every number a researcher sees"
STATUSES = (
    "DP and charged",
    "public by contract",
    "steward release",
    "the researcher's own input (echo)",
)
FEATURES = ["age", "sex", "diabetes", "hba1c", "creatinine", "prior_admissions"]
LABEL = "readmitted_30d"
PUBLIC, PRIVATE = "cohort", "private-cohort"
SITES = ["hospital-a", "hospital-b"]
SYNTH_COLUMNS = ["age", "sex", "diabetes", LABEL]


# --- the doc's table ------------------------------------------------------------------------


def doc_table() -> dict[tuple[str, str], str]:
    """``(command, path pattern) -> status`` from the doc's section (one table)."""
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC.name} has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], str] = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) < 4:
            continue
        command, pattern, status = (c.strip("`* ") for c in cells[:3])
        if command in ("command", "") or set(command) <= set("-: "):
            continue
        assert status in STATUSES, f"doc row {command} {pattern}: unknown status {status!r}"
        for cmd in re.split(r"\s*;\s*", command):
            for pat in re.split(r"\s*,\s*", pattern.replace("`", "")):
                rows[(cmd.strip("` "), pat.strip("` "))] = status
    assert rows, "the doc's table is empty"
    return rows


def matches(pattern: str, path: str) -> bool:
    p, q = pattern.split("."), path.split(".")
    return len(p) == len(q) and all(a == "*" or a == b for a, b in zip(p, q, strict=True))


def status_of(table: dict[tuple[str, str], str], command: str, path: str) -> str | None:
    for (cmd, pat), status in table.items():
        if cmd == command and matches(pat, path):
            return status
    return None


# --- numeric leaves ---------------------------------------------------------------------------


#: dict keys that are ids or names (site names, job ids), shown as ``*`` in the doc's patterns
_ID_KEY = re.compile(r"^(hospital-[a-z]+|[a-z]+_[0-9a-f]{6,}|[0-9a-f]{8,}.*)$")


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every int/float leaf (bools are not numbers) with its dot path, ids as ``*``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "*" if _ID_KEY.match(str(k)) else str(k)
            yield from leaves(v, f"{prefix}.{key}" if prefix else key)
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v, f"{prefix}.*" if prefix else "*")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield prefix, obj
    elif isinstance(obj, str):
        assert not re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", obj.strip()), (
            f"{prefix}: a numeric string"
        )


# --- the zone and the CLI ---------------------------------------------------------------------


class Cli:
    def __init__(self, capsys: Any, zone: Path, token: str, sam: str = "") -> None:
        self.capsys, self.zone, self.token, self.sam = capsys, zone, token, sam
        #: (command, output) for every researcher command run
        self.seen: list[tuple[str, str, Any]] = []

    def __call__(self, command: str, *args: str, dataset: str = "", token: str = "") -> Any:
        argv = [*command.split(), *args, "--zone", str(self.zone), "--json"]
        argv += ["--token", token or self.token]
        rc = main(argv)
        out, err = self.capsys.readouterr()
        assert rc == 0, (argv, out, err)
        lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
        obj = json.loads(lines[-1])
        if not token:
            self.seen.append((command, dataset, obj))
        return obj

    def file(self, name: str, path: Path, dataset: str) -> Any:
        obj = json.loads(path.read_text())
        self.seen.append((name, dataset, obj))
        return obj


def _job_toml(path: Path, dataset: str, **extra: str) -> Path:
    fed = extra.get("federated", "")
    mode = 'mode = "federated"\n' if fed else ""
    path.write_text(
        f'project = "readmission"\ndataset = "{dataset}"\n{mode}label = "{LABEL}"\n'
        f"features = {json.dumps(FEATURES)}\n"
        '[model]\nkind = "logistic"\n'
        "[privacy]\nepsilon = 0.5\ndelta = 1e-6\nmax_grad_norm = 1.0\n"
        "[training]\nepochs = 1\nbatch_size = 64\nlr = 0.5\nseed = 1\n"
        "[resources]\ngpus = 0\n" + fed
    )
    return path


@pytest.fixture(scope="module")
def zone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One zone for the module: the demo cohort (counts public by its contract) and the same
    kind of cohort ingested from a CSV whose contract keeps the counts private; a project of
    rita's with a grant on each (dp-sgd, synthetic, federated)."""
    from connectors.cohort import write_cohort
    from connectors.schema import SchemaContract
    from sandbox.backend import InProcessBackend
    from sandbox.service import Service

    root = tmp_path_factory.mktemp("numbers")
    svc, op_token = Service.init_zone(root / "zone", InProcessBackend())
    operator = svc.authenticate(op_token)
    _, st = svc.add_user(operator, "sam", "steward")
    _, rt = svc.add_user(operator, "rita", "researcher")
    steward, rita = svc.authenticate(st), svc.authenticate(rt)
    svc.ingest_demo(steward, PUBLIC, 2000, seed=2)
    src = write_cohort(root / "extract.csv", 2000, seed=5, format="csv")
    text = (ROOT / "connectors" / "cohort_schema.toml").read_text(encoding="utf-8")
    private_text = re.sub(r'(?m)^counts\s*=\s*"public"\s*$', "", text)
    assert private_text != text
    contract = SchemaContract.from_toml_text(private_text)
    svc.ingest_dataset(steward, PRIVATE, src, contract)
    assert svc.store.get_dataset(PUBLIC).counts_public
    assert not svc.store.get_dataset(PRIVATE).counts_public
    svc.create_project(rita, "readmission", "readmission risk")
    for ds in (PUBLIC, PRIVATE):
        req = svc.request_access(
            rita,
            "readmission",
            ds,
            [*FEATURES, LABEL, "hospital"],
            ["dp-sgd", "synthetic", "federated"],
            20.0,
            1e-5,
        )
        svc.approve(steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=10))
    svc.close()
    yield {"root": root, "zone": root / "zone", "rita": rt, "sam": st}


def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's sessions run jobs in the calling thread (same service, no Ray start-up)."""
    from sandbox.backend import InProcessBackend
    from sandbox.cli import common
    from sandbox.service import Service
    from sandbox.zone import Zone

    def open_session(zone, token, ray_address=None):  # type: ignore[no-untyped-def]
        s = common.settings(zone, token, ray_address)
        svc = Service(Zone.open(s.zone), InProcessBackend())
        return common.Session(svc, svc.authenticate(s.token))

    monkeypatch.setattr(common, "open_session", open_session)


def check(seen: list[tuple[str, str, Any]], *, dump: bool = False) -> list[str]:
    """Every numeric leaf of ``seen`` against the doc; returns the problems."""
    table = doc_table()
    problems: set[str] = set()
    found: set[tuple[str, str]] = set()
    for command, dataset, obj in seen:
        for path, _value in leaves(obj):
            found.add((command, path))
            status = status_of(table, command, path)
            if status is None:
                problems.add(f"{command}: {path} is not in {DOC.name}")
            elif dataset == PRIVATE and status == "public by contract":
                problems.add(f"{command}: {path} ({status}) shown on a private-count dataset")
    if dump:
        for command, path in sorted(found):
            print(f"| {command} | {path} | {status_of(table, command, path)} |")
    return sorted(problems)


def researcher_session(cli: Cli, tmp: Path, ds: str) -> None:
    """A researcher's read and job commands on ``ds`` (steward steps with the steward's token)."""
    tag = "pub" if ds == PUBLIC else "priv"
    cli("dataset list", dataset=ds)
    cli("dataset show", ds, dataset=ds)
    cli("project list", dataset=ds)
    cli("access list", dataset=ds)
    job_toml = _job_toml(tmp / f"job-{tag}.toml", ds)
    job = cli("submit", str(job_toml), dataset=ds)
    assert job["state"] == "succeeded"
    dry = cli("submit --on dummy", str(job_toml), "--on", "dummy", dataset=ds)
    assert dry["result"]["dry_run"] == "dummy"
    cli("jobs list", dataset=ds)
    cli("jobs status", job["id"], dataset=ds)
    cli("jobs status", dry["id"], dataset=ds)
    rel = tmp / f"release-{tag}"
    cli("jobs result", job["id"], "--out", str(rel), dataset=ds)
    cli.file("model_card.json", rel / "model_card.json", ds)
    qdir = tmp / f"quote-{tag}"
    cli("quote", str(job_toml), "--out", str(qdir), dataset=ds)
    cli.file("quote.json", qdir / "quote.json", ds)
    cli("budget", "readmission", dataset=ds)
    cli("synth dummy", ds, "--rows", "50", "--out", str(tmp / f"dummy-{tag}.parquet"), dataset=ds)
    fit = cli(
        "synth fit",
        ds,
        "--project",
        "readmission",
        "--epsilon",
        "1",
        "--method",
        "mst",
        "--rows",
        "200",
        "--columns",
        ",".join(SYNTH_COLUMNS),
        "--label",
        LABEL,
        dataset=ds,
    )
    assert fit["state"] == "succeeded"
    cli("synth release", fit["id"], token=cli.sam)
    cli("synth report", fit["id"], dataset=ds)
    srel = tmp / f"synth-{tag}"
    cli("jobs result", fit["id"], "--out", str(srel), dataset=ds)
    cli.file("synth_card.json", srel / "synth_card.json", ds)
    cli("jobs status", fit["id"], dataset=ds)
    cli("jobs list", dataset=ds)
    cli("budget", "readmission", dataset=ds)


def test_every_number_a_researcher_sees_is_listed(
    zone: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    _in_process(monkeypatch)
    cli = Cli(capsys, zone["zone"], zone["rita"], zone["sam"])
    for ds in (PUBLIC, PRIVATE):
        researcher_session(cli, tmp_path, ds)
    problems = check(cli.seen, dump=True)
    assert not problems, "\n".join(problems)
