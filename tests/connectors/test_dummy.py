"""Dummy data from the contract alone: exact governed schema, declared domains, vocabularies,
missing rates and label rates, and determinism."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.cohort import cohort_contract
from connectors.dummy import DEFAULT_SITES, UNDECLARED_VALUE, dummy_table
from connectors.schema import SchemaContract
from foundation.errors import SpecError

ROWS = 4_000

# A contract with the corners the cohort lacks: a site without a vocabulary, a bool label,
# a timestamp, a string without a vocabulary, a float32 bound that float32 cannot represent,
# a declared "other" category and an integer identifier.
ODD_CONTRACT = """
[columns.pid]
type = "int64"
role = "identifier"

[columns.name]
type = "string"
role = "direct-identifier"

[columns.site]
type = "string"
role = "site"

[columns.ratio]
type = "float32"
role = "feature"
min = 0.1
max = 0.2
missing_rate = 0.5

[columns.colour]
type = "string"
role = "feature"
categories = ["red", "other"]

[columns.note]
type = "string"
role = "sensitive"

[columns.seen_at]
type = "timestamp[ms]"
role = "feature"
missing_rate = 0.1

[columns.flag]
type = "bool"
role = "feature"

[columns.outcome]
type = "bool"
role = "label"
positive_rate = 0.3
"""


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    values, counts = np.unique(
        np.asarray(column.drop_null().to_pylist(), dtype=object), return_counts=True
    )
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


@pytest.fixture(scope="module")
def cohort_dummy() -> pa.Table:
    return dummy_table(cohort_contract(), ROWS, seed=3)


def test_schema_is_exactly_the_governed_schema(cohort_dummy: pa.Table) -> None:
    contract = cohort_contract()
    assert cohort_dummy.schema == contract.governed_arrow_schema()
    assert cohort_dummy.num_rows == ROWS
    for name in ("patient_name", "address", "phone"):
        assert name not in cohort_dummy.column_names
    odd = SchemaContract.from_toml_text(ODD_CONTRACT)
    assert dummy_table(odd, 50, seed=0).schema == odd.governed_arrow_schema()


def test_identifier_looks_like_a_pseudonym(cohort_dummy: pa.Table) -> None:
    ids = cohort_dummy["subject_id"].to_pylist()
    assert len(set(ids)) == ROWS
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids)


def test_missing_rates_are_the_declared_ones(cohort_dummy: pa.Table) -> None:
    for spec in cohort_contract().columns:
        if spec.name not in cohort_dummy.column_names:
            continue
        nulls = cohort_dummy[spec.name].null_count
        if spec.is_nullable and spec.missing_rate:
            assert nulls == round(spec.missing_rate * ROWS), spec.name
        else:
            assert nulls == 0, spec.name


def test_every_category_appears_plus_a_little_undeclared(cohort_dummy: pa.Table) -> None:
    contract = cohort_contract()
    for spec in contract.columns:
        if spec.categories is None:
            continue
        counts = _counts(cohort_dummy[spec.name])
        assert set(spec.categories) <= set(counts), spec.name
        extra = set(counts) - set(spec.categories)
        if spec.name == contract.site:
            assert not extra  # site values are the declared sites only
        else:
            assert extra == {UNDECLARED_VALUE}, spec.name
            share = counts[UNDECLARED_VALUE] / sum(counts.values())
            assert 0 < share < 0.05, spec.name
    # a vocabulary that holds all rows' worth of categories only when rows allow
    tiny = dummy_table(contract, 5, seed=1)
    assert tiny.num_rows == 5 and tiny["primary_dx"].null_count == 0


def test_values_lie_inside_declared_domains(cohort_dummy: pa.Table) -> None:
    for spec in cohort_contract().columns:
        if spec.min is None or spec.name not in cohort_dummy.column_names:
            continue
        values = cohort_dummy[spec.name]
        assert pc.min(values).as_py() >= spec.min, spec.name
        assert pc.max(values).as_py() <= spec.max, spec.name
    # float32 cannot hold 0.1 or 0.2 exactly: values must still compare inside them
    odd = dummy_table(SchemaContract.from_toml_text(ODD_CONTRACT), 5_000, seed=2)
    ratio = odd["ratio"]
    assert pc.all(pc.greater_equal(ratio, 0.1)).as_py()
    assert pc.all(pc.less_equal(ratio, 0.2)).as_py()
    assert ratio.null_count == 2_500


def test_label_follows_the_declared_positive_rate() -> None:
    table = dummy_table(cohort_contract(), 20_000, seed=5)
    rate = pc.mean(table["readmitted_30d"]).as_py()
    assert abs(rate - 0.14) < 0.015
    odd = dummy_table(SchemaContract.from_toml_text(ODD_CONTRACT), 20_000, seed=5)
    assert abs(pc.mean(pc.cast(odd["outcome"], pa.float64())).as_py() - 0.3) < 0.015


def test_sites_and_free_strings_without_a_vocabulary() -> None:
    odd = dummy_table(SchemaContract.from_toml_text(ODD_CONTRACT), 300, seed=0)
    assert set(odd["site"].to_pylist()) == set(DEFAULT_SITES)
    assert all(v.startswith("note-") for v in odd["note"].to_pylist())
    # "other" is declared on colour: the undeclared value is still undeclared
    assert UNDECLARED_VALUE in set(odd["colour"].to_pylist())


def test_dates_fall_in_a_fixed_window(cohort_dummy: pa.Table) -> None:
    low, high = pc.min_max(cohort_dummy["admission_date"]).values()
    assert low.as_py().year >= 2019 and high.as_py().year <= 2023


def test_deterministic_for_a_seed() -> None:
    contract = cohort_contract()
    assert dummy_table(contract, 500, seed=11).equals(dummy_table(contract, 500, seed=11))
    assert not dummy_table(contract, 500, seed=11).equals(dummy_table(contract, 500, seed=12))


def test_never_reads_rows() -> None:
    # the contract is the only input: there is no parameter through which rows could arrive
    assert list(inspect.signature(dummy_table).parameters) == ["contract", "rows", "seed"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rows": -1}, "rows"),
        ({"rows": 1.5}, "rows"),
        ({"rows": True}, "rows"),
        ({"seed": -1}, "seed"),
        ({"contract": {"columns": {}}}, "contract"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    args = {"contract": cohort_contract(), "rows": 10, "seed": 0, **kwargs}
    with pytest.raises(SpecError) as info:
        dummy_table(**args)
    assert info.value.field == field


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(0, 60), seed=st.integers(0, 2**32))
def test_any_size_keeps_schema_and_non_null_columns(rows: int, seed: int) -> None:
    contract = cohort_contract()
    table = dummy_table(contract, rows, seed)
    assert table.schema == contract.governed_arrow_schema()
    assert table.num_rows == rows
    for field in table.schema:
        if not field.nullable:
            assert table[field.name].null_count == 0
