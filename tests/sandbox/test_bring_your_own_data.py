"""Bring your own data, through the installed ``sandbox`` (issue 13, items 2 and 3).

The messy extract of ``messy_extract`` (3,000 visits of 1,099 patients at three sites:
several visits each, ``NA``, sexes and sites spelt many ways, ages of 130, negative stays)
is checked against the contract a steward writes first (every violation in one pass,
nothing written), then ingests in one run from the contract that declares its cleaning,
with a report of what was cleaned: counts per column, never a value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_runner import last_json, ok, sandbox
from factories import make_world
from messy_extract import (
    AGE_130,
    NEGATIVE_STAYS,
    PATIENTS,
    STRAY_SEX,
    VISITS,
    extract_csv_text,
    extract_rows,
    write_extract,
)

from connectors.governed_file import _data_file, open_decryption
from sandbox.backend import InProcessBackend

SHIPPED = Path(__file__).resolve().parents[2] / "docs" / "examples"


def read_governed_table(path: str) -> pa.Table:
    """Every stored row of a governed dataset, in storage order (decrypted with its key)."""
    file = _data_file(Path(path), "visits")
    crypt = open_decryption(file, "visits")
    return pq.read_table(file, decryption_properties=None if crypt is None else crypt.properties)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    w = make_world(tmp_path_factory.mktemp("byod") / "zone", InProcessBackend(), patients=300)
    yield w
    w.svc.close()


@pytest.fixture(scope="module")
def extract(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return write_extract(tmp_path_factory.mktemp("extract"))


def test_check_lists_every_violation_in_one_pass_and_writes_nothing(
    extract: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    csv_path, _, strict = extract
    before = sorted(p.name for p in csv_path.parent.iterdir())
    proc = sandbox("dataset", "check", str(csv_path), "--schema", str(strict), zone=tmp_path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    text = " ".join(proc.stdout.split())
    assert "would be refused" in text and "5 violations" in text
    js = sandbox(
        "dataset", "check", str(csv_path), "--schema", str(strict), "--json", zone=tmp_path
    )
    assert js.returncode == 1
    report = last_json(js)
    assert report["ok"] is False and report["rows"] == VISITS
    found = {v["column"]: v for v in report["violations"]}
    assert set(found) == {"site", "visit_date", "age", "length_of_stay", "hba1c"}
    assert found["age"]["count"] == AGE_130
    assert found["length_of_stay"]["count"] == NEGATIVE_STAYS
    assert found["visit_date"]["count"] == VISITS  # day-first dates, no date_format
    assert "date_format" in found["visit_date"]["fix"]
    rows = extract_rows()
    assert found["hba1c"]["count"] == sum(r[8] == "NA" for r in rows)
    # the first row numbers are right (1-based data rows) and never more than five
    ages = [i + 1 for i, r in enumerate(rows) if r[5] == "130"]
    assert found["age"]["first_rows"] == ages[:5]
    # stray sexes are not refused, but no longer silent: counted as kept-as-other
    assert report["cleaned"]["sex"]["other"] > 0
    # nothing written, no value echoed (names, phones, the stray texts)
    assert sorted(p.name for p in csv_path.parent.iterdir()) == before
    everything = proc.stdout + proc.stderr + js.stdout
    phone = extract_rows()[0][2]
    for value in ("Nowak", "Okafor", "unknown", "Northfeld", "ST. MARY'S", "Male", phone):
        assert value not in everything, value


def test_the_strict_contract_refuses_ingest_with_the_same_full_list(
    world: Any, extract: tuple[Path, Path, Path]
) -> None:
    csv_path, _, strict = extract
    proc = sandbox(
        "dataset",
        "ingest",
        "strict-visits",
        "--from",
        str(csv_path),
        "--schema",
        str(strict),
        "--json",
        zone=world.root,
        token=world.steward_token,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = last_json(proc)
    assert err["error"] == "schema_error"
    assert "5 ways" in err["message"] and "nothing was written" in err["message"]
    for column in ("site", "visit_date", "age", "length_of_stay", "hba1c"):
        assert f"column '{column}'" in err["message"]
    listed = sandbox("dataset", "list", "--json", zone=world.root, token=world.steward_token)
    assert "strict-visits" not in {d["name"] for d in ok(listed)["datasets"]}


def test_the_cleaning_contract_ingests_in_one_run_with_a_report(
    world: Any, extract: tuple[Path, Path, Path]
) -> None:
    csv_path, contract, _ = extract
    check = sandbox(
        "dataset", "check", str(csv_path), "--schema", str(contract), "--json", zone=world.root
    )
    assert check.returncode == 0 and last_json(check)["ok"] is True

    proc = sandbox(
        "dataset",
        "ingest",
        "visits",
        "--from",
        str(csv_path),
        "--schema",
        str(contract),
        zone=world.root,
        token=world.steward_token,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    text = " ".join(proc.stdout.split())
    assert f"{VISITS} rows, {PATIENTS} persons, 3 sites" in text
    assert "cleaned as the contract declares" in text and "through an alias" in text

    rec = last_json(
        sandbox("dataset", "show", "visits", "--json", zone=world.root, token=world.steward_token)
    )
    assert sorted(rec["sites"]) == ["Northfield", "Royal Infirmary", "St Mary's"]
    assert sum(rec["sites"].values()) == VISITS

    table = read_governed_table(world.svc.store.get_dataset("visits").path)
    assert table.num_rows == VISITS
    assert "name" not in table.column_names and "phone" not in table.column_names
    assert set(table.column("sex").drop_null().to_pylist()) == {"F", "M"}
    assert table.column("age").null_count == AGE_130  # outside = "null"
    assert table.column("length_of_stay").null_count == NEGATIVE_STAYS
    assert table.column("sex").null_count == STRAY_SEX + 25  # "unknown" and "NA"


def test_keep_last_by_visit_date_puts_each_patients_latest_visit_first(world: Any) -> None:
    # ingested by the test above: the reader keeps each person's first stored row, so
    # keep = "last", order_by = "visit_date" must store the latest visit first
    table = read_governed_table(world.svc.store.get_dataset("visits").path).to_pandas()
    firsts = table.groupby("patient_id", sort=False).head(1).set_index("patient_id")
    latest = table.groupby("patient_id")["visit_date"].max()
    assert len(firsts) == PATIENTS
    assert (firsts["visit_date"] == latest.loc[firsts.index]).all()


def test_the_shipped_example_is_the_generated_extract() -> None:
    assert (SHIPPED / "visits.csv").read_text(encoding="utf-8") == extract_csv_text()
    from messy_extract import CONTRACT_TOML

    assert (SHIPPED / "visits.toml").read_text(encoding="utf-8") == CONTRACT_TOML
