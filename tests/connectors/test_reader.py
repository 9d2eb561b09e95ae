"""The row reader and the contract-only preprocessing it applies.

Pins two privacy chokepoints: a read needs an authorization and records itself (on_open,
once, before any row), and every preprocessing parameter comes from the contract.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.cohort import Canaries, cohort_contract, generate_cohort
from connectors.dataset_handle import DatasetHandle
from connectors.governed_file import dataset_summary
from connectors.ingest import IngestReport, ingest_table
from connectors.preprocess import FeaturePlan
from connectors.preprocess_steps import StepKind
from connectors.reader import Split, iter_batches, load_split, load_tensors
from connectors.schema import SchemaContract
from foundation.errors import NotFoundError, PolicyDenied, SchemaError, SpecError

SECRET = b"reader-tests-secret-0123456789ab"
LABEL = "readmitted_30d"
FEATURES = ["age", "sex", "diabetes", "cancer", "hba1c", "prior_admissions", "primary_dx"]
N = 3000
CANARIES = Canaries.make(33)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> IngestReport:
    table = generate_cohort(N, seed=11, canaries=CANARIES)
    return ingest_table(table, cohort_contract(), tmp_path_factory.mktemp("r") / "ds", SECRET)


@pytest.fixture(scope="module")
def plan() -> FeaturePlan:
    return FeaturePlan.from_contract(cohort_contract(), FEATURES)


def _handle(report: IngestReport, calls: list[int] | None = None, contract=None) -> DatasetHandle:
    return DatasetHandle(
        name="cohort",
        path=report.path.parent,
        contract=contract or cohort_contract(),
        authorization="job-123",
        on_open=(lambda: calls.append(1)) if calls is not None else None,
    )


# --- the handle and on_open ----------------------------------------------------------------------


@pytest.mark.parametrize("authorization", ["", "   ", None])
def test_a_handle_needs_an_authorization(dataset: IngestReport, authorization) -> None:
    with pytest.raises(PolicyDenied) as err:
        DatasetHandle("cohort", dataset.path, cohort_contract(), authorization)
    assert "authorization" in str(err.value)


def test_on_open_runs_exactly_once_per_handle(dataset: IngestReport, plan: FeaturePlan) -> None:
    calls: list[int] = []
    handle = _handle(dataset, calls)
    with pytest.raises(SpecError):  # refused before any row: not an access
        load_tensors(handle, plan, "age")
    assert calls == [] and not handle.opened
    load_split(handle, plan, LABEL, Split.TRAIN)
    load_split(handle, plan, LABEL, Split.TEST)
    load_tensors(handle, plan, LABEL, sites=["hospital-b"])
    batches = iter_batches(handle, plan, LABEL, batch_rows=500)
    assert calls == [1]
    list(batches)
    assert calls == [1] and handle.opened
    # a handle that crosses a process boundary keeps its record
    plain = _handle(dataset)
    load_tensors(plain, plan, LABEL)
    assert pickle.loads(pickle.dumps(plain)).opened


def test_on_open_runs_before_the_first_row_is_read(
    dataset: IngestReport, plan: FeaturePlan, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / dataset.path.name).write_bytes(dataset.path.read_bytes())
    footer_only = (copy / dataset.path.name).read_bytes()

    def clobber_rows() -> None:
        # keep the footer, destroy every data page: a read that already happened would not
        # notice; a read that happens after this callback must fail
        data = bytearray(footer_only)
        data[4 : len(data) // 2] = b"\0" * (len(data) // 2 - 4)
        (copy / dataset.path.name).write_bytes(bytes(data))

    handle = DatasetHandle("cohort", copy, cohort_contract(), "job-9", on_open=clobber_rows)
    with pytest.raises(Exception):  # noqa: B017 - any decoding failure proves the order
        load_tensors(handle, plan, LABEL)


def test_a_refusing_on_open_stops_the_read(dataset: IngestReport, plan: FeaturePlan) -> None:
    attempts: list[int] = []

    def refuse() -> None:
        attempts.append(1)
        raise PolicyDenied("job was cancelled")

    handle = DatasetHandle("cohort", dataset.path, cohort_contract(), "job-1", on_open=refuse)
    for _ in range(2):
        with pytest.raises(PolicyDenied):
            load_tensors(handle, plan, LABEL)
    assert attempts == [1, 1] and not handle.opened


# --- what comes back ------------------------------------------------------------------------------


def test_load_tensors_equals_the_plan_on_the_governed_rows(
    dataset: IngestReport, plan: FeaturePlan
) -> None:
    X, y = load_tensors(_handle(dataset), plan, LABEL)
    assert X.dtype == torch.float32 and y.dtype == torch.float32
    assert X.shape == (N, plan.n_outputs) and X.is_contiguous()
    table = pq.read_table(dataset.path)  # storage order is the reader's order
    assert np.array_equal(X.numpy(), plan.transform(table))
    assert np.array_equal(y.numpy(), np.asarray(table[LABEL], dtype=np.float32))
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0


def test_iter_batches_streams_the_same_rows(dataset: IngestReport, plan: FeaturePlan) -> None:
    X, y = load_tensors(_handle(dataset), plan, LABEL)
    parts = list(iter_batches(_handle(dataset), plan, LABEL, batch_rows=700))
    assert all(len(xb) <= 700 for xb, _ in parts) and len(parts) >= N // 700
    assert torch.equal(torch.cat([xb for xb, _ in parts]), X)
    assert torch.equal(torch.cat([yb for _, yb in parts]), y)


def test_site_filter(dataset: IngestReport, plan: FeaturePlan) -> None:
    chosen = ["hospital-h", "hospital-c"]
    X, _ = load_tensors(_handle(dataset), plan, LABEL, sites=chosen)
    assert len(X) == sum(dataset.sites[s] for s in chosen)
    hospital_plan = FeaturePlan.from_contract(cohort_contract(), ["hospital"])
    H, _ = load_tensors(_handle(dataset), hospital_plan, LABEL, sites=chosen)
    names = hospital_plan.output_names
    seen = {names[i] for i in np.flatnonzero(H.numpy().sum(axis=0))}
    assert seen == {"hospital=hospital-c", "hospital=hospital-h"}
    with pytest.raises(SpecError, match="sites"):
        load_tensors(_handle(dataset), plan, LABEL, sites=["hospital-z"])
    with pytest.raises(SpecError, match="sites"):
        load_tensors(_handle(dataset), plan, LABEL, sites=[])


def test_site_filter_on_row_groups_that_mix_sites(
    dataset: IngestReport, plan: FeaturePlan, tmp_path: Path
) -> None:
    table = pq.read_table(dataset.path)
    shuffled = table.take(np.random.default_rng(0).permutation(N))
    (tmp_path / "mixed").mkdir()
    pq.write_table(shuffled, tmp_path / "mixed" / "data.parquet", row_group_size=500)
    handle = DatasetHandle("mixed", tmp_path / "mixed", cohort_contract(), "job-2")
    X, _ = load_tensors(handle, plan, LABEL, sites=["hospital-a"])
    assert len(X) == dataset.sites["hospital-a"]
    train, _ = load_split(handle, plan, LABEL, Split.TRAIN, sites=["hospital-a"])
    assert 0 < len(train) < len(X)


def test_split_is_by_person_deterministic_and_seeded(
    dataset: IngestReport, plan: FeaturePlan
) -> None:
    h = _handle(dataset)
    X_train, y_train = load_split(h, plan, LABEL, Split.TRAIN)
    X_test, _ = load_split(h, plan, LABEL, Split.TEST)
    assert len(X_train) + len(X_test) == N
    assert abs(len(X_test) / N - 0.2) < 0.04
    again, _ = load_split(h, plan, LABEL, Split.TEST)
    assert torch.equal(again, X_test)
    other, _ = load_split(h, plan, LABEL, Split.TEST, seed=1)
    assert not torch.equal(other, X_test)
    half, _ = load_split(h, plan, LABEL, Split.TEST, test_fraction=0.5)
    assert abs(len(half) / N - 0.5) < 0.05
    for bad in (0, 1, 1.5, "0.2"):
        with pytest.raises(SpecError, match="test_fraction"):
            load_split(h, plan, LABEL, Split.TEST, test_fraction=bad)


MANY = """
[dataset]
rows_per_person = "many"
[columns.pid]
type = "string"
role = "identifier"
[columns.site]
type = "string"
role = "site"
[columns.person_code]
type = "int32"
role = "feature"
min = 0
max = 1000000
[columns.visit]
type = "int32"
role = "feature"
min = 0
max = 100
[columns.y]
type = "int8"
role = "label"
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[IngestReport, SchemaContract]:
    """Persons with 1-4 visits at two sites; person_code lets a test see who is where."""
    rng = np.random.default_rng(4)
    visits = rng.integers(1, 5, 800)
    person = np.repeat(np.arange(800), visits)
    order = rng.permutation(len(person))  # source rows in no particular order
    person = person[order]
    visit = np.concatenate([np.arange(v) for v in visits])[order]
    site = np.where(rng.random(len(person)) < 0.5, "east", "west")
    table = pa.table(
        {
            "pid": pa.array([f"person-{p}" for p in person]),
            "site": pa.array(site),
            "person_code": pa.array(person, pa.int32()),
            "visit": pa.array(visit, pa.int32()),
            "y": pa.array(rng.integers(0, 2, len(person)), pa.int8()),
        }
    )
    contract = SchemaContract.from_toml_text(MANY)
    return ingest_table(table, contract, tmp_path_factory.mktemp("m") / "ds", SECRET), contract


def _codes(X: torch.Tensor) -> np.ndarray:
    return np.rint(X[:, 0].numpy().astype(np.float64) * 1_000_000).astype(np.int64)


def test_one_row_per_person_when_people_have_many(many) -> None:
    report, contract = many
    plan = FeaturePlan.from_contract(contract, ["person_code", "visit"])
    handle = DatasetHandle("visits", report.path, contract, "job-3")
    X, _ = load_tensors(handle, plan, "y")
    codes = _codes(X)
    assert report.rows > report.persons == 800
    assert len(codes) == 800 and len(set(codes)) == 800
    # the documented choice: each person's first row in storage order (site, pseudonym, source)
    table = pq.read_table(report.path)
    first: dict[str, int] = {}
    for pid, code in zip(table["pid"].to_pylist(), table["person_code"].to_pylist(), strict=True):
        first.setdefault(pid, code)
    assert list(codes) == list(first.values())
    again, _ = load_tensors(handle, plan, "y")
    assert torch.equal(again, X)
    streamed = torch.cat([xb for xb, _ in iter_batches(handle, plan, "y", batch_rows=128)])
    assert torch.equal(streamed, X)
    east, _ = load_tensors(handle, plan, "y", sites=["east"])
    assert len(set(_codes(east))) == len(east)  # still one row per person inside a site


def test_no_person_is_in_both_parts(many) -> None:
    report, contract = many
    plan = FeaturePlan.from_contract(contract, ["person_code"])
    handle = DatasetHandle("visits", report.path, contract, "job-4")
    for seed in (0, 1, 2):
        train = set(_codes(load_split(handle, plan, "y", Split.TRAIN, seed=seed)[0]))
        test = set(_codes(load_split(handle, plan, "y", Split.TEST, seed=seed)[0]))
        assert train.isdisjoint(test) and len(train | test) == 800
    # per site too: a person seen at both sites lands on the same side at each
    east_test = set(_codes(load_split(handle, plan, "y", Split.TEST, sites=["east"])[0]))
    west_train = set(_codes(load_split(handle, plan, "y", Split.TRAIN, sites=["west"])[0]))
    assert east_test.isdisjoint(west_train)


def test_dataset_summary_uses_the_footer(dataset: IngestReport, many) -> None:
    summary = dataset_summary(dataset.path.parent, cohort_contract())
    assert (summary["rows"], summary["persons"], summary["sites"]) == (
        dataset.rows,
        dataset.persons,
        dataset.sites,
    )
    json.dumps(summary)
    report, contract = many
    assert dataset_summary(report.path, contract)["persons"] == 800


def test_reads_refuse_mismatches(
    dataset: IngestReport, plan: FeaturePlan, many, tmp_path: Path
) -> None:
    report, contract = many
    with pytest.raises(SpecError, match="plan"):
        load_tensors(DatasetHandle("v", report.path, contract, "j"), plan, "y")
    with pytest.raises(SchemaError):
        load_tensors(DatasetHandle("v", report.path, cohort_contract(), "j"), plan, LABEL)
    with pytest.raises(NotFoundError):
        load_tensors(
            DatasetHandle("gone", tmp_path / "nothing", cohort_contract(), "j"), plan, LABEL
        )
    with pytest.raises(SpecError, match="label"):
        load_tensors(_handle(dataset), plan, "sex")
    with pytest.raises(SpecError, match="part"):
        load_split(_handle(dataset), plan, LABEL, "validation")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="batch_rows"):
        iter_batches(_handle(dataset), plan, LABEL, batch_rows=0)


# --- preprocessing: parameters from the contract only --------------------------------------------


def test_plan_takes_every_parameter_from_the_contract() -> None:
    contract = cohort_contract()
    plan = FeaturePlan.from_contract(contract, ["age", "sex", "cancer", "hba1c"])
    age, sex, cancer, hba1c = plan.steps
    assert (age.kind, age.min, age.max, age.fill) == (StepKind.NUMERIC, 18.0, 105.0, 65.0)
    assert sex.kind is StepKind.CATEGORY and sex.categories == ("F", "M", "X")
    assert cancer.kind is StepKind.FLAG
    assert (hba1c.min, hba1c.max, hba1c.fill) == (3.0, 18.0, 5.5)
    assert plan.output_names == (
        "age",
        "age__missing",
        "sex=F",
        "sex=M",
        "sex=X",
        "sex__other",
        "sex__missing",
        "cancer",
        "cancer__missing",
        "hba1c",
        "hba1c__missing",
    )
    assert plan.n_outputs == 11
    # the plan has no way to see rows: the same call gives the same plan, whatever the data
    assert FeaturePlan.from_contract(contract, ["age", "sex", "cancer", "hba1c"]) == plan


def test_out_of_range_values_are_clipped_to_the_declared_domain() -> None:
    plan = FeaturePlan.from_contract(cohort_contract(), ["age", "hba1c"])
    table = pa.table(
        {
            "age": [-50.0, 18.0, 61.5, 105.0, 1e9],
            "hba1c": pa.array([1, 3, 10.5, 18, 99], pa.float32()),
        }
    )
    X = plan.transform(table)
    assert np.allclose(X[:, 0], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert np.allclose(X[:, 2], [0.0, 0.0, 0.5, 1.0, 1.0])
    assert not X[:, [1, 3]].any()


def test_missing_unknown_and_nan_values() -> None:
    plan = FeaturePlan.from_contract(cohort_contract(), ["age", "sex", "cancer", "copd"])
    table = pa.table(
        {
            "age": [None, float("nan"), 18.0],
            "sex": [None, CANARIES.ethnicity, "M"],
            "cancer": [None, True, False],
            "copd": pa.array([None, 1, 0], pa.int8()),
        }
    )
    X = plan.transform(table)
    names = plan.output_names
    col = {n: X[:, i] for i, n in enumerate(names)}
    assert np.allclose(col["age"], [(65 - 18) / 87, (65 - 18) / 87, 0.0])  # declared fill
    assert list(col["age__missing"]) == [1, 1, 0]
    assert list(col["sex__missing"]) == [1, 0, 0] and list(col["sex__other"]) == [0, 1, 0]
    assert list(col["sex=M"]) == [0, 0, 1]
    assert list(col["cancer"]) == [0.5, 1, 0] and list(col["cancer__missing"]) == [1, 0, 0]
    assert list(col["copd"]) == [0.5, 1, 0] and list(col["copd__missing"]) == [1, 0, 0]
    assert np.allclose(X.sum(axis=1) - X[:, [0, 1, 7, 8, 9, 10]].sum(axis=1), 1)  # one-hot


@pytest.mark.parametrize(
    ("feature", "fix"),
    [
        (LABEL, "target"),
        ("subject_id", "identifier"),
        ("patient_name", "direct identifiers"),
        ("admission_date", "derived numeric"),
        ("shoe_size", "use:"),
    ],
)
def test_columns_that_cannot_be_features_are_refused_by_name(feature: str, fix: str) -> None:
    with pytest.raises(SpecError) as err:
        FeaturePlan.from_contract(cohort_contract(), ["age", feature])
    assert err.value.field == "features"
    assert feature in str(err.value) and fix in str(err.value)


def test_feature_list_shape_is_checked() -> None:
    for bad in ([], "age", ["age", "age"], [3]):
        with pytest.raises(SpecError, match="features"):
            FeaturePlan.from_contract(cohort_contract(), bad)  # type: ignore[arg-type]
    sensitive = SchemaContract.from_toml_text('[columns.e]\ntype = "string"\nrole = "sensitive"\n')
    with pytest.raises(SpecError, match="categories"):
        FeaturePlan.from_contract(sensitive, ["e"])


def test_plan_travels_as_json_and_refuses_tampering() -> None:
    plan = FeaturePlan.from_contract(cohort_contract(), FEATURES)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["features"] == FEATURES
    assert FeaturePlan.from_dict(data) == plan
    data["steps"][0]["min"] = data["steps"][0]["max"]
    with pytest.raises(SpecError):
        FeaturePlan.from_dict(data)
    with pytest.raises(SpecError):
        FeaturePlan.from_dict({"version": 99, "steps": []})


def test_transform_accepts_the_types_a_user_file_arrives_with(plan: FeaturePlan) -> None:
    table = generate_cohort(400, seed=3)
    expected = plan.transform(table)
    loose = pa.table(
        {
            "age": pc.cast(table["age"], pa.int64()),  # a CSV reader infers whole ages as ints
            "sex": pc.dictionary_encode(table["sex"]),
            "diabetes": pc.cast(table["diabetes"], pa.int64()),
            "cancer": pc.cast(pc.cast(table["cancer"], pa.string()), pa.large_string()),
            "hba1c": pc.cast(table["hba1c"], pa.float64()),
            "prior_admissions": pc.cast(table["prior_admissions"], pa.string()),
            "primary_dx": pa.chunked_array(
                [
                    table["primary_dx"].combine_chunks().slice(0, 123),
                    table["primary_dx"].combine_chunks().slice(123),
                ]
            ),
        }
    )
    assert np.allclose(plan.transform(loose), expected, atol=1e-6)
    bad = loose.set_column(0, "age", pc.cast(pc.cast(table["age"], pa.string()), pa.string()))
    values = bad["age"].to_pylist()
    values[57] = CANARIES.subject_id
    bad = bad.set_column(0, "age", pa.array(values))
    with pytest.raises(SchemaError) as err:
        plan.transform(bad)
    assert (err.value.column, err.value.row) == ("age", 58)
    assert CANARIES.subject_id not in str(err.value)
    with pytest.raises(SchemaError, match="hba1c"):
        plan.transform(loose.drop_columns(["hba1c"]))


def _reference(step, values: list) -> list[list[float]]:
    """Plain-Python statement of the rules, independent of the vectorised code."""
    out = []
    for v in values:
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        if step.kind is StepKind.CATEGORY:
            row = [0.0] * step.width
            row[-1 if missing else (step.categories.index(v) if v in step.categories else -2)] = 1.0
            out.append(row)
            continue
        fill = step.scaled_fill
        if missing:
            out.append([fill, 1.0])
        elif step.kind is StepKind.FLAG:
            out.append([1.0 if v else 0.0, 0.0])
        else:
            out.append([min(1.0, max(0.0, (v - step.min) / (step.max - step.min))), 0.0])
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
        min_size=1,
        max_size=300,
    ),
    st.lists(
        st.one_of(st.none(), st.sampled_from(["F", "M", "X", "?", ""])), min_size=1, max_size=300
    ),
    st.integers(0, 40),
)
def test_transform_matches_the_rules(floats: list, cats: list, offset: int) -> None:
    plan = FeaturePlan.from_contract(cohort_contract(), ["hba1c", "sex"])
    n = min(len(floats), len(cats))
    padding_f, padding_c = [1.0] * offset, ["F"] * offset
    table = pa.table(
        {
            "hba1c": pa.array(padding_f + floats[:n], pa.float32()).slice(offset),  # offset buffers
            "sex": pa.array(padding_c + cats[:n]).slice(offset),
        }
    )
    X = plan.transform(table)
    hba1c, sex = plan.steps
    f32 = [None if v is None else float(np.float32(v)) for v in floats[:n]]
    expected = np.hstack([np.array(_reference(hba1c, f32)), np.array(_reference(sex, cats[:n]))])
    assert np.allclose(X, expected, atol=1e-6)
