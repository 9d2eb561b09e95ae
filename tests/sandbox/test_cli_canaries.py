"""The whole first slice through the CLI (`--json` everywhere), with canaries planted.

Every command's output, every file the zone wrote outside its governed data folder, the
release, the state database and every error are searched for the planted canary values.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from sandbox.cli.main import main

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
FEATURES = ["age", "sex", "dx_chapter", "diabetes", "hba1c", "creatinine", "prior_admissions"]


class Cli:
    def __init__(self, capsys: Any, zone: Path) -> None:
        self.capsys = capsys
        self.zone = zone
        self.transcript: list[str] = []

    def __call__(
        self, *args: str, token: str | None = None, code: int = 0, zone: bool = True
    ) -> dict[str, Any]:
        argv = [*args, *(["--zone", str(self.zone)] if zone else []), "--json"]
        if token:
            argv += ["--token", token]
        rc = main(argv)
        out, err = self.capsys.readouterr()
        self.transcript += [out, err]
        assert rc == code, (argv, out, err)
        lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else {}


def _canary_values(canaries: Any) -> list[str]:
    vals = list(canaries.values())
    assert len(vals) >= 4
    return vals


def test_cli_first_slice_with_canaries(tmp_path: Path, capsys, ray_local) -> None:
    from connectors.cohort import Canaries, write_cohort

    canaries = Canaries.make(11)
    secrets_ = _canary_values(canaries)
    src = tmp_path / "hospital_extract.csv"
    write_cohort(src, 2500, seed=4, canaries=canaries, format="csv")
    assert all(s in src.read_text() for s in secrets_)  # they really are in the input

    zone = tmp_path / "zone"
    cli = Cli(capsys, zone)
    op = cli("init")["token"]
    sam = cli("user", "add", "sam", "--role", "steward", token=op)["token"]
    rita = cli("user", "add", "rita", "--role", "researcher", token=op)["token"]
    cli("user", "list", token=op)

    ds = cli(
        "dataset",
        "ingest",
        "cohort",
        "--from",
        str(src),
        "--schema",
        str(ROOT / "connectors/cohort_schema.toml"),
        token=sam,
    )
    assert ds["rows"] == 2500
    shown = cli("dataset", "show", "cohort", token=rita)
    assert shown["name"] == "cohort" and "contract" in shown
    cli("dataset", "list", token=rita)

    cli("project", "create", "readmission", "--purpose", "readmission risk", token=rita)
    cols = ",".join([*FEATURES, "readmitted_30d"])
    req = cli(
        "access",
        "request",
        "readmission",
        "--dataset",
        "cohort",
        "--columns",
        cols,
        "--mechanism",
        "dp-sgd",
        "--epsilon",
        "3",
        "--delta",
        "1e-5",
        token=rita,
    )
    pending = cli("access", "list", "--pending", token=sam)
    assert [r["id"] for r in pending["requests"]] == [req["id"]]
    # a denied request shows its reason to the researcher
    req2 = cli(
        "access",
        "request",
        "readmission",
        "--dataset",
        "cohort",
        "--columns",
        "age,readmitted_30d",
        "--epsilon",
        "50",
        token=rita,
    )
    cli(
        "access",
        "deny",
        req2["id"],
        "--reason",
        "epsilon 50 is too high for this purpose",
        token=sam,
    )
    mine = cli("access", "list", token=rita)["requests"]
    assert any(r["state"] == "denied" and "too high" in r["reason"] for r in mine)
    grant = cli("access", "approve", req["id"], "--expires", "2099-01-01", token=sam)
    assert grant["epsilon"] == 3

    job_toml = tmp_path / "job.toml"
    job_toml.write_text(
        f'project = "readmission"\ndataset = "cohort"\nlabel = "readmitted_30d"\nfeatures = {json.dumps(FEATURES)}\n'
        '[model]\nkind = "logistic"\n[privacy]\nepsilon = 1.0\ndelta = 1e-6\nmax_grad_norm = 1.0\n'
        "[training]\nepochs = 2\nbatch_size = 128\nlr = 0.5\nseed = 1\n[resources]\ngpus = 0\n"
    )
    job = cli("submit", str(job_toml), token=rita)
    assert job["state"] == "succeeded"
    # over budget: a clear error, nothing charged
    big = tmp_path / "big.toml"
    big.write_text(job_toml.read_text().replace("epsilon = 1.0", "epsilon = 2.5"))
    err = cli("submit", str(big), token=rita, code=2)
    assert err["error"] == "budget_exceeded"

    assert cli("jobs", "list", token=rita)["jobs"][0]["id"] == job["id"]
    assert cli("jobs", "status", job["id"], token=rita)["state"] == "succeeded"
    rel = tmp_path / "release"
    cli("jobs", "result", job["id"], "--out", str(rel), token=rita)
    scores = tmp_path / "scores.parquet"
    assert (
        cli("model", "predict", str(rel), "--from", str(src), "--out", str(scores), zone=False)[
            "rows"
        ]
        == 2500
    )

    budget = cli("budget", "readmission", token=rita)["budgets"][0]
    assert budget["spent_epsilon"] == pytest.approx(job["result"]["epsilon"])
    assert budget["reserved_epsilon"] == 0
    dummy = cli(
        "synth",
        "dummy",
        "cohort",
        "--rows",
        "200",
        "--out",
        str(tmp_path / "dummy.parquet"),
        token=rita,
    )
    assert dummy["charged_epsilon"] == 0
    q = cli("quote", str(job_toml), "--out", str(tmp_path / "quote"), token=rita)
    assert 0 < q["epsilon"] <= 1.0 and q["plan"]["steps"] > 0
    dry = cli("submit", str(job_toml), "--on", "dummy", token=rita)
    assert dry["result"]["dry_run"] == "dummy"
    assert (
        cli("budget", "readmission", token=rita)["budgets"][0]["spent_epsilon"]
        == budget["spent_epsilon"]
    )
    cli("audit", "list", token=sam)
    assert cli("audit", "verify", token=sam)["ok"] is True
    assert cli("budget", "readmission", token="sz_bogus", code=2)["error"] == "auth_error"

    # a bad CSV: the error names the column and row, never the value
    bad = tmp_path / "bad.csv"
    with src.open(newline="") as fh:
        rows = list(csv.reader(fh))
    rows[3][rows[0].index("age")] = secrets_[0]
    with bad.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    e = cli(
        "dataset",
        "ingest",
        "bad",
        "--from",
        str(bad),
        "--schema",
        str(ROOT / "connectors/cohort_schema.toml"),
        token=sam,
        code=2,
    )
    assert "age" in e["message"]

    # --- search every output for every canary ------------------------------------------------
    haystacks: dict[str, bytes] = {"cli transcript": "\n".join(cli.transcript).encode()}
    for f in [*zone.rglob("*"), *rel.rglob("*"), scores]:
        if (
            f.is_file()
            and "data" not in f.relative_to(zone if f.is_relative_to(zone) else f.parent).parts[:1]
        ):
            if f.suffix in (".db", ".db-wal", ".db-shm"):
                continue
            haystacks[str(f)] = f.read_bytes()
    con = sqlite3.connect(zone / "state.db")
    haystacks["state.db dump"] = "\n".join(con.iterdump()).encode()
    con.close()
    # the scores file holds the user's own id column beside each score (the input file is
    # theirs, outside the zone) and nothing else of theirs: no name, address or phone
    assert pq.read_table(scores).column_names == ["subject_id", "score"]
    own_ids = {canaries.subject_id}
    for where, blob in haystacks.items():
        for s in secrets_:
            if where == str(scores) and s in own_ids:
                continue
            assert s.encode() not in blob, f"canary leaked into {where}"
