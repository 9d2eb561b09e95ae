"""The synthetic-data report: fidelity, usefulness, closeness, and what each view may hold.

The real rows are the demo cohort with canaries planted (``connectors.cohort.Canaries``); the
"synthetic" tables are built from them on purpose: an exact copy (every score perfect, every
row a copy) and an independent-marginals table (each column shuffled on its own, which keeps
every column's distribution and destroys every link, including label <- features). The second
is docs/engines.md's warning made into a test: column shapes stay perfect and the pairwise
trend score stays high, while train-on-synthetic AUROC falls to chance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from connectors.cohort import Canaries, cohort_contract, generate_cohort
from foundation.errors import SchemaError, SpecError
from privacy.synth.report import build_report
from privacy.synth.report_contract import contract_metadata
from privacy.synth.report_plots import save_plots
from privacy.synth.report_types import SynthReport, TSTRModel

LABEL = "readmitted_30d"
N_TRAIN, N_TEST = 5_000, 2_500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def contract():
    return cohort_contract()


@pytest.fixture(scope="module")
def canaries():
    return Canaries.make(seed=7)


@pytest.fixture(scope="module")
def features(contract):
    # the contract's features plus a sensitive and a site column, so that both kept canaries
    # (primary_dx, ethnicity) sit in columns the report reads
    return (*contract.feature_names(), "ethnicity", "hospital")


@pytest.fixture(scope="module")
def split(canaries):
    """Real rows with canaries, split by person (one row per person) into train and test."""
    table = generate_cohort(N_TRAIN + N_TEST, seed=0, canaries=canaries)
    order = np.random.default_rng(0).permutation(table.num_rows)
    train = table.take(pa.array(order[:N_TRAIN]))
    test = table.take(pa.array(order[N_TRAIN:]))
    # the canaries must be in the rows the report reads, or the leak test proves nothing
    dx = set(train.column("primary_dx").to_pylist())
    assert canaries.primary_dx in dx or canaries.primary_dx in set(
        test.column("primary_dx").to_pylist()
    )
    return train, test


def independent_marginals(table: pa.Table, columns, seed: int) -> pa.Table:
    """Each column shuffled on its own: the marginals survive, every dependence is gone."""
    rng = np.random.default_rng(seed)
    return pa.table(
        {c: table.column(c).take(pa.array(rng.permutation(table.num_rows))) for c in columns}
    )


@pytest.fixture(scope="module")
def identical_report(split, contract, features):
    train, test = split
    return build_report(
        train,
        test,
        train,
        contract,
        label=LABEL,
        features=features,
        quasi_identifiers=("age", "sex", "hospital"),
    )


@pytest.fixture(scope="module")
def shuffled(split, features):
    return independent_marginals(split[0], (*features, LABEL), seed=1)


@pytest.fixture(scope="module")
def shuffled_report(split, shuffled, contract, features):
    train, test = split
    return build_report(
        train,
        test,
        shuffled,
        contract,
        label=LABEL,
        features=features,
        quasi_identifiers=("age", "sex", "hospital"),
    )


# --- scores ------------------------------------------------------------------------------------


def test_identical_synthetic_table_scores_perfect_and_is_all_copies(identical_report):
    r = identical_report
    assert r.quality == pytest.approx(1.0, abs=1e-9)
    assert r.column_shapes == pytest.approx(1.0, abs=1e-9)
    assert r.column_pair_trends_all_pairs == pytest.approx(1.0, abs=1e-9)
    assert set(r.column_shape_scores.values()) == {1.0}
    assert r.new_row_share == 0.0
    assert r.new_row_share_qi == 0.0
    assert r.dcr_median == pytest.approx(0.0, abs=1e-6)
    assert r.dcr_p05 == pytest.approx(0.0, abs=1e-6)
    # held-out real persons are not copies of the training persons: the yardstick is far away
    assert r.dcr_holdout_median > 0.3
    assert r.tstr_auroc == pytest.approx(r.trtr_auroc)
    assert r.tstr_gap == pytest.approx(0.0, abs=1e-12)
    assert (r.n_real, r.n_real_test, r.n_synth) == (N_TRAIN, N_TEST, N_TRAIN)


def test_independent_marginals_fool_the_quality_score_but_not_tstr(shuffled_report):
    """docs/engines.md: quality does not measure usefulness. Here the proof."""
    r = shuffled_report
    # every column's distribution is exactly the real one ...
    assert r.column_shapes >= 0.99
    assert min(r.column_shape_scores.values()) >= 0.99
    # ... and the plain mean of the pairwise trend scores stays high (most real pairs are
    # weakly related, so "no relation at all" looks close to them) ...
    assert r.column_pair_trends_all_pairs >= 0.9
    # ... but a model trained on it has learnt nothing about the label
    assert abs(r.tstr_auroc - 0.5) <= 0.1
    assert r.trtr_auroc >= 0.65
    assert r.tstr_gap >= 0.1
    # no row is a copy once all columns count; nearly every row copies someone's (age, sex,
    # hospital): a handful of coarse quasi-identifiers cannot tell a new row from a copy
    assert r.new_row_share >= 0.99
    assert r.new_row_share_qi is not None and r.new_row_share_qi < 0.2


def test_independent_marginals_gradient_boosting_also_at_chance(split, shuffled, contract):
    train, test = split
    features = contract.feature_names()
    r = build_report(
        train.slice(0, 2_500),
        test,
        shuffled.slice(0, 2_500),
        contract,
        label=LABEL,
        features=features,
        model=TSTRModel.GRADIENT_BOOSTING,
    )
    assert r.tstr_model is TSTRModel.GRADIENT_BOOSTING
    assert abs(r.tstr_auroc - 0.5) <= 0.1
    assert r.trtr_auroc >= 0.62  # 2,500 training rows: the real model still finds the signal
    assert r.tstr_gap >= 0.1
    assert r.new_row_share_qi is None


def test_synthetic_label_with_one_class_scores_chance_with_a_note(split, contract):
    train, test = split
    small = train.slice(0, 1_500)
    features = ("age", "sex", "chf")
    zeros = pa.array(np.zeros(small.num_rows, dtype=np.int8))
    synth = small.set_column(small.schema.get_field_index(LABEL), LABEL, zeros)
    r = build_report(small, test, synth, contract, label=LABEL, features=features)
    assert r.tstr_auroc == 0.5
    assert any("one class" in note for note in r.notes)


def test_jittered_copies_pass_the_copy_check_but_not_dcr(split, contract):
    """Nudging one number makes every row "new"; DCR still sees them sitting on real rows."""
    train, test = split
    small = train.slice(0, 2_000)
    age = pc.add(small.column("age"), 0.01)
    jittered = small.set_column(small.schema.get_field_index("age"), "age", age)
    r = build_report(
        small,
        test,
        jittered,
        contract,
        label=LABEL,
        features=("age", "sex", "length_of_stay", "sbp", "primary_dx"),
    )
    assert r.new_row_share == 1.0
    assert r.dcr_p05 < 1e-3 and r.dcr_median < 1e-3  # 0.01 years over an 87-year domain
    assert r.dcr_holdout_median > 100 * r.dcr_median


# --- the two views -----------------------------------------------------------------------------


def test_aggregate_view_holds_scalars_only(shuffled_report):
    view = shuffled_report.aggregate_view()
    for key, value in view.items():
        assert value is None or (isinstance(value, int | float) and not isinstance(value, bool)), (
            key
        )
        if isinstance(value, float):
            assert math.isfinite(value), key
    # the exact number of real persons is not a score: steward view only
    assert "n_real" not in view and "n_real_test" not in view
    assert "n_real" in shuffled_report.steward_view()


def test_no_row_value_reaches_either_view(shuffled_report, identical_report, canaries, contract):
    """Canaries are in the real rows and in the synthetic rows: neither view may hold one.

    The steward view names columns; it never holds a value, not even a declared category.
    """
    values = set(canaries.values())
    values |= set(contract.column("primary_dx").categories or ())
    values |= set(contract.column("hospital").categories or ())
    for report in (shuffled_report, identical_report):
        for view in (report.aggregate_view(), report.steward_view()):
            text = json.dumps(view, allow_nan=False)
            leaked = [v for v in values if v in text]
            assert not leaked
    steward = shuffled_report.steward_view()
    assert set(steward["column_shape_scores"]) <= set(contract.names)
    assert json.loads(json.dumps(steward)) == steward


def test_report_prints_and_logs_nothing(split, shuffled, contract, capfd, caplog):
    train, test = split
    build_report(
        train.slice(0, 2_000), test, shuffled.slice(0, 2_000), contract,
        label=LABEL, features=("age", "primary_dx", "chf"),
    )  # fmt: skip
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert caplog.records == []


def test_report_is_frozen(identical_report):
    with pytest.raises(AttributeError):
        identical_report.quality = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        identical_report.column_shape_scores["age"] = 0.0  # type: ignore[index]


# --- plots -------------------------------------------------------------------------------------


def test_plots_are_valid_pngs(shuffled_report, split, shuffled, contract, tmp_path, canaries):
    import matplotlib.image

    paths = save_plots(shuffled_report, split[0], shuffled, contract, tmp_path / "plots")
    assert [p.name for p in paths] == ["column_shapes.png", "marginals.png", "utility.png"]
    for path in paths:
        data = Path(path).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(path, format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert not any(v.encode() in data for v in canaries.values())


def test_plots_without_marginals(shuffled_report, split, shuffled, contract, tmp_path):
    paths = save_plots(shuffled_report, split[0], shuffled, contract, tmp_path, max_marginals=0)
    assert [p.name for p in paths] == ["column_shapes.png", "utility.png"]


# --- errors: name the field and the fix, never a value -----------------------------------------


def test_errors_name_the_field_and_never_a_value(split, shuffled, contract, canaries):
    train, test = split
    kw = {"label": LABEL, "features": ("age", "sex")}

    with pytest.raises(SpecError) as info:
        build_report(train, test, shuffled, contract, label="age", features=("sex",))
    assert info.value.field == "label"

    with pytest.raises(SpecError) as info:
        build_report(train, test, shuffled, contract, label=LABEL, features=("age", LABEL))
    assert info.value.field == "features"

    with pytest.raises(SpecError) as info:
        build_report(train, test, shuffled, contract, **kw, model="forest")
    assert info.value.field == "model"

    with pytest.raises(SpecError) as info:
        build_report(train, test.slice(0, 0), shuffled, contract, **kw)
    assert info.value.field == "real_test"

    with pytest.raises(SpecError) as info:
        build_report(train, test, shuffled, contract, **kw, quasi_identifiers=("nope",))
    assert info.value.field == "quasi_identifiers"

    with pytest.raises(SchemaError) as info:
        build_report(train, test, shuffled.drop_columns(["sex"]), contract, **kw)
    assert info.value.column == "sex" and "synth" in str(info.value)

    bad = pc.if_else(
        pa.array(np.arange(shuffled.num_rows) == 41), pa.scalar(7, pa.int8()),
        shuffled.column(LABEL),
    )  # fmt: skip
    bad_synth = shuffled.set_column(shuffled.schema.get_field_index(LABEL), LABEL, bad)
    with pytest.raises(SchemaError) as info:
        build_report(train, test, bad_synth, contract, **kw)
    assert info.value.column == LABEL and info.value.row == 42
    assert "7" not in str(info.value).replace("42", "")

    negatives = test.filter(pc.equal(test.column(LABEL), 0))
    with pytest.raises(SpecError) as info:
        build_report(train, negatives, shuffled, contract, **kw)
    assert info.value.field == "real_test" and "one label class" in str(info.value)

    with pytest.raises(SpecError):
        save_plots(object(), train, shuffled, contract, "unused")  # type: ignore[arg-type]


# --- the contract as SDV metadata --------------------------------------------------------------


def test_contract_metadata_maps_types_and_loads_in_sdv(contract, tmp_path_factory):
    meta = contract_metadata(contract)
    columns = meta["tables"]["data"]["columns"]
    assert columns["subject_id"]["sdtype"] == "id"
    assert meta["tables"]["data"]["primary_key"] == "subject_id"
    assert columns["age"]["sdtype"] == "numerical"
    assert columns["chf"]["sdtype"] == "categorical"  # a 0/1 flag
    assert columns["prior_admissions"]["sdtype"] == "numerical"
    assert columns["sex"]["sdtype"] == "categorical"
    assert columns["cancer"]["sdtype"] == "boolean"
    assert columns["admission_date"]["sdtype"] == "datetime"
    assert columns[LABEL]["sdtype"] == "categorical"
    for direct in ("patient_name", "address", "phone"):
        assert direct not in columns
    with pytest.raises(SpecError):
        contract_metadata(contract, ["phone"])

    with pytest.MonkeyPatch.context() as mp:
        # SDV writes a usage log under XDG_DATA_HOME: keep it in a temp dir
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))
        from sdv.metadata import Metadata

        loaded = Metadata.load_from_dict(meta)
        loaded.validate()
        assert loaded.to_dict()["tables"]["data"]["columns"]["sex"]["sdtype"] == "categorical"


def test_report_type_is_public():
    assert SynthReport.__dataclass_params__.frozen  # type: ignore[attr-defined]
