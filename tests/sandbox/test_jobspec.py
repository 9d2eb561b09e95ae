"""The job spec parser: every field validated, any input gives a spec or one SpecError."""

from __future__ import annotations

import hashlib
import json
import tomllib

import pytest
from factories import job_spec
from hypothesis import given, settings
from hypothesis import strategies as st

from foundation.errors import SpecError
from sandbox.jobs import ALLOWED, JobState, check_transition
from sandbox.jobspec import TrainingSpec, parse_job_spec, parse_job_toml, parse_stored_spec
from training.dpsgd_config import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, Optimizer

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


# --- training.optimizer ------------------------------------------------------------------------


def _training(**fields: object) -> dict:
    data = tomllib.loads(GOOD)
    data["training"] = {k: v for k, v in {**data["training"], **fields}.items() if v is not None}
    return data


def test_adam_is_the_default_with_an_lr_that_suits_it() -> None:
    """A user's spec without lr leaves it to the zone ("auto", chosen by the search); a
    stored spec without it reads back with the optimizer's default lr."""
    spec = parse_job_spec(_training(lr=None))
    assert spec.training.optimizer is Optimizer.ADAM
    assert spec.training.lr is None and spec.auto_fields == ("training.lr",)
    assert spec.training.weight_decay == 0.0
    stored = parse_stored_spec(_training(lr=None, optimizer="adam"))
    assert stored.training.lr == DEFAULT_LR[Optimizer.ADAM] == 0.03
    # the user's lr is kept, whatever the optimizer
    assert parse_job_toml(GOOD).training == TrainingSpec(5, 512, 0.1, 7, Optimizer.ADAM, 0.0)
    sgd = parse_stored_spec(_training(lr=None, optimizer="sgd"))
    assert (sgd.training.optimizer, sgd.training.lr) == (Optimizer.SGD, DEFAULT_LR[Optimizer.SGD])
    w = parse_stored_spec(_training(lr=None, optimizer="adamw", weight_decay=0.01))
    assert (w.training.lr, w.training.weight_decay) == (0.03, DEFAULT_WEIGHT_DECAY)
    w = parse_job_spec(_training(lr=None, optimizer="adamw"))
    assert (w.training.lr, w.training.weight_decay) == (None, DEFAULT_WEIGHT_DECAY)
    w = parse_job_spec(_training(optimizer="adamw", weight_decay=0.1))
    assert w.training.weight_decay == 0.1
    assert w.training.optimizer_summary() == {"name": "adamw", "lr": 0.1, "weight_decay": 0.1}
    assert stored.training.optimizer_summary() == {"name": "adam", "lr": 0.03}


@pytest.mark.parametrize(
    ("fields", "field", "fix"),
    [
        ({"optimizer": "rmsprop"}, "training.optimizer", "sgd, adam, adamw"),
        ({"optimizer": 1}, "training.optimizer", "sgd, adam, adamw"),
        ({"optimizer": "adam", "weight_decay": 0.01}, "training.weight_decay", "adamw"),
        ({"weight_decay": 0.1}, "training.weight_decay", "adamw"),
        ({"weight_decay": "a"}, "training.weight_decay", "adamw"),
        ({"optimizer": "sgd", "weight_decay": 0.01}, "training.weight_decay", "adamw"),
        ({"optimizer": "adamw", "weight_decay": -0.1}, "training.weight_decay", "raise"),
        ({"optimizer": "adamw", "weight_decay": 2.0}, "training.weight_decay", "lower"),
        ({"optimizer": "adamw", "weight_decay": "a"}, "training.weight_decay", "number"),
    ],
)
def test_optimizer_errors_name_the_field_and_the_options(fields, field, fix) -> None:
    with pytest.raises(SpecError) as err:
        parse_job_spec(_training(**fields))
    assert err.value.field == field
    assert fix in err.value.fix


def test_optimizer_round_trips_and_is_in_the_hash() -> None:
    specs = [parse_job_spec(_training(optimizer=o)) for o in ("adam", "adamw", "sgd")]
    specs.append(parse_job_spec(_training(optimizer="adamw", weight_decay=0.2)))
    for spec in specs:
        d = spec.to_dict()
        assert d["training"]["optimizer"] == spec.training.optimizer.value  # always written
        assert ("weight_decay" in d["training"]) == (spec.training.optimizer is Optimizer.ADAMW)
        assert parse_job_spec(d) == spec == parse_stored_spec(d)
        assert parse_stored_spec(d).spec_hash() == spec.spec_hash()
    assert len({s.spec_hash() for s in specs}) == len(specs)  # each setting hashes apart


def test_a_spec_stored_before_the_optimizer_existed_keeps_meaning_sgd_and_its_hash() -> None:
    """A stored spec without training.optimizer (every job before it existed) trained with
    SGD: read back it is SGD, and its hash is the one stored with it (the old to_dict, hashed
    as before). A user's spec without it now means Adam, and hashes apart."""
    sgd = parse_job_spec(_training(optimizer="sgd"))
    old = sgd.to_dict()
    del old["training"]["optimizer"]
    old_hash = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    stored = parse_stored_spec(old)
    assert stored == sgd and stored.training.optimizer is Optimizer.SGD
    assert stored.spec_hash() == old_hash == sgd.spec_hash()
    written_now = parse_job_spec(old)
    assert written_now.training.optimizer is Optimizer.ADAM
    assert written_now.spec_hash() != old_hash


def test_the_optimizer_does_not_change_the_plan() -> None:
    """Post-processing of the privatized gradient: the same epsilon, noise, sample rate and
    steps for every optimizer (DP-SGD and each federated site)."""
    from sandbox.mechanisms.dpsgd import plan_spec, service_plan
    from sandbox.mechanisms.federated import _config
    from training.federated.site_plan import plan_for

    specs = [
        parse_job_spec(_training(optimizer="sgd")),
        parse_job_spec(_training(optimizer="adam")),
        parse_job_spec(_training(optimizer="adamw", weight_decay=0.3)),
        parse_job_spec(_training(lr=None)),
    ]
    plans = [plan_spec(s, 40_000, disjoint=True).to_dict() for s in specs]
    assert all(p == plans[0] for p in plans)
    assert {"noise_multiplier", "sample_rate", "steps", "epsilon"} <= set(plans[0])
    served = [service_plan(s, 40_000, counts_public=False, disjoint=True) for s in specs]
    assert all(p == served[0] for p in served)

    fed = tomllib.loads(FEDERATED)
    site_plans = []
    for fields in ({"optimizer": "sgd"}, {}, {"optimizer": "adamw", "weight_decay": 0.1}):
        spec = parse_job_spec({**fed, "training": {**fed["training"], **fields}})
        cfg = _config(spec, ("hospital-a", "hospital-b"), None)
        assert cfg.optimizer is spec.training.optimizer
        assert cfg.weight_decay == spec.training.weight_decay
        site_plans.append(plan_for(cfg, "hospital-a", 5_000))
    assert all(p == site_plans[0] for p in site_plans)


FEDERATED = """
project = "readmission"
dataset = "cohort"
label = "readmitted_30d"
features = ["age", "sex"]
mode = "federated"
[federated]
rounds = 3
[model]
kind = "logistic"
[privacy]
epsilon = 1.0
delta = 1e-6
[training]
batch_size = 64
"""


def test_the_example_specs_parse_with_their_documented_defaults() -> None:
    from pathlib import Path

    from sandbox.jobspec import load_job_spec

    examples = Path(__file__).resolve().parents[2] / "docs" / "examples"
    job = load_job_spec(examples / "job.toml")
    # lr is left out: "auto", the zone chooses it (docs/tuning.md)
    assert job.training.optimizer is Optimizer.ADAM and job.auto_fields == ("training.lr",)
    fed = load_job_spec(examples / "federated.toml")
    assert fed.training.optimizer is Optimizer.ADAM


# --- "auto" hyperparameters (docs/tuning.md) ----------------------------------------------------

AUTO_FIELDS = ("training.lr", "training.epochs", "training.batch_size", "privacy.max_grad_norm")


def _without(*fields: str, value: object = None) -> dict:
    """GOOD's tables with ``fields`` left out (``value`` None) or set to ``value``."""
    data = tomllib.loads(GOOD)
    for f in fields:
        section, key = f.split(".")
        if value is None:
            del data[section][key]
        else:
            data[section][key] = value
    return data


@pytest.mark.parametrize("how", ["left out", "auto"])
def test_auto_or_left_out_hyperparameters_are_the_zones_to_choose(how: str) -> None:
    data = _without(*AUTO_FIELDS, value=None if how == "left out" else "auto")
    spec = parse_job_spec(data)
    assert spec.auto_fields == AUTO_FIELDS
    assert (spec.training.lr, spec.training.epochs, spec.training.batch_size) == (None,) * 3
    assert spec.privacy.max_grad_norm is None
    d = spec.to_dict()
    assert (d["training"]["lr"], d["training"]["epochs"], d["privacy"]["max_grad_norm"]) == (
        "auto",
    ) * 3
    # the wire and a stored record read "auto" back as "auto": the same spec, the same hash
    assert parse_job_spec(d) == spec == parse_stored_spec(d)
    assert parse_job_spec(d).spec_hash() == spec.spec_hash()
    # some fields written, the others left to the zone
    one = parse_job_spec(_without("training.epochs"))
    assert one.auto_fields == ("training.epochs",) and one.training.batch_size == 512


def test_a_stored_spec_without_them_keeps_the_old_defaults() -> None:
    stored = parse_stored_spec(_without("training.lr", "privacy.max_grad_norm"))
    assert stored.auto_fields == ()
    assert (stored.training.lr, stored.privacy.max_grad_norm) == (DEFAULT_LR[Optimizer.SGD], 1.0)
    with pytest.raises(SpecError) as err:
        parse_stored_spec(_without("training.epochs"))
    assert err.value.field == "training.epochs"


@pytest.mark.parametrize("field", AUTO_FIELDS)
def test_auto_is_refused_for_federated_jobs_and_other_strings_everywhere(field: str) -> None:
    fed = tomllib.loads(FEDERATED)
    section, key = field.split(".")
    fed[section] = {**fed.get(section, {}), key: "auto"}
    with pytest.raises(SpecError) as err:
        parse_job_spec(fed)
    assert err.value.field == field and "DP-SGD" in err.value.problem
    # a federated spec that leaves them out keeps its defaults (no search for federated jobs)
    assert parse_job_spec(tomllib.loads(FEDERATED)).auto_fields == ()
    with pytest.raises(SpecError) as err:
        parse_job_spec(_without(field, value="automatic"))
    assert err.value.field == field and "auto" in err.value.fix


def test_an_unresolved_spec_is_never_planned() -> None:
    """Every planner reads the hyperparameters through ``resolved``: an "auto" one is
    refused by name, never guessed."""
    from sandbox.mechanisms.dpsgd import plan_spec

    for field in ("training.epochs", "training.batch_size"):
        with pytest.raises(SpecError) as err:
            plan_spec(parse_job_spec(_without(field)), 40_000, disjoint=True)
        assert err.value.field == field and "not resolved" in err.value.problem
