"""The synthetic cohort: determinism, realism, contract conformance, label signal, canaries."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from connectors.cohort import Canaries, cohort_contract, generate_cohort, write_cohort
from connectors.cohort_world import CHAPTERS, HOSPITALS, readmission_logit
from connectors.preprocess import FeaturePlan
from connectors.schema import SchemaContract
from connectors.schema_columns import Role
from foundation.errors import SpecError

N = 20_000


@pytest.fixture(scope="module")
def cohort() -> pa.Table:
    return generate_cohort(N, seed=7)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties sharing their average rank."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = labels == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(table[name], pa.float64()), np.nan))


def test_contract_has_one_source_the_shipped_toml() -> None:
    path = resources.files("connectors").joinpath("cohort_schema.toml")
    assert cohort_contract() == SchemaContract.from_toml_text(path.read_text("utf-8"))
    c = cohort_contract()
    assert c.identifier == "subject_id" and c.site == "hospital"
    assert set(c.columns_with_role(Role.DIRECT_IDENTIFIER)) == {"patient_name", "address", "phone"}
    assert c.columns_with_role(Role.SENSITIVE) == ("ethnicity",)
    assert c.label_names() == ("readmitted_30d",)


def test_schema_and_determinism(cohort: pa.Table) -> None:
    assert cohort.schema == cohort_contract().source_arrow_schema()
    assert cohort.num_rows == N
    assert generate_cohort(N, seed=7).equals(cohort)
    other = generate_cohort(N, seed=8)
    assert not other.column("age").equals(cohort.column("age"))


def test_identifiers_unique_and_formatted(cohort: pa.Table) -> None:
    ids = cohort["subject_id"]
    assert pc.count_distinct(ids).as_py() == N
    assert ids[0].as_py() == "P0000001"
    assert pc.all(pc.match_substring_regex(ids, r"^P\d{7}$")).as_py()
    assert pc.all(pc.match_substring_regex(cohort["phone"], r"^\+1-555-\d{3}-\d{4}$")).as_py()


def test_every_value_inside_the_declared_domains(cohort: pa.Table) -> None:
    contract = cohort_contract()
    for spec in contract.columns:
        column = cohort[spec.name]
        if not spec.is_nullable:
            assert column.null_count == 0, spec.name
        if spec.min is not None:
            values = _floats(cohort, spec.name)
            values = values[~np.isnan(values)]
            assert values.min() >= spec.min and values.max() <= spec.max, spec.name
    for name in ("sex", "hospital", "dx_chapter", "ethnicity"):
        declared = set(contract.column(name).categories or ())
        seen = set(pc.unique(cohort[name].drop_null()).to_pylist())
        assert seen <= declared, name


def test_hospitals_differ_in_size_case_mix_and_base_rate(cohort: pa.Table) -> None:
    hospital = np.asarray(pc.index_in(cohort["hospital"], pa.array(HOSPITALS)))
    sizes = np.bincount(hospital, minlength=len(HOSPITALS))
    assert (sizes > 0).all() and sizes.max() / sizes.min() > 5
    y = np.asarray(cohort["readmitted_30d"])
    rates = np.array([y[hospital == h].mean() for h in range(len(HOSPITALS))])
    assert rates.max() - rates.min() > 0.06
    circulatory = np.asarray(pc.equal(cohort["dx_chapter"], "circulatory"))
    cardiac = HOSPITALS.index("hospital-c")
    assert circulatory[hospital == cardiac].mean() > circulatory[hospital != cardiac].mean() + 0.1
    assert abs(y.mean() - cohort_contract().column("readmitted_30d").positive_rate) < 0.03


def test_diagnoses_have_a_long_tail(cohort: pa.Table) -> None:
    counts = np.sort(np.asarray(pc.value_counts(cohort["primary_dx"]).field("counts")))[::-1]
    assert len(counts) > 150  # a few hundred plausible codes, most of them rare
    assert counts[0] / N > 0.1  # the head is heavy
    top15 = set(cohort_contract().column("primary_dx").categories or ())
    in_vocab = np.asarray(pc.is_in(cohort["primary_dx"], pa.array(sorted(top15)))).mean()
    assert 0.4 < in_vocab < 0.9  # the rest map to "other"
    assert pc.all(pc.match_substring_regex(cohort["primary_dx"], r"^[A-Z]\d")).as_py()
    assert set(pc.unique(cohort["dx_chapter"]).to_pylist()) <= set(CHAPTERS)


def test_missingness_is_informative(cohort: pa.Table) -> None:
    diabetic = np.asarray(cohort["diabetes"]) == 1
    measured = np.asarray(pc.is_valid(cohort["hba1c"]))
    assert measured[diabetic].mean() - measured[~diabetic].mean() > 0.4
    age = np.asarray(cohort["age"])
    bmi_known = np.asarray(pc.is_valid(cohort["bmi"]))
    assert bmi_known[age >= 75].mean() < bmi_known[age < 55].mean() - 0.1


def test_dates_and_length_of_stay_agree(cohort: pa.Table) -> None:
    admit = np.asarray(cohort["admission_date"]).astype("datetime64[D]").astype(np.int64)
    discharge = np.asarray(cohort["discharge_date"]).astype("datetime64[D]").astype(np.int64)
    los = np.asarray(cohort["length_of_stay"], dtype=np.float64)
    assert (discharge - admit == np.floor(los)).all()


def test_true_model_has_real_signal(cohort: pa.Table) -> None:
    columns = {
        name: _floats(cohort, name)
        for name in (
            "age",
            "chf",
            "copd",
            "ckd",
            "cancer",
            "diabetes",
            "prior_admissions",
            "length_of_stay",
            "hemoglobin",
            "sodium",
            "creatinine",
            "hba1c",
            "bmi",
        )
    }
    columns["hospital"] = np.asarray(pc.index_in(cohort["hospital"], pa.array(HOSPITALS)))
    columns["dx_chapter"] = np.asarray(pc.index_in(cohort["dx_chapter"], pa.array(CHAPTERS)))
    columns["sex"] = np.asarray(pc.index_in(cohort["sex"], pa.array(["F", "M", "X"])))
    logit = readmission_logit(columns)
    y = np.asarray(cohort["readmitted_30d"])
    auroc = _auroc(logit, y)
    assert 0.70 <= auroc <= 0.78
    # an independent implementation agrees on the figure
    sklearn = pytest.importorskip("sklearn.metrics")
    assert auroc == pytest.approx(sklearn.roc_auc_score(y, logit), abs=1e-9)


def test_a_fitted_logistic_regression_finds_the_signal(cohort: pa.Table) -> None:
    features = [
        "age",
        "sex",
        "diabetes",
        "chf",
        "copd",
        "ckd",
        "cancer",
        "hba1c",
        "creatinine",
        "hemoglobin",
        "sodium",
        "bmi",
        "prior_admissions",
        "length_of_stay",
        "dx_chapter",
        "hospital",
    ]
    plan = FeaturePlan.from_contract(cohort_contract(), features)
    X = plan.transform(cohort).astype(np.float64)
    X = np.hstack([X, np.ones((len(X), 1))])
    y = np.asarray(cohort["readmitted_30d"], dtype=np.float64)
    train, test = slice(0, N * 3 // 4), slice(N * 3 // 4, N)
    w = np.zeros(X.shape[1])
    for _ in range(8):  # Newton's method with a small ridge; converges in a few steps
        p = 1 / (1 + np.exp(-X[train] @ w))
        grad = X[train].T @ (p - y[train]) + 1e-2 * w
        hess = (X[train] * (p * (1 - p))[:, None]).T @ X[train] + 1e-2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    auroc = _auroc(X[test] @ w, y[test])
    assert 0.66 <= auroc <= 0.80


def test_canaries_are_distinct_deterministic_and_planted() -> None:
    canaries = Canaries.make(3)
    assert canaries == Canaries.make(3) and canaries != Canaries.make(4)
    assert len(set(canaries.values())) == 6
    assert all(v.startswith("CANARY-") for v in canaries.values())
    table = generate_cohort(500, seed=1, canaries=canaries)
    for name, value in canaries.as_dict().items():
        hits = pc.sum(pc.equal(table[name], value)).as_py()
        assert hits == (1 if name == "subject_id" else 3), name
    assert pc.count_distinct(table["subject_id"]).as_py() == 500
    assert generate_cohort(500, seed=1, canaries=canaries).equals(table)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_cohort_round_trips(tmp_path: Path, fmt: str) -> None:
    canaries = Canaries.make(9)
    path = write_cohort(tmp_path / f"c.{fmt}", 300, seed=2, canaries=canaries, format=fmt)
    expected = generate_cohort(300, seed=2, canaries=canaries)
    if fmt == "parquet":
        assert pq.read_table(path).equals(expected)
    else:
        text = path.read_text()
        assert all(v in text for v in canaries.values())
        schema = cohort_contract().source_arrow_schema()
        read = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types=schema, strings_can_be_null=True, quoted_strings_can_be_null=False
            ),
        )
        assert read.cast(schema).equals(expected)


def test_bad_arguments_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="n_patients"):
        generate_cohort(0)
    with pytest.raises(SpecError, match="seed"):
        generate_cohort(10, seed=-1)
    with pytest.raises(SpecError, match="format"):
        write_cohort(tmp_path / "x.json", 10, format="json")
