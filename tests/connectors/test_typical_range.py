"""``typical = [low, high]`` in the schema contract: its rules, preprocessing by it (linear and
log, the ends, values outside it, the domain's clamp, the fill), the released plan's round
trip, and a contract that misuses it refused by ``sandbox dataset check`` naming the key.

The typical range is where most values fall, declared from a published reference range: the
scaling's anchors, so a domain declared wide for safety no longer squeezes the values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from cli_runner import sandbox

from connectors.preprocess import FeaturePlan
from connectors.schema import SchemaContract
from foundation.errors import SchemaError, SpecError

CONTRACT = """
[columns.pid]
type = "string"
role = "identifier"

[columns.age]
type = "int16"
role = "feature"
min = 0
max = 120
{age}

[columns.crp]
type = "float64"
role = "feature"
min = 0
max = 500
scale = "log"
{crp}

[columns.sex]
type = "string"
role = "feature"
categories = ["F", "M"]
{sex}

[columns.y]
type = "int8"
role = "label"
{label}
"""


def contract(age: str = "typical = [30, 80]", crp: str = "typical = [1, 50]", **more: str):
    text = CONTRACT.format(age=age, crp=crp, sex=more.get("sex", ""), label=more.get("label", ""))
    return SchemaContract.from_toml_text(text)


@pytest.mark.parametrize(
    ("kwargs", "key", "problem"),
    [
        ({"age": "typical = [80, 30]"}, "columns.age.typical", "low below high"),
        ({"age": "typical = [-5, 30]"}, "columns.age.typical", "within the declared domain"),
        ({"age": "typical = [30, 121]"}, "columns.age.typical", "within the declared domain"),
        ({"age": 'typical = "30-80"'}, "columns.age.typical", "two numbers"),
        ({"age": "typical = [30]"}, "columns.age.typical", "two numbers"),
        ({"age": "typical = [true, 80]"}, "columns.age.typical", "two numbers"),
        ({"sex": "typical = [0, 1]"}, "columns.sex.typical", "numeric feature or sensitive"),
        ({"label": "typical = [0, 1]"}, "columns.y.typical", "numeric feature or sensitive"),
    ],
)
def test_a_misused_typical_range_is_refused_naming_the_key_and_the_fix(
    kwargs: dict[str, str], key: str, problem: str
) -> None:
    with pytest.raises(SchemaError) as err:
        contract(**kwargs)
    text = str(err.value)
    assert key in text and problem in text, text
    assert "write typical = [low, high] inside [min, max]" in text


def test_the_typical_range_anchors_the_scaling_and_the_domain_still_clamps() -> None:
    plan = FeaturePlan.from_contract(contract(), ["age", "crp"])
    ages = [0, 30, 55, 80, 120, 500, None]
    crps = [0.0, 1.0, 7.0, 50.0, 500.0, 9e9, None]
    table = pa.table({"age": pa.array(ages, pa.int16()), "crp": crps})
    out = plan.transform(table)
    age, age_missing, crp, crp_missing = out.T
    # linear: -2 + 4 (x - 30) / 50 (the typical range on [-2, 2], z-score-like); the
    # domain's ends are kept beyond it; 500 clamps to 120
    np.testing.assert_allclose(age[:6], [-4.4, -2.0, 0.0, 2.0, 5.2, 5.2], atol=1e-5)
    assert age[1] == -2.0 and age[3] == 2.0  # the anchors land exactly

    # log: -2 + 4 (log1p(x) - log1p(1)) / (log1p(50) - log1p(1)); 9e9 clamps to 500
    def log_scaled(x: float) -> float:
        return -2 + 4 * (math.log1p(x) - math.log1p(1)) / (math.log1p(50) - math.log1p(1))

    want = [log_scaled(x) for x in (0.0, 1.0, 7.0, 50.0, 500.0, 500.0)]
    np.testing.assert_allclose(crp[:6], want, atol=1e-5)
    assert crp[1] == -2.0 and crp[3] == 2.0
    # a missing value: the typical range's midpoint (on the column's scale), flagged
    assert age[6] == pytest.approx(0.0) and crp[6] == pytest.approx(0.0)
    assert list(age_missing) == [0] * 6 + [1] and list(crp_missing) == [0] * 6 + [1]
    # an all-missing chunk gets the same fill
    empty = plan.transform(pa.table({"age": pa.nulls(2, pa.int16()), "crp": pa.nulls(2)}))
    assert list(empty[:, 0]) == [0.0, 0.0] and list(empty[:, 2]) == [0.0, 0.0]


def test_a_declared_fill_is_scaled_by_the_typical_range() -> None:
    plan = FeaturePlan.from_contract(contract(age="typical = [30, 80]\nfill = 90"), ["age"])
    out = plan.transform(pa.table({"age": pa.array([None], pa.int16())}))
    assert out[0, 0] == pytest.approx(-2 + 4 * 1.2)


def test_a_plan_released_before_spans_transforms_as_it_did() -> None:
    """A released ``preprocessing.json`` without ``span`` keeps its typical range on [0, 1]:
    a model trained on it still gets the inputs it learned on."""
    plan = FeaturePlan.from_contract(contract(), ["age", "crp"])
    old = plan.to_dict()
    assert [s["span"] for s in old["steps"]] == [[-2.0, 2.0], [-2.0, 2.0]]
    for step in old["steps"]:
        del step["span"]
    before = FeaturePlan.from_dict(old)
    table = pa.table({"age": pa.array([30, 55, 80, None], pa.int16()), "crp": [1.0, 1.0, 50, 1]})
    out = before.transform(table)
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 1.0, 0.5], atol=1e-6)
    assert out[0, 2] == 0.0 and out[2, 2] == 1.0
    assert "span" not in before.to_dict()["steps"][0]


@pytest.mark.parametrize(
    ("span", "problem"),
    [([2.0, -2.0], "low to high"), ([0, "1"], "must be a number"), ([1.0], "two numbers")],
)
def test_a_bad_span_in_an_edited_plan_is_refused_by_name(span: list[Any], problem: str) -> None:
    bad = FeaturePlan.from_contract(contract(), ["age"]).to_dict()
    bad["steps"][0]["span"] = span
    with pytest.raises(SpecError, match="steps.age.span") as err:
        FeaturePlan.from_dict(bad)
    assert problem in str(err.value)


def test_a_span_needs_a_typical_range() -> None:
    bad = FeaturePlan.from_contract(contract(age=""), ["age"]).to_dict()
    bad["steps"][0]["span"] = [-2.0, 2.0]
    with pytest.raises(SpecError, match="steps.age.span.*needs a typical range"):
        FeaturePlan.from_dict(bad)


def test_without_a_typical_range_the_domain_scales_as_before() -> None:
    c = contract(age="", crp="")
    plan = FeaturePlan.from_contract(c, ["age", "crp"])
    assert all("typical" not in step for step in plan.to_dict()["steps"])
    assert "typical" not in c.to_dict()["columns"]["age"]
    out = plan.transform(
        pa.table({"age": pa.array([0, 60, 120], pa.int16()), "crp": [0, 0, 500.0]})
    )
    np.testing.assert_allclose(out[:, 0], [0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(out[:, 2], [0.0, 0.0, 1.0], atol=1e-7)


def test_the_released_plan_carries_the_typical_range_and_transforms_alike() -> None:
    c = contract()
    assert c.to_dict()["columns"]["age"]["typical"] == [30.0, 80.0]
    assert SchemaContract.from_dict(c.to_dict()) == c
    plan = FeaturePlan.from_contract(c, ["age", "crp"])
    again = FeaturePlan.from_dict(plan.to_dict())
    assert again == plan and again.to_dict()["steps"][1]["typical"] == [1.0, 50.0]
    table = pa.table({"age": pa.array([12, 99], pa.int16()), "crp": [0.3, 180.0]})
    np.testing.assert_array_equal(again.transform(table), plan.transform(table))
    # a plan edited outside the zone with a typical range outside its domain is refused
    bad = plan.to_dict()
    bad["steps"][0]["typical"] = [-10, 80]
    with pytest.raises(SpecError, match="steps.age.typical"):
        FeaturePlan.from_dict(bad)


def test_dataset_check_refuses_a_misused_typical_range_naming_the_key(tmp_path: Path) -> None:
    schema = tmp_path / "bad.toml"
    schema.write_text(CONTRACT.format(age="typical = [30, 200]", crp="", sex="", label=""))
    data = tmp_path / "rows.csv"
    data.write_text("pid,age,crp,sex,y\np1,40,3.0,F,0\np2,70,12.0,M,1\n")
    proc = sandbox("dataset", "check", str(data), "--schema", str(schema), zone=tmp_path / "z")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "columns.age.typical" in proc.stderr and "within the declared domain" in proc.stderr
    good = tmp_path / "good.toml"
    good.write_text(CONTRACT.format(age="typical = [30, 80]", crp="", sex="", label=""))
    proc = sandbox("dataset", "check", str(data), "--schema", str(good), zone=tmp_path / "z")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


def test_dataset_check_notes_a_typical_range_that_holds_too_few_values(tmp_path: Path) -> None:
    """A typical range is a reference range (about 95% of values): when far fewer of the
    file's values fall in it, `dataset check` says so (a note: it still ingests), with shares
    and counts, never a value; a range that holds them says nothing."""
    schema = tmp_path / "c.toml"
    schema.write_text(
        CONTRACT.format(age="typical = [30, 80]", crp="typical = [1, 5]", sex="", label="")
    )
    # ages all inside; crp: 7 of 10 above 5 (a long tail), 1 below 1
    ages = [31, 45, 50, 62, 70, 79, 55, 41, 38, 66]
    crps = [0.5, 2.0, 3.0, 7.5, 12.0, 30.0, 45.5, 81.0, 160.0, 9.25]
    data = tmp_path / "rows.csv"
    lines = ["pid,age,crp,sex,y"] + [
        f"p{i},{a},{c},F,{i % 2}" for i, (a, c) in enumerate(zip(ages, crps, strict=True))
    ]
    data.write_text("\n".join(lines) + "\n")
    proc = sandbox("dataset", "check", str(data), "--schema", str(schema), zone=tmp_path / "z")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    text = " ".join(proc.stdout.split())
    assert "note: column 'crp': 80% of its values lie outside its typical range" in text
    assert "(10% below, 70% above)" in text and 'declare scale = "log"' in text
    assert "'age'" not in text  # all of age's values are inside its range
    for value in ("7.5", "12.0", "45.5", "81.0", "160.0", "9.25"):
        assert value not in proc.stdout  # shares and counts, never a value
    js = sandbox(
        "dataset", "check", str(data), "--schema", str(schema), "--json", zone=tmp_path / "z"
    )
    out = json.loads(js.stdout)
    assert out["ok"] is True
    assert out["typical"]["crp"] == {"below": 1, "above": 7, "values": 10}
    assert out["typical"]["age"] == {"below": 0, "above": 0, "values": 10}
    assert len(out["notes"]) == 1 and out["notes"][0].startswith("column 'crp'")
