"""``scale = "log"`` in the schema contract: its rules, its round trip, preprocessing of a log
column (closed form, ends, monotone, fill, clamping), the released plan applied identically
at predict time, and dummy data that follows the declared scale.

A log column is spread by ``log(1 + x)`` (``np.log1p``) over its declared domain, which must
have ``min >= 0``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from connectors.cohort import cohort_contract
from connectors.dummy import dummy_table
from connectors.preprocess import FeaturePlan
from connectors.preprocess_steps import FeatureStep, StepKind
from connectors.scale_arrays import scale_edges
from connectors.scales import Scale
from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import SchemaError, SpecError

LO, HI, FILL = 0.5, 5_000.0, 4.0

CONTRACT = f"""
[columns.pid]
type = "string"
role = "identifier"

[columns.crp]
type = "float64"
role = "feature"
min = {LO}
max = {HI}
fill = {FILL}
scale = "log"
missing_rate = 0.1

[columns.visits]
type = "int32"
role = "feature"
min = 0
max = 10000
scale = "log"

[columns.age]
type = "float64"
role = "feature"
min = 0
max = 110

[columns.y]
type = "int8"
role = "label"
"""


def contract() -> SchemaContract:
    return SchemaContract.from_toml_text(CONTRACT)


def closed_form(x: np.ndarray | float, lo: float, hi: float) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float64), lo, hi)
    return (np.log1p(x) - math.log1p(lo)) / (math.log1p(hi) - math.log1p(lo))


# -- the contract's rules -------------------------------------------------------------------
def _column(**keys: object) -> dict[str, object]:
    return {"type": "float64", "role": "feature", "min": 0, "max": 100, **keys}


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        (_column(scale="logarithmic"), 'must be "linear" or "log"'),
        (_column(scale=1), 'must be "linear" or "log"'),
        (_column(scale=True), 'must be "linear" or "log"'),
        (_column(scale="log", min=-1), "needs min >= 0"),
        ({"type": "float64", "role": "sensitive", "scale": "log"}, "needs a declared domain"),
        ({"type": "string", "role": "sensitive", "scale": "log"}, "integer or float column"),
        ({"type": "date32", "role": "sensitive", "scale": "log"}, "integer or float column"),
        (
            {"type": "int8", "role": "label", "min": 0, "max": 1, "scale": "log"},
            "not allowed on a label column",
        ),
        ({"type": "string", "role": "identifier", "scale": "log"}, "identifier column"),
        ({"type": "string", "role": "site", "scale": "log"}, "not allowed on a site column"),
    ],
)
def test_a_bad_scale_names_the_key_and_the_fix(table: dict[str, object], problem: str) -> None:
    with pytest.raises(SchemaError) as caught:
        ColumnSpec.from_dict("x", table)
    message = str(caught.value)
    assert "columns.x.scale" in message and problem in message and "(fix: " in message


def test_the_error_for_a_negative_min_says_what_to_declare() -> None:
    with pytest.raises(SchemaError, match=r"columns\.x\.scale.*fix: declare min >= 0"):
        ColumnSpec.from_dict("x", _column(scale="log", min=-3))


def test_scale_is_a_known_key_and_log_is_allowed_where_documented() -> None:
    assert ColumnSpec.from_dict("x", _column(scale="log")).scale is Scale.LOG
    assert ColumnSpec.from_dict("x", _column(scale="log", min=0)).scale is Scale.LOG
    sensitive = {"type": "int32", "role": "sensitive", "min": 1, "max": 9, "scale": "log"}
    assert ColumnSpec.from_dict("x", sensitive).scale is Scale.LOG
    assert ColumnSpec("x", "float64", Role.FEATURE, min=0, max=1).scale is Scale.LINEAR
    from_str = ColumnSpec("x", "float64", Role.FEATURE, min=0, max=1, scale="log")  # type: ignore[arg-type]
    assert from_str.scale is Scale.LOG


def test_round_trip_and_linear_is_left_out_of_the_dict() -> None:
    c = contract()
    d = c.to_dict()
    assert d["columns"]["crp"]["scale"] == "log"
    assert "scale" not in d["columns"]["age"]
    assert SchemaContract.from_dict(json.loads(json.dumps(d))) == c
    # an explicit "linear" is the default: the dict (and so any hash of it) is unchanged
    explicit = SchemaContract.from_toml_text(
        CONTRACT.replace("max = 110", 'max = 110\nscale = "linear"')
    )
    assert explicit.to_dict() == d and explicit == c
    # contracts written before the key keep their dicts
    assert all("scale" not in col for col in cohort_contract().to_dict()["columns"].values())


def test_scale_edges_are_geometric_in_one_plus_x() -> None:
    edges = scale_edges(0.0, 999.0, 3, Scale.LOG)
    assert edges.tolist() == pytest.approx([0.0, 9.0, 99.0, 999.0])
    assert edges[0] == 0.0 and edges[-1] == 999.0
    assert scale_edges(0.0, 3.0, 3, Scale.LINEAR).tolist() == [0.0, 1.0, 2.0, 3.0]


# -- preprocessing ----------------------------------------------------------------------------
def test_a_log_column_becomes_a_log_step() -> None:
    plan = FeaturePlan.from_contract(contract(), ["crp", "visits", "age"])
    crp, visits, age = plan.steps
    assert (crp.kind, crp.min, crp.max, crp.fill) == (StepKind.LOG, LO, HI, FILL)
    assert visits.kind is StepKind.LOG and age.kind is StepKind.NUMERIC
    assert plan.output_names == (
        "crp", "crp__missing", "visits", "visits__missing", "age", "age__missing",
    )  # fmt: skip
    assert plan.to_dict()["steps"][0] == {
        "name": "crp", "kind": "log", "type": "float64", "min": LO, "max": HI, "fill": FILL,
    }  # fmt: skip


def test_log_preprocessing_is_the_closed_form_monotone_and_maps_the_ends() -> None:
    plan = FeaturePlan.from_contract(contract(), ["crp"])
    x = np.concatenate([[LO, HI], np.geomspace(LO, HI, 2_000)])
    out = plan.transform(pa.table({"crp": pa.array(x)}))
    assert out[0, 0] == 0.0 and out[1, 0] == 1.0  # exactly the linear path's ends
    np.testing.assert_allclose(out[:, 0], closed_form(x, LO, HI), rtol=0, atol=2e-6)
    assert np.all(np.diff(out[2:, 0]) >= 0)  # monotone (float32 may tie neighbours)
    assert np.all(out[:, 1] == 0.0)
    # spread evenly on the log scale: the geometric midpoint sits in the middle, where the
    # linear path would put it at 1.4% of the range
    mid = math.sqrt((1 + LO) * (1 + HI)) - 1
    got = plan.transform(pa.table({"crp": pa.array([mid])}))[0, 0]
    assert got == pytest.approx(0.5, abs=1e-6)


def test_log_preprocessing_clamps_and_fills_through_the_same_transform() -> None:
    plan = FeaturePlan.from_contract(contract(), ["crp", "visits"])
    table = pa.table(
        {
            "crp": pa.array([0.0, -10.0, 1e9, None, float("nan"), 7.0]),
            "visits": pa.array([0, 10_000, 20_000, None, 3, 1], pa.int32()),
        }
    )
    out = plan.transform(table)
    fill = closed_form(np.asarray([FILL]), LO, HI)[0]
    np.testing.assert_allclose(
        out[:, 0], [0, 0, 1, fill, fill, closed_form(7.0, LO, HI)], atol=2e-6
    )
    assert out[:, 1].tolist() == [0, 0, 0, 1, 1, 0]
    # no declared fill: the midpoint of the log scale; 0 is allowed (log1p(0) = 0)
    np.testing.assert_allclose(
        out[:, 2], [0, 1, 1, 0.5, *closed_form(np.asarray([3.0, 1.0]), 0, 1e4)], atol=2e-6
    )
    assert out[:, 3].tolist() == [0, 0, 0, 1, 0, 0]


def test_a_log_step_from_json_is_checked() -> None:
    with pytest.raises(SpecError, match=r"steps\.x\.min"):
        FeatureStep("x", StepKind.LOG, "float64", -1.0, 10.0)
    with pytest.raises(SpecError, match=r"steps\.x\.fill"):
        FeatureStep("x", StepKind.LOG, "float64", 1.0, 10.0, fill=20.0)
    plan = FeaturePlan.from_contract(contract(), ["crp"]).to_dict()
    plan["steps"][0]["kind"] = "logarithmic"
    with pytest.raises(SpecError, match=r"steps\.crp\.kind"):
        FeaturePlan.from_dict(plan)


def test_the_released_plan_is_applied_identically_at_predict_time(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from training.models import ModelConfig, ModelKind, build_model
    from training.predict import ReleasedModel

    c = contract()
    plan = FeaturePlan.from_contract(c, ["crp", "visits", "age"])
    (tmp_path / "preprocessing.json").write_text(json.dumps(plan.to_dict()))
    cfg = ModelConfig(kind=ModelKind("logistic"), hidden=())
    model = build_model(cfg, plan.n_outputs, seed=3)
    meta = {"model": json.dumps({"kind": cfg.kind.value, "hidden": []})}
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"), metadata=meta)

    rows = dummy_table(c, 500, seed=4).select(["crp", "visits", "age"])
    released = ReleasedModel.load(tmp_path)
    assert released.plan == plan and released.plan.steps[0].kind is StepKind.LOG
    x = released.plan.transform(rows)
    assert np.array_equal(x, plan.transform(rows))
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(plan.transform(rows))).reshape(-1))
    # scoring runs the network in NumPy (no torch outside the zone): torch's own forward
    # pass to float32 rounding (the two libraries sum a product in different orders)
    np.testing.assert_allclose(released.predict(rows), expected.numpy(), rtol=1e-6, atol=1e-7)


# -- dummy data -------------------------------------------------------------------------------
def test_dummy_data_follows_the_declared_scale() -> None:
    c = contract()
    table = dummy_table(c, 20_000, seed=7)
    crp = np.asarray(table["crp"].drop_null(), dtype=np.float64)
    visits = np.asarray(table["visits"], dtype=np.float64)
    assert crp.min() >= LO and crp.max() <= HI and visits.min() >= 0 and visits.max() <= 10_000
    assert table["crp"].null_count == 2_000
    # linear would put half the values above 2500; on the log scale the bulk is low and the
    # tail reaches the top of the domain
    assert np.median(visits) < 300 and visits.max() > 5_000
    assert np.median(crp) < 200 and crp.max() > 2_500
    # uniform on log(1 + x): each decile of the log scale holds about a tenth of the values
    shares = np.histogram(closed_form(visits, 0, 1e4), bins=10, range=(0, 1))[0] / visits.size
    assert np.all(np.abs(shares - 0.1) < 0.03)
    # triangular on the log scale with its mode at the declared fill: mean (0 + mode + 1) / 3
    mode = closed_form(FILL, LO, HI)
    assert np.mean(closed_form(crp, LO, HI)) == pytest.approx((1 + mode) / 3, abs=0.01)
    assert dummy_table(c, 100, seed=7).equals(dummy_table(c, 100, seed=7))
