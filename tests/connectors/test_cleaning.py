"""Cleaning declared in the contract (``connectors.cleaning_rules``, ``connectors.cleaning``):
each key does what it says, counts what it changed, and a contract that misuses one is
refused naming the key and the fix. ``check_file`` lists every violation in one pass."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from connectors.ingest import check_file, ingest_table
from connectors.schema import SchemaContract
from foundation.errors import SchemaError

SECRET = b"s" * 32

BASE = """
[dataset]
rows_per_person = "many"
{dataset}
[columns.pid]
type = "string"
role = "identifier"
[columns.site]
type = "string"
role = "site"
categories = ["North", "South"]
{site}
[columns.when]
type = "date32"
role = "feature"
{when}
[columns.age]
type = "int16"
role = "feature"
min = 0
max = 110
{age}
[columns.sex]
type = "string"
role = "feature"
categories = ["F", "M"]
{sex}
[columns.y]
type = "int8"
role = "label"
"""


def contract(**keys: str) -> SchemaContract:
    parts = {k: keys.get(k, "") for k in ("dataset", "site", "when", "age", "sex")}
    return SchemaContract.from_toml_text(BASE.format(**parts))


def table(**overrides: list[object]) -> pa.Table:
    cols: dict[str, list[object]] = {
        "pid": ["a", "a", "b", "c"],
        "site": ["North", "North", "South", "South"],
        "when": ["2024-01-02", "2024-03-04", "2024-05-06", "2024-07-08"],
        "age": ["40", "41", "50", "60"],
        "sex": ["F", "F", "M", "M"],
        "y": ["0", "1", "0", "1"],
    }
    cols.update(overrides)
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


def check(t: pa.Table, c: SchemaContract, tmp_path: Path) -> object:
    path = tmp_path / "src.parquet"
    import pyarrow.parquet as pq

    pq.write_table(t, path)
    return check_file(path, c)


def test_na_values_of_the_dataset_and_the_column_become_missing(tmp_path: Path) -> None:
    c = contract(dataset='na_values = ["NA"]', age='na_values = ["unknown"]')
    r = check(table(age=["NA", "unknown", "50", "?"]), c, tmp_path)
    assert r.cleaned["age"] == {"na_values": 2}  # type: ignore[attr-defined]
    (v,) = r.violations  # type: ignore[attr-defined]
    assert v.column == "age" and v.count == 1 and v.rows == (4,) and "na_values" in v.fix


def test_date_format_parses_and_names_itself_when_a_row_does_not(tmp_path: Path) -> None:
    c = contract(when='date_format = "%d/%m/%Y"')
    r = check(table(when=["02/01/2024", "31/12/2024", "2024-05-06", None]), c, tmp_path)
    (v,) = r.violations  # type: ignore[attr-defined]
    assert v.column == "when" and v.rows == (3,) and "%d/%m/%Y" in v.problem
    plain = check(table(when=["02/01/2024", "2024-03-04", "x", "2024-07-08"]), contract(), tmp_path)
    (v,) = plain.violations  # type: ignore[attr-defined]
    assert v.count == 2 and v.rows == (1, 3) and "ISO 8601" in v.problem
    assert "date_format" in v.fix


def test_normalize_and_aliases_store_the_declared_spelling_and_count_each(
    tmp_path: Path,
) -> None:
    c = contract(
        sex='normalize = "strip-lower"\naliases = { F = ["female"], M = ["male", "man"] }',
        site='normalize = "strip-lower"\naliases = { North = ["N. Gen"] }',
    )
    t = table(sex=[" f", "Female", "MAN", "M"], site=["north ", "n. gen", "South", "SOUTH"])
    report = ingest_table(t, c, tmp_path / "d", SECRET)
    assert report.cleaned["sex"] == {"normalized": 1, "aliased": 2}
    assert report.cleaned["site"] == {"normalized": 2, "aliased": 1}
    assert report.sites == {"North": 2, "South": 2}


def test_outside_clip_null_and_reject_on_numbers(tmp_path: Path) -> None:
    ages = ["-3", "130", "50", "60"]
    clipped = ingest_table(
        table(age=ages), contract(age='outside = "clip"'), tmp_path / "c", SECRET
    )
    assert clipped.cleaned["age"] == {"clipped": 2}
    nulled = check(table(age=ages), contract(age='outside = "null"'), tmp_path)
    assert nulled.ok and nulled.cleaned["age"] == {"nulled": 2}  # type: ignore[attr-defined]
    for keys in ({}, {"age": 'outside = "reject"'}):
        r = check(table(age=ages), contract(**keys), tmp_path)
        (v,) = r.violations  # type: ignore[attr-defined]
        assert v.count == 2 and v.rows == (1, 2) and "[0, 110]" in v.problem


def test_categories_outside_the_vocabulary_are_counted_refused_or_nulled(
    tmp_path: Path,
) -> None:
    stray = table(sex=["F", "x", "y", "M"])
    assert check(stray, contract(), tmp_path).cleaned == {"sex": {"other": 2}}  # type: ignore[attr-defined]
    nulled = check(stray, contract(sex='outside = "null"'), tmp_path)
    assert nulled.cleaned == {"sex": {"nulled": 2}}  # type: ignore[attr-defined]
    refused = check(stray, contract(sex='outside = "reject"'), tmp_path)
    assert [v.rows for v in refused.violations] == [(2, 3)]  # type: ignore[attr-defined]


def test_a_site_outside_its_declared_categories_is_refused(tmp_path: Path) -> None:
    r = check(table(site=["North", "north", "East", "South"]), contract(), tmp_path)
    (v,) = r.violations  # type: ignore[attr-defined]
    assert v.column == "site" and v.count == 2 and "aliases" in v.fix


def test_every_violation_comes_back_in_one_pass_and_ingest_refuses_with_all(
    tmp_path: Path,
) -> None:
    t = table(
        pid=["a", None, "b", "c"],
        when=["bad", "2024-01-01", "2024-01-01", "2024-01-01"],
        age=["1", "2", "300", "x"],
        y=["0", "1", "2", "0"],
    )
    r = check(t, contract(), tmp_path)
    assert [(v.column, v.count) for v in r.violations] == [  # type: ignore[attr-defined]
        ("pid", 1),
        ("when", 1),
        ("age", 1),
        ("age", 1),
        ("y", 1),
    ]
    with pytest.raises(SchemaError) as err:
        ingest_table(t, contract(), tmp_path / "d", SECRET)
    assert "5 ways" in str(err.value) and err.value.column == "pid" and err.value.row == 2
    assert not (tmp_path / "d").exists()
    for value in ("bad", "300"):
        assert value not in str(err.value)


@pytest.mark.parametrize(
    ("keys", "key", "fix"),
    [
        ({"age": 'date_format = "%Y"'}, "columns.age.date_format", "remove date_format"),
        ({"when": 'date_format = "Y-m-d"'}, "columns.when.date_format", "%d/%m/%Y"),
        ({"age": 'normalize = "strip-lower"'}, "columns.age.normalize", "categories"),
        ({"sex": 'aliases = { X = ["x"] }'}, "columns.sex.aliases.X", "declared category"),
        (
            {"sex": 'normalize = "strip-lower"\naliases = { F = ["m"] }'},
            "columns.sex.aliases",
            "one category",
        ),
        ({"sex": 'outside = "clip"'}, "columns.sex.outside", '"null" or "reject"'),
        ({"site": 'outside = "null"'}, "columns.site.outside", "remove outside"),
        ({"age": 'outside = "drop"'}, "columns.age.outside", '"clip"'),
        ({"age": 'outside = "null"\nnullable = false'}, "columns.age.outside", "allow nulls"),
        ({"age": "na_values = 3"}, "columns.age.na_values", "na_values ="),
        ({"dataset": 'keep = "middle"'}, "dataset.keep", '"last"'),
        ({"dataset": 'order_by = "nowhere"'}, "dataset.order_by", "date or number"),
        ({"dataset": 'order_by = "sex"'}, "dataset.order_by", "admission date"),
    ],
)
def test_a_misused_cleaning_key_is_refused_naming_key_and_fix(
    keys: dict[str, str], key: str, fix: str
) -> None:
    with pytest.raises(SchemaError) as err:
        contract(**keys)
    assert key in str(err.value) and fix in str(err.value)


def test_cleaning_keys_round_trip_and_stay_out_of_contracts_without_them() -> None:
    c = contract(
        dataset='na_values = ["NA"]\nkeep = "last"\norder_by = "when"',
        when='date_format = "%d/%m/%Y"',
        sex='normalize = "strip-lower"\naliases = { F = ["female"] }\noutside = "null"',
        age='outside = "clip"',
    )
    assert SchemaContract.from_dict(c.to_dict()) == c
    plain = contract().to_dict()
    assert set(plain["dataset"]) == {"rows_per_person"}
    assert all(
        not {"na_values", "date_format", "normalize", "aliases", "outside"} & set(col)
        for col in plain["columns"].values()
    )


@pytest.mark.parametrize(("keep", "first_when"), [("first", "2024-01-02"), ("last", "2024-03-04")])
def test_keep_orders_a_persons_rows_so_the_one_that_counts_is_stored_first(
    tmp_path: Path, keep: str, first_when: str
) -> None:
    import pyarrow.parquet as pq

    for order in ("", '\norder_by = "when"'):
        dest = tmp_path / f"{keep}{bool(order)}"
        # person a's rows in the source: the later visit second
        report = ingest_table(table(), contract(dataset=f'keep = "{keep}"{order}'), dest, SECRET)
        stored = pq.read_table(report.path).to_pandas()
        a = stored[stored["pid"] == stored["pid"].iloc[0]]
        assert str(a["when"].iloc[0]) == first_when
