"""The schema contract: parsing, validation messages, round trips and a fuzz of the parser."""

from __future__ import annotations

import json
import string

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.schema import RowsPerPerson, SchemaContract
from connectors.schema_columns import TYPE_NAMES, ColumnSpec, Role
from foundation.errors import NotFoundError, SchemaError

CANARY = "CANARY-5c1e0d9a77b2f3e4"

EXAMPLE = """
[dataset]
description = "two hospitals"
rows_per_person = "many"

[columns.subject_id]
type = "string"
role = "identifier"

[columns.name]
type = "string"
role = "direct-identifier"

[columns.hospital]
type = "string"
role = "site"

[columns.age]
type = "float64"
role = "feature"
min = 0
max = 110
fill = 50
missing_rate = 0.0

[columns.sex]
type = "string"
role = "feature"
categories = ["F", "M", "X"]

[columns.seen_on]
type = "date32"
role = "feature"

[columns.ethnicity]
type = "string"
role = "sensitive"

[columns.readmitted_30d]
type = "int8"
role = "label"
positive_rate = 0.15
"""


def test_example_parses_with_every_fact() -> None:
    c = SchemaContract.from_toml_text(EXAMPLE)
    assert c.rows_per_person is RowsPerPerson.MANY
    assert c.description == "two hospitals"
    assert c.identifier == "subject_id"
    assert c.site == "hospital"
    assert c.feature_names() == ("age", "sex")  # the date is not a usable feature
    assert c.label_names() == ("readmitted_30d",)
    age = c.column("age")
    assert (age.min, age.max, age.fill, age.missing_rate) == (0.0, 110.0, 50.0, 0.0)
    assert age.role is Role.FEATURE and age.arrow_type == pa.float64()
    assert c.column("sex").categories == ("F", "M", "X")
    assert c.column("readmitted_30d").positive_rate == 0.15


def test_governed_schema_drops_direct_identifiers_and_hashes_the_person() -> None:
    c = SchemaContract.from_toml_text(EXAMPLE)
    governed = c.governed_arrow_schema()
    assert "name" not in governed.names
    assert governed.field("subject_id").type == pa.string()
    for required in ("subject_id", "hospital", "readmitted_30d"):
        assert not governed.field(required).nullable
    assert governed.field("age").nullable
    source = c.source_arrow_schema()
    assert source.names == list(c.names)
    assert source.field("name").type == pa.string()
    assert source.field("seen_on").type == pa.date32()


def test_dict_round_trip_is_json_safe_and_equal() -> None:
    c = SchemaContract.from_toml_text(EXAMPLE)
    d = json.loads(json.dumps(c.to_dict()))
    assert SchemaContract.from_dict(d) == c


def test_integer_identifier_and_defaults() -> None:
    c = SchemaContract.from_toml_text(
        '[columns.pid]\ntype = "int64"\nrole = "identifier"\n'
        '[columns.y]\ntype = "bool"\nrole = "label"\n'
    )
    assert c.rows_per_person is RowsPerPerson.ONE
    assert c.governed_arrow_schema().field("pid").type == pa.string()
    assert c.site is None


def test_unknown_column_lists_known_ones() -> None:
    c = SchemaContract.from_toml_text(EXAMPLE)
    with pytest.raises(NotFoundError) as err:
        c.column("shoe_size")
    assert "shoe_size" in str(err.value) and "age" in str(err.value)


def test_column_spec_validates_direct_construction() -> None:
    spec = ColumnSpec("age", "float64", "feature", min=0, max=1)  # type: ignore[arg-type]
    assert spec.role is Role.FEATURE and spec.min == 0.0
    with pytest.raises(SchemaError, match="columns.age.min"):
        ColumnSpec("age", "float64", Role.FEATURE)


def _one(name: str, body: str, extra: str = "") -> str:
    return f"[columns.{name}]\n{body}\n{extra}"


BAD = [
    (_one("a", 'type = "string"\nrole = "boss"'), "columns.a.role"),
    (_one("a", 'type = "text"\nrole = "feature"'), "columns.a.type"),
    (_one("a", 'type = "float64"\nrole = "feature"\nmin = 5\nmax = 5'), "columns.a.min"),
    (_one("a", 'type = "float64"\nrole = "feature"'), "columns.a.min"),
    (_one("a", 'type = "float64"\nrole = "feature"\nmin = 1'), "columns.a.max"),
    (_one("a", 'type = "string"\nrole = "feature"'), "columns.a.categories"),
    (
        _one("a", 'type = "int8"\nrole = "feature"\nmin = 0\nmax = 1\ncategories = ["x"]'),
        "columns.a.categories",
    ),
    (
        _one("a", 'type = "string"\nrole = "identifier"')
        + _one("b", 'type = "string"\nrole = "identifier"'),
        "columns.b.role",
    ),
    (
        _one("a", 'type = "string"\nrole = "site"') + _one("b", 'type = "string"\nrole = "site"'),
        "columns.b.role",
    ),
    (_one("y", 'type = "float64"\nrole = "label"'), "columns.y.type"),
    (_one("y", 'type = "int8"\nrole = "label"\nnullable = true'), "columns.y.nullable"),
    (_one("a", 'type = "float64"\nrole = "feature"\nmin = 0\nmax = 1\nfill = 2'), "columns.a.fill"),
    (
        _one("a", 'type = "float64"\nrole = "feature"\nmin = 0\nmax = 1\nmissing_rate = 1.5'),
        "columns.a.missing_rate",
    ),
    (
        _one("a", 'type = "float64"\nrole = "feature"\nmin = 0\nmax = 1\npositive_rate = 0.1'),
        "columns.a.positive_rate",
    ),
    (_one("a", 'type = "float64"\nrole = "feature"\nmin = true\nmax = 1'), "columns.a.min"),
    (_one("a", 'type = "float64"\nrole = "feature"\nmin = nan\nmax = 1'), "columns.a.min"),
    (_one("a", 'type = "float64"\nrole = "feature"\nmin = -inf\nmax = 1'), "columns.a.min"),
    (
        _one("a", 'type = "float64"\nrole = "feature"\nmin = 0\nmax = 1\ncolour = "red"'),
        "columns.a.colour",
    ),
    (_one("a", 'role = "feature"'), "columns.a.type"),
    (_one("a", 'type = "string"'), "columns.a.role"),
    (_one("a", 'type = "string"\nrole = "site"\nnullable = "no"'), "columns.a.nullable"),
    (
        _one("a", 'type = "string"\nrole = "feature"\ncategories = ["x", "x"]'),
        "columns.a.categories",
    ),
    (_one("a", 'type = "string"\nrole = "feature"\ncategories = "x"'), "columns.a.categories"),
    (_one("a", 'type = "string"\nrole = "site"\nmin = 0\nmax = 1'), "columns.a.min"),
    (_one("a__b", 'type = "string"\nrole = "sensitive"'), "columns.a__b"),
    (
        '[dataset]\nrows_per_person = "many"\n' + _one("a", 'type = "string"\nrole = "sensitive"'),
        "dataset.rows_per_person",
    ),
    (
        '[dataset]\nrows_per_person = "some"\n' + _one("a", 'type = "string"\nrole = "sensitive"'),
        "dataset.rows_per_person",
    ),
    (
        '[dataset]\nowner = "x"\n' + _one("a", 'type = "string"\nrole = "sensitive"'),
        "dataset.owner",
    ),
    ("version = 2\n" + _one("a", 'type = "string"\nrole = "sensitive"'), "version"),
    ("[dataset]\n", "columns"),
    ("columns = 3\n", "columns"),
    ("[columns]\na = 3\n", "columns.a"),
]


@pytest.mark.parametrize(("text", "key"), BAD)
def test_each_breach_names_its_key_and_a_fix(text: str, key: str) -> None:
    with pytest.raises(SchemaError) as err:
        SchemaContract.from_toml_text(text)
    message = str(err.value)
    assert key in message
    assert "(fix:" in message


def test_malformed_toml_names_the_line_without_echoing_it() -> None:
    text = f'[columns.a]\ntype = "string"\nrole = "feature"\ncategories = ["x"]\n{CANARY} oops\n'
    with pytest.raises(SchemaError) as err:
        SchemaContract.from_toml_text(text)
    assert "line 5" in str(err.value)
    assert CANARY not in str(err.value)
    assert err.value.__cause__ is None  # the parser's own message is not chained


@pytest.mark.parametrize(
    "body",
    [
        f'type = "string"\nrole = "{CANARY}"',
        f'type = "{CANARY}"\nrole = "feature"',
        f'type = "string"\nrole = "feature"\ncategories = ["{CANARY}", "{CANARY}"]',
        f'type = "int8"\nrole = "feature"\nmin = 0\nmax = 1\nfill = "{CANARY}"',
        f'type = "string"\nrole = "feature"\ncategories = ["x"]\ndescription = 5\nnote = "{CANARY}"',
    ],
)
def test_errors_never_echo_values(body: str) -> None:
    with pytest.raises(SchemaError) as err:
        SchemaContract.from_toml_text(_one("a", body))
    assert CANARY not in str(err.value)


# --- fuzz: any input gives either a contract or a SchemaError, never another exception ------


def _parse_or_schema_error(text: str) -> None:
    try:
        contract = SchemaContract.from_toml_text(text)
    except SchemaError as err:
        assert str(err)
        return
    # whatever parsed must be a usable contract
    assert contract.columns
    contract.governed_arrow_schema()
    assert SchemaContract.from_dict(json.loads(json.dumps(contract.to_dict()))) == contract


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_any_text(text: str) -> None:
    _parse_or_schema_error(text)


_KEYS = [
    "type",
    "role",
    "min",
    "max",
    "categories",
    "fill",
    "missing_rate",
    "positive_rate",
    "nullable",
    "description",
    "colour",
]
_TOML_VALUES = st.one_of(
    st.sampled_from([*(f'"{t}"' for t in TYPE_NAMES), *(f'"{r.value}"' for r in Role)]),
    st.sampled_from(
        [
            "0",
            "1",
            "-3",
            "2.5",
            "1e400",
            "nan",
            "inf",
            "true",
            "false",
            '"x"',
            '["F", "M"]',
            '["a", "a"]',
            "[]",
            "[1, 2]",
            "1979-05-27",
            "{ a = 1 }",
            "99999999999999999999",
        ]
    ),
    st.text(alphabet=string.ascii_letters + string.digits + ' "[],.=-_', max_size=12),
)


@st.composite
def _near_valid_toml(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        per_person = draw(st.sampled_from(['"one"', '"many"', "1", '"x"']))
        lines += ["[dataset]", f"rows_per_person = {per_person}"]
    for i in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from([f"c{i}", "a__b", "age", '"sp ace"', "y=1"]))
        lines.append(f"[columns.{name}]")
        for key in draw(st.lists(st.sampled_from(_KEYS), max_size=6, unique=True)):
            lines.append(f"{key} = {draw(_TOML_VALUES)}")
    return "\n".join(lines) + "\n"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_near_valid_toml())
def test_fuzz_near_valid_contracts(text: str) -> None:
    _parse_or_schema_error(text)


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["dataset", "columns", "x"]),
        st.one_of(
            _JSONISH,
            st.dictionaries(
                st.sampled_from(["a", "b"]), st.dictionaries(st.sampled_from(_KEYS), _JSONISH)
            ),
        ),
    )
)
def test_fuzz_from_dict(data: dict) -> None:
    try:
        SchemaContract.from_dict(data)
    except SchemaError:
        pass
