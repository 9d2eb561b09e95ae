"""Ingest: pseudonyms, dropped identifiers, contract checks naming column and row, atomicity."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from connectors.cohort import Canaries, cohort_contract, generate_cohort, write_cohort
from connectors.governed_file import DATA_FILE, METADATA_KEY
from connectors.ingest import IngestReport, ingest_file, ingest_table, pseudonym
from connectors.schema import SchemaContract
from foundation.errors import SchemaError, SpecError

SECRET = b"zone-secret-for-tests-0123456789"
OTHER_SECRET = b"another-zone-secret-9876543210ab"
N = 600
CANARIES = Canaries.make(21)


@pytest.fixture(scope="module")
def source() -> pa.Table:
    return generate_cohort(N, seed=5, canaries=CANARIES)


@pytest.fixture(scope="module")
def governed(source: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> IngestReport:
    return ingest_table(source, cohort_contract(), tmp_path_factory.mktemp("g") / "ds", SECRET)


def _all_text(table: pa.Table) -> str:
    """Every decoded value of every column, as text."""
    return "\n".join(
        "\n".join(str(v) for v in pc.cast(table[name], pa.string()).to_pylist())
        for name in table.column_names
    )


def _messages(err: BaseException) -> str:
    """The error's text and everything chained to it (a traceback would show all of it)."""
    parts = []
    seen: BaseException | None = err
    while seen is not None:
        parts.append(f"{seen!s} {seen!r}")
        seen = seen.__cause__ or seen.__context__
    return " ".join(parts)


def _csv(tmp_path: Path, rows: int = 40, seed: int = 3) -> tuple[Path, list[str]]:
    path = write_cohort(tmp_path / "src.csv", rows, seed=seed, canaries=CANARIES, format="csv")
    return path, path.read_text().splitlines()


def _set_cell(path: Path, lines: list[str], data_row: int, column: str, text: str) -> None:
    """Replace one cell of a CSV written by write_cohort (its values hold no commas)."""
    header = lines[0].split(",")
    cells = lines[data_row].split(",")
    cells[header.index(f'"{column}"')] = text
    lines = [*lines[:data_row], ",".join(cells), *lines[data_row + 1 :]]
    path.write_text("\n".join(lines) + "\n")


# --- the governed output -----------------------------------------------------------------------


def test_report_and_layout(governed: IngestReport, source: pa.Table) -> None:
    assert governed.rows == N and governed.persons == N
    assert sum(governed.sites.values()) == N
    expected_sites = pc.value_counts(source["hospital"])
    assert governed.sites == dict(
        zip(
            expected_sites.field("values").to_pylist(),
            expected_sites.field("counts").to_pylist(),
            strict=True,
        )
    )
    assert governed.path.name == DATA_FILE and governed.path.is_file()
    assert list(governed.path.parent.iterdir()) == [governed.path]
    schema = pq.read_schema(governed.path)
    assert schema.remove_metadata() == cohort_contract().governed_arrow_schema()
    assert governed.columns == tuple(schema.names)
    assert json.loads(schema.metadata[METADATA_KEY])["persons"] == N
    json.dumps(governed.to_dict())


def test_rows_sorted_by_site_and_row_groups_never_span_sites(governed: IngestReport) -> None:
    table = pq.read_table(governed.path)
    sites = table["hospital"].to_pylist()
    assert sites == sorted(sites)
    metadata = pq.read_metadata(governed.path)
    site_index = table.schema.get_field_index("hospital")
    for i in range(metadata.num_row_groups):
        stats = metadata.row_group(i).column(site_index).statistics
        assert stats.has_min_max and stats.min == stats.max


def test_identifier_is_a_keyed_pseudonym(
    governed: IngestReport, source: pa.Table, tmp_path: Path
) -> None:
    table = pq.read_table(governed.path)
    pseudonyms = set(table["subject_id"].to_pylist())
    expected = {pseudonym(v, SECRET) for v in source["subject_id"].to_pylist()}
    assert pseudonyms == expected
    assert all(len(p) == 64 and int(p, 16) >= 0 for p in pseudonyms)
    # it is an HMAC-SHA256 under the secret (with the documented domain prefix), not a bare hash
    one = source["subject_id"][0].as_py()
    assert (
        pseudonym(one, SECRET)
        == hmac.new(
            SECRET, b"safe-zone/pseudonym/v1\x00" + one.encode(), hashlib.sha256
        ).hexdigest()
    )
    assert pseudonym(one, SECRET) != hashlib.sha256(one.encode()).hexdigest()
    again = ingest_table(source, cohort_contract(), tmp_path / "again", SECRET)
    assert set(pq.read_table(again.path)["subject_id"].to_pylist()) == pseudonyms
    other = ingest_table(source, cohort_contract(), tmp_path / "other", OTHER_SECRET)
    assert set(pq.read_table(other.path)["subject_id"].to_pylist()).isdisjoint(pseudonyms)


def test_no_identifying_canary_reaches_governed_files(governed: IngestReport) -> None:
    raw = governed.path.read_bytes()
    decoded = _all_text(pq.read_table(governed.path))
    for field in ("subject_id", "patient_name", "address", "phone"):
        value = getattr(CANARIES, field)
        assert value.encode() not in raw, field
        assert value not in decoded, field
    for name in ("patient_name", "address", "phone"):
        assert name not in pq.read_schema(governed.path).names
    # values outside a declared vocabulary are kept (they map to "other" later)
    assert CANARIES.primary_dx in decoded and CANARIES.ethnicity in decoded


def test_csv_parquet_and_table_sources_agree(tmp_path: Path, source: pa.Table) -> None:
    write_cohort(tmp_path / "s.csv", N, seed=5, canaries=CANARIES, format="csv")
    write_cohort(tmp_path / "s.parquet", N, seed=5, canaries=CANARIES, format="parquet")
    a = ingest_file(tmp_path / "s.csv", cohort_contract(), tmp_path / "a", SECRET)
    b = ingest_file(tmp_path / "s.parquet", cohort_contract(), tmp_path / "b", SECRET)
    c = ingest_table(source, cohort_contract(), tmp_path / "c", SECRET)
    assert pq.read_table(a.path).equals(pq.read_table(c.path))
    assert pq.read_table(b.path).equals(pq.read_table(c.path))
    assert (a.rows, a.persons, a.sites) == (c.rows, c.persons, c.sites)


# --- contract breaches name column and row, never the value ------------------------------------


@pytest.mark.parametrize(
    ("column", "text", "problem"),
    [
        ("age", f'"{CANARIES.patient_name}"', "does not parse"),
        ("age", "500", "outside the declared domain"),
        ("readmitted_30d", "2", "outside the declared domain"),
        ("diabetes", "1.5", "does not parse"),
        ("admission_date", f'"{CANARIES.address}"', "does not parse"),
        ("cancer", '"maybe"', "does not parse"),
        ("hba1c", "nan", "NaN"),
        ("hospital", "", "missing"),
        ("readmitted_30d", "", "missing"),
        ("subject_id", "", "missing"),
        ("subject_id", '"   "', "blank"),
    ],
)
def test_csv_breach_names_column_and_row(
    tmp_path: Path, column: str, text: str, problem: str
) -> None:
    path, lines = _csv(tmp_path)
    _set_cell(path, lines, 17, column, text)
    dest = tmp_path / "dest"
    with pytest.raises(SchemaError) as err:
        ingest_file(path, cohort_contract(), dest, SECRET)
    message = str(err.value)
    assert err.value.column == column and err.value.row == 17
    assert column in message and "row 17" in message and problem in message
    everything = _messages(err.value)
    for value in (*CANARIES.values(), "maybe", "500", "1.5"):
        assert value not in everything
    assert not dest.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src.csv"]  # no temp dir left behind


def test_repeated_identifier_names_the_repeat(tmp_path: Path) -> None:
    path, lines = _csv(tmp_path)
    first_id = lines[3].split(",")[0]
    _set_cell(path, lines, 9, "subject_id", first_id)
    with pytest.raises(SchemaError) as err:
        ingest_file(path, cohort_contract(), tmp_path / "d", SECRET)
    assert err.value.row == 9 and err.value.column == "subject_id"
    assert first_id.strip('"') not in _messages(err.value)


def test_invalid_utf8_names_column_and_row(tmp_path: Path) -> None:
    path, lines = _csv(tmp_path)
    _set_cell(path, lines, 5, "sex", "@@BAD@@")
    path.write_bytes(path.read_bytes().replace(b"@@BAD@@", b'"\xff\xfe"'))
    with pytest.raises(SchemaError) as err:
        ingest_file(path, cohort_contract(), tmp_path / "d", SECRET)
    assert (err.value.column, err.value.row) == ("sex", 5)
    assert "UTF-8" in str(err.value)


def test_wrong_field_count_names_the_row_not_its_content(tmp_path: Path) -> None:
    path, lines = _csv(tmp_path)
    lines[12] = lines[12] + f',"{CANARIES.phone}"'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SchemaError) as err:
        ingest_file(path, cohort_contract(), tmp_path / "d", SECRET)
    assert err.value.row == 12 and "fields" in str(err.value)
    assert CANARIES.phone not in _messages(err.value)


def test_missing_and_extra_columns_are_refused_by_name(tmp_path: Path, source: pa.Table) -> None:
    with pytest.raises(SchemaError) as err:
        ingest_table(source.drop_columns(["sodium"]), cohort_contract(), tmp_path / "a", SECRET)
    assert err.value.column == "sodium" and "missing" in str(err.value)
    extra = source.append_column("shoe_size", pa.array([42.0] * N))
    with pytest.raises(SchemaError) as err:
        ingest_table(extra, cohort_contract(), tmp_path / "b", SECRET)
    assert err.value.column == "shoe_size" and "not declared" in str(err.value)
    path, lines = _csv(tmp_path)
    lines = [line + ",1" for line in lines]
    lines[0] = lines[0][:-2] + ',"notes"'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SchemaError, match="notes"):
        ingest_file(path, cohort_contract(), tmp_path / "c", SECRET)
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_parquet_source_with_wrong_physical_type_names_row(
    tmp_path: Path, source: pa.Table
) -> None:
    ages = source["age"].to_pylist()
    ages[30] = 44.5  # fine for float64; then the contract says int
    table = source.set_column(source.schema.get_field_index("age"), "age", pa.array(ages))
    pq.write_table(table, tmp_path / "s.parquet")
    contract = SchemaContract.from_dict(
        {
            **cohort_contract().to_dict(),
            "columns": {
                **cohort_contract().to_dict()["columns"],
                "age": {"type": "int16", "role": "feature", "min": 18, "max": 105},
            },
        }
    )
    with pytest.raises(SchemaError) as err:
        ingest_file(tmp_path / "s.parquet", contract, tmp_path / "d", SECRET)
    assert (err.value.column, err.value.row) == ("age", 31)


# --- atomicity and arguments --------------------------------------------------------------------


def test_a_failed_write_leaves_nothing(tmp_path: Path, source: pa.Table) -> None:
    dest = tmp_path / "ds"
    dest.mkdir()  # an empty directory is an acceptable destination
    bad = source.set_column(
        source.schema.get_field_index("sodium"),
        "sodium",
        pc.if_else(
            pc.equal(pa.array(range(N)), N - 1), pa.scalar(999.0, pa.float32()), source["sodium"]
        ),
    )
    with pytest.raises(SchemaError) as err:
        ingest_table(bad, cohort_contract(), dest, SECRET)
    assert err.value.row == N
    assert dest.is_dir() and not any(dest.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    report = ingest_table(source, cohort_contract(), dest, SECRET)  # then it succeeds in place
    assert report.path == dest / DATA_FILE


def test_existing_dataset_is_never_overwritten(governed: IngestReport, source: pa.Table) -> None:
    before = governed.path.read_bytes()
    with pytest.raises(SpecError, match="dest_dir"):
        ingest_table(source, cohort_contract(), governed.path.parent, SECRET)
    assert governed.path.read_bytes() == before


def test_bad_arguments(tmp_path: Path, source: pa.Table) -> None:
    with pytest.raises(SpecError, match="secret"):
        ingest_table(source, cohort_contract(), tmp_path / "a", b"short")
    with pytest.raises(SpecError, match="source"):
        (tmp_path / "x.json").write_text("{}")
        ingest_file(tmp_path / "x.json", cohort_contract(), tmp_path / "b", SECRET)


# --- contracts with several rows per person, integer ids, no site ------------------------------

MANY = """
[dataset]
rows_per_person = "many"
[columns.pid]
type = "int64"
role = "identifier"
[columns.site]
type = "string"
role = "site"
[columns.x]
type = "float32"
role = "feature"
min = 0
max = 10
[columns.y]
type = "bool"
role = "label"
"""


def test_many_rows_per_person_and_integer_ids(tmp_path: Path) -> None:
    contract = SchemaContract.from_toml_text(MANY)
    table = pa.table(
        {
            "pid": pa.array([3, 1, 3, 2, 1, 3], pa.int64()),
            "site": ["b", "a", "a", "b", "b", "a"],
            "x": pa.array([1, 2, 3, 4, 5, None], pa.float32()),
            "y": [True, False, True, False, False, True],
        }
    )
    report = ingest_table(table, contract, tmp_path / "m", SECRET)
    assert (report.rows, report.persons, report.sites) == (6, 3, {"a": 3, "b": 3})
    out = pq.read_table(report.path)
    assert set(out["pid"].to_pylist()) == {pseudonym(str(i), SECRET) for i in (1, 2, 3)}
    keys = list(zip(out["site"].to_pylist(), out["pid"].to_pylist(), strict=True))
    assert keys == sorted(keys)
    with pytest.raises(SchemaError) as err:
        ingest_table(
            table,
            SchemaContract.from_toml_text(MANY.replace('"many"', '"one"')),
            tmp_path / "o",
            SECRET,
        )
    assert (err.value.column, err.value.row) == ("pid", 3)


def test_contract_without_identifier_or_site(tmp_path: Path) -> None:
    contract = SchemaContract.from_toml_text(
        '[columns.x]\ntype = "float64"\nrole = "feature"\nmin = 0\nmax = 1\n'
        '[columns.y]\ntype = "int8"\nrole = "label"\n'
    )
    report = ingest_table(
        pa.table({"y": pa.array([0, 1], pa.int8()), "x": [0.5, None]}),
        contract,
        tmp_path / "n",
        SECRET,
    )
    assert (report.rows, report.persons, report.sites) == (2, 2, {})
    assert pq.read_table(report.path).num_rows == 2


def test_headerless_csv_echoes_nothing(tmp_path: Path) -> None:
    path, lines = _csv(tmp_path)
    path.write_text("\n".join(lines[1:]) + "\n")  # the first data row now sits where a header goes
    with pytest.raises(SchemaError) as err:
        ingest_file(path, cohort_contract(), tmp_path / "d", SECRET)
    assert "header" in str(err.value)
    first_row = [cell.strip('"') for cell in lines[1].split(",")]
    assert not any(cell and cell in _messages(err.value) for cell in first_row if len(cell) > 3)
