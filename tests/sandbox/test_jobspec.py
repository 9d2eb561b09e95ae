"""The job spec parser: every field validated, any input gives a spec or one SpecError."""

from __future__ import annotations

import tomllib

import pytest
from factories import job_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from foundation.errors import SpecError
from sandbox.jobs import ALLOWED, JobState, check_transition
from sandbox.jobspec import parse_job_spec, parse_job_toml

GOOD = """
project = "readmission"
dataset = "cohort"
label = "readmitted_30d"
features = ["age", "sex"]
[model]
kind = "mlp"
hidden = [8, 8]
[privacy]
epsilon = 2.0
delta = 1e-6
max_grad_norm = 1.0
[training]
epochs = 5
batch_size = 512
lr = 0.1
seed = 7
[resources]
gpus = 0
"""


def test_good_spec_round_trips() -> None:
    spec = parse_job_toml(GOOD)
    assert spec.columns == frozenset({"age", "sex", "readmitted_30d"})
    assert parse_job_spec(spec.to_dict()) == spec
    assert spec.spec_hash() == parse_job_toml(GOOD).spec_hash()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"privacy.epsilon": -1.0}, "privacy.epsilon"),
        ({"privacy.epsilon": float("nan")}, "privacy.epsilon"),
        ({"privacy.delta": 0.5}, "privacy.delta"),
        ({"privacy.max_grad_norm": 0.0}, "privacy.max_grad_norm"),
        ({"training.epochs": 0}, "training.epochs"),
        ({"training.batch_size": 1.5}, "training.batch_size"),
        ({"training.lr": 0}, "training.lr"),
        ({"resources.gpus": -1}, "resources.gpus"),
        ({"features": []}, "features"),
        ({"features": ["age", "age"]}, "features"),
        ({"features": ["readmitted_30d"]}, "features"),
        ({"mode": "quantum"}, "mode"),
    ],
)
def test_each_field_is_named(override, field) -> None:
    with pytest.raises(SpecError) as err:
        job_spec(**override)
    assert err.value.field == field
    assert err.value.fix  # every refusal says how to fix it


def test_unknown_key_is_refused() -> None:
    with pytest.raises(SpecError) as err:
        parse_job_toml(GOOD.replace("lr = 0.1", "lr = 0.1\nlearning_rate = 0.1"))
    assert err.value.field == "training.learning_rate"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_fuzz_any_text(text: str) -> None:
    try:
        parse_job_toml(text)
    except SpecError:
        pass


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**7),
    st.floats(allow_nan=True),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["privacy", "training", "model", "resources", "features", "label", "mode"]),
        st.one_of(
            _scalar,
            st.dictionaries(st.text(max_size=12), _scalar, max_size=4),
            st.lists(_scalar, max_size=3),
        ),
    )
)
def test_fuzz_structured(mutation) -> None:
    data = tomllib.loads(GOOD)
    data.update(mutation)
    try:
        parse_job_spec(data)
    except SpecError:
        pass


def test_job_transitions_are_data() -> None:
    for src in JobState:
        for dst in JobState:
            if (src, dst) in ALLOWED:
                check_transition(src, dst)
            else:
                with pytest.raises(Exception, match="cannot go"):
                    check_transition(src, dst)
