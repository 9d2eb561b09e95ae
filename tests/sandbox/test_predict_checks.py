"""``sandbox model predict`` as a user expects (issue 13, item 7): the input's id columns come
back beside each score, and the input is checked against the released preprocessing's
contract as ingest checked the training data: declared cleaning applied and counted, rows that
ingest would refuse left unscored and counted, unknown categories scored as "other" and
counted, each with a warning that names the column and never a value."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_runner import ok, sandbox
from factories import make_world
from messy_extract import write_extract

from connectors.schema import SchemaContract
from sandbox.backend import InProcessBackend
from sandbox.jobspec import parse_job_spec

FEATURES = ["age", "sex", "length_of_stay", "hba1c"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("predict")
    w = make_world(root / "zone", InProcessBackend(), patients=200, grant_epsilon=None)
    svc = w.svc
    csv_path, contract, _ = write_extract(root / "extract")
    svc.ingest_dataset(w.steward, "visits", csv_path, SchemaContract.from_toml_file(contract))
    svc.create_project(w.researcher, "visits-study", "predict")
    req = svc.request_access(
        w.researcher,
        "visits-study",
        "visits",
        [*FEATURES, "readmitted_30d"],
        ["dp-sgd"],
        2.0,
        1e-6,
    )
    svc.approve(w.steward, req.id, expires_at=datetime.now(UTC) + timedelta(days=1))
    spec = parse_job_spec(
        {
            "project": "visits-study",
            "dataset": "visits",
            "label": "readmitted_30d",
            "features": FEATURES,
            "model": {"kind": "logistic", "hidden": []},
            "privacy": {"epsilon": 1.0, "delta": 1e-6, "max_grad_norm": 1.0},
            "training": {"epochs": 1, "batch_size": 128, "lr": 0.05, "seed": 1},
        }
    )
    job = svc.submit(w.researcher, spec)
    assert job.state.value == "succeeded", job.error
    out = root / "release"
    svc.job_result(w.researcher, job.id, out)
    svc.close()
    yield out


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


ROWS = [
    {"mrn": "A1", "age": "64", "sex": "F", "length_of_stay": "3.5", "hba1c": "6.1", "note": "x"},
    {"mrn": "A2", "age": "130", "sex": " male", "length_of_stay": "2", "hba1c": "7", "note": "y"},
    {"mrn": "A3", "age": "50", "sex": "unknown", "length_of_stay": "-2", "hba1c": "5", "note": ""},
    {"mrn": "A4", "age": "70", "sex": "M", "length_of_stay": "1", "hba1c": "25", "note": "z"},
    {"mrn": "A5", "age": "NA", "sex": "Female", "length_of_stay": "4", "hba1c": "NA", "note": "w"},
]


def test_the_ids_come_back_and_bad_rows_are_counted_not_silently_scored(
    release: Path, tmp_path: Path
) -> None:
    plan = json.loads((release / "preprocessing.json").read_text())
    sex = next(s for s in plan["steps"] if s["name"] == "sex")
    assert sex["cleaning"]["aliases"] == {"F": ["female"], "M": ["male"]}  # the release carries it

    src = write_rows(tmp_path / "new.csv", ROWS)
    scores = tmp_path / "scores.parquet"
    proc = sandbox(
        "model", "predict", str(release), "--from", str(src), "--out", str(scores), zone=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "scored 4 of 5 rows" in text and "beside each score: mrn" in text
    # hba1c 25 is outside [3, 20] and the contract says reject: not scored, named by row
    assert "not scored: column 'hba1c': 1 row lies outside the declared domain [3, 20]" in text
    assert "data row 4" in text
    assert "column 'age': 1 row outside the domain or vocabulary, now missing" in text
    assert "column 'sex': 2 rows matched a category through an alias" in text
    said = (proc.stdout + proc.stderr).replace(str(tmp_path), "")
    for value in ("130", "unknown", "Female", "25.0", " 25"):
        assert value not in said

    table = pq.read_table(scores)
    assert table.column_names == ["mrn", "score"]  # "note" is not an id: never copied
    assert table.column("mrn").to_pylist() == ["A1", "A2", "A3", "A4", "A5"]
    got = table.column("score").to_pylist()
    assert got[3] is None and all(0.0 < s < 1.0 for i, s in enumerate(got) if i != 3)


def test_id_names_the_columns_and_json_reports_every_count(release: Path, tmp_path: Path) -> None:
    src = write_rows(tmp_path / "new.csv", ROWS)
    scores = tmp_path / "scores.parquet"
    out = ok(
        sandbox(
            "model",
            "predict",
            str(release),
            "--from",
            str(src),
            "--out",
            str(scores),
            "--id",
            "mrn",
            "--id",
            "note",
            "--json",
            zone=tmp_path,
        )
    )
    assert out["rows"] == 5 and out["scored"] == 4 and out["passed_through"] == ["mrn", "note"]
    assert [(v["column"], v["count"], v["first_rows"]) for v in out["not_scored"]] == [
        ("hba1c", 1, [4])
    ]
    assert out["cleaned"]["sex"] == {"aliased": 2, "nulled": 1}
    assert out["cleaned"]["length_of_stay"] == {"nulled": 1}
    assert pq.read_table(scores).column_names == ["mrn", "note", "score"]
    # a file without an id-like column gets row numbers to join back on
    plain = write_rows(
        tmp_path / "plain.csv", [{k: v for k, v in r.items() if k != "mrn"} for r in ROWS]
    )
    ok(
        sandbox(
            "model",
            "predict",
            str(release),
            "--from",
            str(plain),
            "--out",
            str(scores),
            "--json",
            zone=tmp_path,
        )
    )
    assert pq.read_table(scores).column("row").to_pylist() == [1, 2, 3, 4, 5]

    bad = sandbox(
        "model",
        "predict",
        str(release),
        "--from",
        str(src),
        "--out",
        str(scores),
        "--id",
        "nope",
        zone=tmp_path,
    )
    assert bad.returncode == 2 and "--id: 'nope' is not a column" in bad.stderr
