"""The DP query engine: specs, contract checks, quotes, and each mechanism's epsilon.

Every epsilon is checked against an independent reference (the published closed forms:
Laplace eps = sensitivity / b; the quantile's exponential mechanism eps = d_in * 2 *
max(q, 1 - q) / s) and the discrete Laplace noise against its pmf, never only against our
own code. Group keys come from the contract alone; the reader keeps at most k rows a person.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from connectors.cohort import cohort_contract, generate_cohort
from connectors.dataset_handle import DatasetHandle
from connectors.ingest import IngestReport, ingest_table
from connectors.schema import SchemaContract
from connectors.tables import load_table
from foundation.errors import SchemaError, SpecError
from privacy.dpquery import noise
from privacy.dpquery.engine import Figure, QueryAnswer, quote, run
from privacy.dpquery.plan import level_label
from privacy.dpquery.spec import QueryKind, QuerySpec, check_against, columns_needed

SECRET = b"dpquery-tests-secret-0123456789a"
COHORT = cohort_contract()

VISITS = """
[dataset]
rows_per_person = "many"
query_rows_per_person = {k}

[columns.pid]
type = "string"
role = "identifier"
[columns.site]
type = "string"
role = "site"
categories = ["east", "west"]
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
[columns.score]
type = "float64"
role = "feature"
min = -5
max = 10
[columns.y]
type = "int8"
role = "label"
"""


def visits_contract(k: int) -> SchemaContract:
    return SchemaContract.from_toml_text(VISITS.format(k=k))


def spec(**fields) -> QuerySpec:
    return QuerySpec.from_dict({"dataset": "cohort", "epsilon": 1.0, **fields})


def bounded(s: QuerySpec, table: pa.Table) -> pa.Table:
    return table.select(columns_needed(s))


@pytest.fixture(scope="module")
def cohort() -> pa.Table:
    return generate_cohort(1500, seed=5)


@pytest.fixture(scope="module")
def visits(tmp_path_factory: pytest.TempPathFactory) -> IngestReport:
    """Persons with 1-4 visits at two sites, in no particular order."""
    rng = np.random.default_rng(8)
    n_visits = rng.integers(1, 5, 300)
    person = np.repeat(np.arange(300), n_visits)
    order = rng.permutation(len(person))
    person = person[order]
    table = pa.table(
        {
            "pid": pa.array([f"person-{p}" for p in person]),
            "site": pa.array(np.where(person % 2 == 0, "east", "west")),
            "person_code": pa.array(person, pa.int32()),
            "visit": pa.array(np.concatenate([np.arange(v) for v in n_visits])[order], pa.int32()),
            "score": pa.array(rng.normal(2.0, 3.0, len(person)).clip(-5, 10)),
            "y": pa.array(rng.integers(0, 2, len(person)), pa.int8()),
        }
    )
    dest = tmp_path_factory.mktemp("visits") / "ds"
    return ingest_table(table, visits_contract(2), dest, SECRET)


# -- the spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([1, 2], "query"),
        ({"dataset": "cohort", "kind": "count", "epsilon": 1, "colour": "red"}, "query.colour"),
        ({"dataset": "cohort", "kind": "count"}, "query.epsilon"),
        ({"kind": "count", "epsilon": 1}, "query.dataset"),
        ({"dataset": "", "kind": "count", "epsilon": 1}, "query.dataset"),
        ({"dataset": "cohort", "kind": "median", "epsilon": 1}, "query.kind"),
        ({"dataset": "cohort", "kind": "count", "epsilon": 0}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "count", "epsilon": -1.0}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "count", "epsilon": 10.5}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "count", "epsilon": True}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "count", "epsilon": "1"}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "count", "epsilon": float("nan")}, "query.epsilon"),
        ({"dataset": "cohort", "kind": "count", "epsilon": 1, "column": "age"}, "query.column"),
        ({"dataset": "cohort", "kind": "sum", "epsilon": 1}, "query.column"),
        ({"dataset": "cohort", "kind": "sum", "epsilon": 1, "column": 3}, "query.column"),
        (
            {"dataset": "cohort", "kind": "histogram", "epsilon": 1, "column": "sex", "by": "x"},
            "query.by",
        ),
        ({"dataset": "cohort", "kind": "sum", "epsilon": 1, "column": "a", "by": "a"}, "query.by"),
        (
            {"dataset": "cohort", "kind": "quantiles", "epsilon": 1, "column": "age"},
            "query.quantiles",
        ),
        (
            {"dataset": "c", "kind": "quantiles", "epsilon": 1, "column": "a", "quantiles": [0.0]},
            "query.quantiles",
        ),
        (
            {"dataset": "c", "kind": "quantiles", "epsilon": 1, "column": "a", "quantiles": [1]},
            "query.quantiles",
        ),
        (
            {
                "dataset": "c",
                "kind": "quantiles",
                "epsilon": 1,
                "column": "a",
                "quantiles": [0.5, 0.5],
            },
            "query.quantiles",
        ),
        (
            {"dataset": "c", "kind": "quantiles", "epsilon": 1, "column": "a", "quantiles": [True]},
            "query.quantiles",
        ),
        (
            {
                "dataset": "c",
                "kind": "quantiles",
                "epsilon": 1,
                "column": "a",
                "quantiles": [i / 11 for i in range(1, 11)],
            },
            "query.quantiles",
        ),
        ({"dataset": "c", "kind": "count", "epsilon": 1, "quantiles": [0.5]}, "query.quantiles"),
        (
            {"dataset": "c", "kind": "histogram", "epsilon": 1, "column": "a", "bins": 1},
            "query.bins",
        ),
        (
            {"dataset": "c", "kind": "histogram", "epsilon": 1, "column": "a", "bins": 101},
            "query.bins",
        ),
        (
            {"dataset": "c", "kind": "histogram", "epsilon": 1, "column": "a", "bins": True},
            "query.bins",
        ),
        (
            {"dataset": "c", "kind": "histogram", "epsilon": 1, "column": "a", "bins": 2.5},
            "query.bins",
        ),
        ({"dataset": "c", "kind": "count", "epsilon": 1, "bins": 5}, "query.bins"),
    ],
)
def test_a_bad_spec_names_its_field(data, field) -> None:
    with pytest.raises(SpecError) as err:
        QuerySpec.from_dict(data)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_spec_round_trip_and_canonical_key() -> None:
    s = spec(kind="quantiles", column="age", quantiles=[0.75, 0.25])
    assert s.quantiles == (0.25, 0.75)
    assert QuerySpec.from_dict(s.to_dict()) == s
    assert json.loads(json.dumps(s.to_dict())) == s.to_dict()
    assert s.key() == spec(kind="quantiles", column="age", quantiles=[0.25, 0.75]).key()
    assert len(s.key()) == 64 and int(s.key(), 16) >= 0
    assert spec(kind="count", epsilon=1).key() == spec(kind="count", epsilon=1.0).key()
    assert spec(kind="count").key() != spec(kind="count", epsilon=0.5).key()
    assert spec(kind="count").key() != spec(kind="count", by="sex").key()
    assert "bins" not in spec(kind="count").to_dict()
    assert spec(kind="histogram", column="age").to_dict()["bins"] == 10
    assert spec(kind="count").kind is QueryKind.COUNT


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"kind": "sum", "column": "weight"}, "query.column", "sandbox dataset show"),
        ({"kind": "histogram", "column": "subject_id"}, "query.column", "identifier"),
        ({"kind": "histogram", "column": "patient_name"}, "query.column", "direct-identifier"),
        ({"kind": "sum", "column": "sex"}, "query.column", "declared min and max"),
        ({"kind": "mean", "column": "cancer"}, "query.column", "declared min and max"),
        ({"kind": "quantiles", "column": "hospital", "quantiles": [0.5]}, "query.column", "min"),
        (
            {"kind": "quantiles", "column": "admission_date", "quantiles": [0.5]},
            "query.column",
            "date",
        ),
        ({"kind": "histogram", "column": "admission_date"}, "query.column", "date"),
        ({"kind": "histogram", "column": "cancer"}, "query.column", "neither"),
        ({"kind": "count", "by": "age"}, "query.by", "no declared categories"),
        ({"kind": "count", "by": "subject_id"}, "query.by", "identifier"),
        ({"kind": "mean", "column": "age", "by": "nowhere"}, "query.by", "sandbox dataset show"),
        ({"kind": "histogram", "column": "sex", "bins": 4}, "query.bins", "categorical"),
    ],
)
def test_check_against_refuses_what_the_contract_cannot_answer(fields, field, says) -> None:
    s = spec(**fields)
    for call in (lambda: check_against(s, COHORT), lambda: quote(s, COHORT)):
        with pytest.raises(SpecError) as err:
            call()
        assert err.value.field == field and says in str(err.value)


def test_columns_needed() -> None:
    assert columns_needed(spec(kind="count")) == []
    assert columns_needed(spec(kind="mean", column="age", by="sex")) == ["age", "sex"]


# -- quotes are data-independent and equal the run's scales ----------------------------------
QUERIES = [
    {"kind": "count"},
    {"kind": "count", "by": "hospital"},
    {"kind": "sum", "column": "age", "by": "sex"},
    {"kind": "mean", "column": "bmi", "by": "hospital"},
    {"kind": "histogram", "column": "primary_dx"},
    {"kind": "histogram", "column": "sodium", "bins": 7},
    {"kind": "quantiles", "column": "prior_admissions", "quantiles": [0.1, 0.5, 0.9]},
]


@pytest.mark.parametrize("fields", QUERIES, ids=lambda f: "-".join(map(str, f.values())))
def test_quote_is_data_independent_and_equals_the_run(fields, cohort: pa.Table) -> None:
    s = spec(epsilon=0.7, **fields)
    q = quote(s, COHORT)
    assert q == quote(s, COHORT)
    assert (q.epsilon, q.delta, q.rows_per_person) == (0.7, 0.0, 1)
    assert sum(p["epsilon"] for p in q.parts) <= 0.7
    assert json.loads(json.dumps(q.to_dict())) == q.to_dict()
    other = generate_cohort(400, seed=99)
    for table in (cohort, other):
        a = run(s, COHORT, bounded(s, table))
        assert a.spec == s and a.epsilon == 0.7 and a.delta == 0.0
        if s.kind is QueryKind.MEAN:
            assert len(a.figures) == q.parts[0]["cells"] == q.parts[1]["cells"]
            for f in a.figures:  # a mean is made by the noisy sum and the noisy count
                assert f.statistic == "mean"
                assert f.noise_scales == (q.parts[0]["noise_scale"], q.parts[1]["noise_scale"])
        elif s.kind is QueryKind.QUANTILES:
            assert [f.noise_scale for f in a.figures] == [p["noise_scale"] for p in q.parts]
            assert [f.rank_error for f in a.figures] == [p["rank_error_95"] for p in q.parts]
        else:
            (part,) = q.parts
            assert len(a.figures) == part["cells"]
            assert {f.noise_scale for f in a.figures} == {part["noise_scale"]}
            h = part["half_width_95"]
            for f in a.figures:  # the interval is the value +- the quoted half-width, cut at 0
                assert f.ci_high == pytest.approx(max(f.value + h, 0.0))
                if s.kind is not QueryKind.SUM:
                    assert f.ci_low == max(f.value - h, 0.0)


# -- each mechanism's epsilon, against the published closed forms -----------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("eps", [0.05, 0.7, 1.0, 3.0])
def test_epsilons_against_the_closed_forms(k: int, eps: float) -> None:
    contract = visits_contract(k)
    # count: discrete Laplace, L1 sensitivity k, eps = k / b
    (c,) = quote(QuerySpec("v", QueryKind.COUNT, eps, by="site"), contract).parts
    assert k / c["noise_scale"] <= eps and k / c["noise_scale"] == pytest.approx(eps, rel=1e-12)
    # sum of a column in [-5, 10]: Laplace, sensitivity k * 10 (+ the documented 2^-20 slack)
    (s,) = quote(QuerySpec("v", QueryKind.SUM, eps, column="score"), contract).parts
    assert k * 10 / s["noise_scale"] <= eps
    assert k * 10 / s["noise_scale"] == pytest.approx(eps, rel=1e-6)
    # mean: half on the sum of (x + 5) in [0, 15], half on the count
    ms, mn = quote(QuerySpec("v", QueryKind.MEAN, eps, column="score"), contract).parts
    assert ms["epsilon"] + mn["epsilon"] <= eps
    assert k * 15 / ms["noise_scale"] == pytest.approx(eps / 2, rel=1e-6)
    assert k / mn["noise_scale"] == pytest.approx(eps / 2, rel=1e-12)
    # quantiles: eps = d_in * 2 * max(q, 1 - q) / s per level, the levels sharing eps evenly
    levels = (0.1, 0.5, 0.8)
    parts = quote(
        QuerySpec("v", QueryKind.QUANTILES, eps, column="score", quantiles=levels), contract
    ).parts
    spent = [k * 2 * max(q, 1 - q) / p["noise_scale"] for q, p in zip(levels, parts, strict=True)]
    assert sum(spent) <= eps * (1 + 1e-12)
    for used in spent:
        assert used == pytest.approx(eps / 3, rel=1e-12)


def test_sensitivity_grows_with_k() -> None:
    one, two = visits_contract(1), visits_contract(2)
    for s in (
        QuerySpec("v", QueryKind.COUNT, 0.5),
        QuerySpec("v", QueryKind.HISTOGRAM, 0.5, column="visit", bins=5),
        QuerySpec("v", QueryKind.SUM, 0.5, column="score", by="site"),
        QuerySpec("v", QueryKind.MEAN, 0.5, column="score"),
        QuerySpec("v", QueryKind.QUANTILES, 0.5, column="visit", quantiles=(0.5,)),
    ):
        for p1, p2 in zip(quote(s, one).parts, quote(s, two).parts, strict=True):
            assert p2["noise_scale"] == pytest.approx(2 * p1["noise_scale"], rel=1e-6)
        assert quote(s, two).rows_per_person == 2


def test_discrete_laplace_noise_has_the_published_distribution() -> None:
    b = 3.0
    draws = np.array(noise.discrete_laplace([0] * 20000, 1, 1 / b)[0])
    assert draws.dtype.kind == "i"
    p = math.exp(-1 / b)
    assert draws.var() == pytest.approx(2 * p / (1 - p) ** 2, rel=0.08)
    # chi-square against P(z) = (1 - p) / (1 + p) p^|z|, |z| >= 12 pooled into one cell
    zs = np.arange(-11, 12)
    pmf = (1 - p) / (1 + p) * p ** np.abs(zs)
    observed = [int((draws == z).sum()) for z in zs] + [int((np.abs(draws) >= 12).sum())]
    expected = np.append(pmf, 1 - pmf.sum()) * len(draws)
    chi2 = float(((np.array(observed) - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(0.9999, df=len(expected) - 1)


def test_laplace_noise_has_the_published_scale() -> None:
    draws = np.array(noise.laplace([0.0] * 20000, 2.0, 0.5)[0])  # b = 4
    assert np.mean(np.abs(draws)) == pytest.approx(4.0, rel=0.05)  # E|Z| = b
    assert np.mean(np.abs(draws) <= noise.laplace_half_width(4.0)) == pytest.approx(0.95, abs=0.01)


@pytest.mark.parametrize("b", [0.5, 1.0, 5.0, 20.0, 333.3])
def test_discrete_laplace_half_width_is_the_exact_quantile(b: float) -> None:
    p = math.exp(-1 / b)
    h = noise.discrete_laplace_half_width(b)
    inside = lambda m: 1 - 2 * p ** (m + 1) / (1 + p)  # noqa: E731  P(|Z| <= m)
    assert inside(h) >= 0.95 and (h == 0 or inside(h - 1) < 0.95)


def test_quantile_mechanism_spends_the_closed_form() -> None:
    cands = [float(c) for c in range(11)]
    for q in (0.1, 0.25, 0.5, 0.9):
        s = noise.quantile_scale(cands, q, 0.4, 3)
        assert 3 * 2 * max(q, 1 - q) / s <= 0.4
        assert 3 * 2 * max(q, 1 - q) / s == pytest.approx(0.4, rel=1e-12)
    value, _ = noise.private_quantile([1.0, 2.0, 3.0], cands, 0.5, 1.0, 1)
    assert value in cands


def test_quantile_noise_scale_is_in_rows() -> None:
    """rank_error rests on P(c released) <= exp(-(u(c) - u_min) / s), u in rows: check it."""
    data = [float(x) for x in range(1, 101)]
    cands = [float(c) for c in range(0, 101, 10)]
    draws = 3000
    for q, eps in ((0.5, 0.4), (0.25, 0.3)):
        x = np.array(data)
        u = np.array([abs((1 - q) * (x < c).sum() - q * (x > c).sum()) for c in cands])
        s = noise.quantile_scale(cands, q, eps, 1)
        meas = noise._make_quantile(cands, q, s)  # private_quantile's measurement, built once
        released = [(meas(data), s) for _ in range(draws)]
        for c, score in zip(cands, u, strict=True):
            bound = math.exp(-(score - u.min()) / s)
            freq = sum(v == c for v, _ in released) / draws
            assert freq <= bound + 3 * math.sqrt(bound * (1 - bound) / draws) + 0.003
        # and R covers 95%: the released score exceeds the best by more than R rarely
        excess = np.array([u[cands.index(v)] - u.min() for v, _ in released])
        assert np.mean(excess > noise.quantile_rank_error(s, len(cands))) <= 0.05


# -- group keys come from the contract alone -----------------------------------------------
def test_groups_come_only_from_the_contract(cohort: pa.Table) -> None:
    hospital = cohort.column("hospital").to_pylist()
    hospital[:40] = ["hospital-zz"] * 40  # a site the contract does not declare
    table = cohort.set_column(
        cohort.schema.get_field_index("hospital"), "hospital", pa.array(hospital)
    )
    declared = COHORT.column("hospital").categories
    for s in (
        spec(kind="count", by="hospital"),
        spec(kind="mean", column="age", by="hospital"),
        spec(kind="histogram", column="hospital"),
    ):
        a = run(s, COHORT, bounded(s, table))
        keys = {f.group for f in a.figures} if s.by else {f.statistic for f in a.figures}
        assert keys == {*declared, "(other)"}  # the site column is never null: no (missing)
        assert "hospital-zz" not in json.dumps(a.to_dict())
    # primary_dx holds codes outside its declared 15: they count in (other), never by name
    s = spec(kind="histogram", column="primary_dx", epsilon=10.0)
    a = run(s, COHORT, bounded(s, cohort))
    labels = [f.statistic for f in a.figures]
    assert labels == [*COHORT.column("primary_dx").categories, "(other)", "(missing)"]
    undeclared = set(cohort.column("primary_dx").to_pylist()) - set(labels) - {None}
    assert undeclared and not undeclared & set(json.dumps(a.to_dict()).split('"'))


def test_bins_and_levels_are_labelled_from_the_contract(cohort: pa.Table) -> None:
    s = spec(kind="histogram", column="age", bins=8)
    labels = [f.statistic for f in run(s, COHORT, bounded(s, cohort)).figures]
    assert labels[0] == "[18, 28.875)" and labels[7] == "[94.125, 105]"
    assert labels[-1] == "(missing)" and len(labels) == 9
    assert [level_label(q) for q in (0.5, 0.025, 0.1234567, 0.07)] == [
        "p50",
        "p2.5",
        "p12.34567",
        "p7",
    ]


# -- the table the engine is given -----------------------------------------------------------
def test_run_refuses_a_table_that_breaks_its_bounds(visits: IngestReport) -> None:
    contract = visits_contract(2)
    handle = DatasetHandle("visits", visits.path, contract, "job-1")
    s = QuerySpec("visits", QueryKind.SUM, 1.0, column="score")
    unbounded = load_table(handle, ["score"], keep_identifier=True, max_rows_per_person=4)
    with pytest.raises(SpecError, match="more than 2 row"):
        run(s, contract, unbounded)
    ok = load_table(handle, ["score"], keep_identifier=True, max_rows_per_person=2)
    assert run(s, contract, ok).rows_per_person == 2
    with pytest.raises(SpecError, match="lacks the column 'score'"):
        run(s, contract, ok.drop_columns(["score"]))
    canary = "CANARY-7f3a"
    mistyped = pa.table({"score": pa.array([canary] * 3)})
    with pytest.raises(SpecError) as err:
        run(s, contract, mistyped)
    assert canary not in str(err.value)


# -- the reader's contribution bound ---------------------------------------------------------
def _first_k(path: Path, k: int) -> list[tuple[int, int]]:
    """Each person's first k rows in storage order, computed row by row."""
    table = pq.read_table(path)
    seen: dict[str, int] = {}
    out = []
    rows = zip(
        table["pid"].to_pylist(),
        table["person_code"].to_pylist(),
        table["visit"].to_pylist(),
        strict=True,
    )
    for pid, code, visit in rows:
        seen[pid] = seen.get(pid, 0) + 1
        if seen[pid] <= k:
            out.append((code, visit))
    return out


def test_load_table_keeps_each_persons_first_k_rows(visits: IngestReport) -> None:
    handle = DatasetHandle("visits", visits.path, visits_contract(2), "job-2")
    cols = ["person_code", "visit"]

    def rows(t: pa.Table) -> list[tuple[int, int]]:
        return list(zip(t["person_code"].to_pylist(), t["visit"].to_pylist(), strict=True))

    default = load_table(handle, cols)
    assert rows(default) == rows(load_table(handle, cols, max_rows_per_person=1))
    assert rows(default) == _first_k(visits.path, 1)
    assert len(default) == 300 < visits.rows
    two = load_table(handle, cols, max_rows_per_person=2, keep_identifier=True)
    assert rows(two) == _first_k(visits.path, 2)
    per_person = np.bincount(two["person_code"].to_numpy())
    assert per_person.max() == 2 and (per_person >= 1).sum() == 300
    assert len(load_table(handle, cols, max_rows_per_person=10)) == visits.rows
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SpecError) as err:
            load_table(handle, cols, max_rows_per_person=bad)
        assert err.value.field == "max_rows_per_person"


def test_contract_query_rows_per_person() -> None:
    two = visits_contract(2)
    assert two.query_rows_per_person == 2
    assert SchemaContract.from_dict(two.to_dict()) == two
    assert two.to_dict()["dataset"]["query_rows_per_person"] == 2
    # left out at 1, so older contracts keep their dicts (and hashes)
    assert "query_rows_per_person" not in COHORT.to_dict()["dataset"]
    assert COHORT.query_rows_per_person == 1
    one_row = VISITS.format(k=2).replace('rows_per_person = "many"\n', 'rows_per_person = "one"\n')
    for text in (one_row, VISITS.format(k=0), VISITS.format(k="true"), VISITS.format(k='"2"')):
        with pytest.raises(SchemaError, match="dataset.query_rows_per_person"):
            SchemaContract.from_toml_text(text)


# -- answers ---------------------------------------------------------------------------------
def test_answer_round_trips_and_frames(cohort: pa.Table) -> None:
    s = spec(kind="mean", column="age", by="sex")
    a = run(s, COHORT, bounded(s, cohort))
    again = QueryAnswer.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again == a
    frame = a.to_frame()
    assert len(frame) == len(a.figures) == 5  # F, M, X, (other), (missing)
    assert list(frame.columns) == [
        "group",
        "statistic",
        "value",
        "noise_scale",
        "ci_low",
        "ci_high",
        "rank_error",
        "noise_scales",
    ]
    assert any("at most one row" in n for n in a.notes)
    f = Figure(None, "p50", 3.0, 1.0, None, None, rank_error=4.5)
    assert Figure.from_dict(f.to_dict()) == f
    with pytest.raises(SpecError):
        Figure.from_dict({**f.to_dict(), "value": "3"})


def test_the_engine_imports_opendp_lightly() -> None:
    code = (
        "import sys\n"
        "from privacy.dpquery.engine import quote\n"
        "from privacy.dpquery.spec import QuerySpec\n"
        "from connectors.cohort import cohort_contract\n"
        "quote(QuerySpec('c', 'count', 1.0), cohort_contract())\n"
        "print(sorted(m for m in ('opendp.prelude', 'sklearn', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
