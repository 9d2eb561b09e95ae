"""The release gate checks what each file holds (``sandbox.release_check``), not its name.

Each test writes a job folder as the worker and the service write it, then tampers with one
file the way a bad worker environment could smuggle rows out (an extra tensor, a reshaped or
retyped tensor, bytes after the data, metadata, header whitespace, extra JSON keys, extra
Parquet columns), and checks the gate refuses with an ``IntegrityError`` naming the file and
what is wrong, never a smuggled name or value, and copies nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from factories import job_spec
from safetensors.numpy import save_file

from connectors.cohort import cohort_contract
from connectors.preprocess import FeaturePlan
from foundation.errors import IntegrityError
from sandbox.release import RELEASED_FILES, SYNTH_FILES, release_artefacts
from sandbox.release_check import Expected, check_weights, expected_release, expected_tensors
from training.model_config import ModelConfig, ModelKind
from training.models import build_model

JOB = "job-abc"
#: what a smuggler would write: a "row" of a patient, and a name that spells one
SECRET_NAME = "patient_4711_age_67"
SECRET_ROWS = np.array([[4711.0, 67.0, 1.0, 8.25]], dtype=np.float32)


@pytest.fixture(scope="module")
def spec() -> Any:
    return job_spec(**{"model.hidden": [8, 4]})


@pytest.fixture(scope="module")
def expected(spec: Any) -> Expected:
    return expected_release(JOB, spec.to_dict(), {"kind": "dp-sgd"}, cohort_contract().to_dict())


@pytest.fixture(scope="module")
def state(spec: Any) -> dict[str, np.ndarray]:
    plan = FeaturePlan.from_contract(cohort_contract(), spec.features)
    model = build_model(spec.model, plan.n_outputs, seed=3)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _meta(spec: Any) -> dict[str, str]:
    # the worker's own expression (sandbox/worker.py), so a drift between the two shows here
    return {"model": json.dumps({"kind": str(spec.model.kind), "hidden": list(spec.model.hidden)})}


@pytest.fixture
def job_dir(tmp_path: Path, spec: Any, state: dict[str, np.ndarray]) -> Path:
    """A job folder as the DP-SGD worker and the service leave it."""
    d = tmp_path / "job"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"), metadata=_meta(spec))
    plan = FeaturePlan.from_contract(cohort_contract(), spec.features)
    (d / "preprocessing.json").write_text(json.dumps(plan.to_dict(), indent=2, sort_keys=True))
    card = {"job": JOB, "mechanism": "dp-sgd", "model": spec.to_dict()["model"]}
    (d / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    (d / "train.log").write_text("loss 0.69\n")  # stays in the zone
    return d


def _refused(job_dir: Path, out: Path, expected: Expected, match: str) -> str:
    with pytest.raises(IntegrityError, match=match) as exc:
        release_artefacts(job_dir, out, RELEASED_FILES, expected=expected)
    assert not out.exists(), "a refused release must copy nothing"
    msg = str(exc.value)
    assert SECRET_NAME not in msg and "4711" not in msg and "nothing is released" in msg
    assert exc.value.retryable is False
    return msg


def _safetensors(header: dict[str, Any], data: bytes, *, raw: bytes | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian length, JSON header, data."""
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _header_and_data(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


# -- the expectation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "hidden"), [(ModelKind.LOGISTIC, ()), (ModelKind.MLP, (16,)), (ModelKind.MLP, (8, 4))]
)
def test_expected_tensors_are_build_models_state_dict(kind: ModelKind, hidden: tuple) -> None:
    cfg = ModelConfig(kind, hidden)
    built = {
        k: ("F32" if v.dtype == torch.float32 else str(v.dtype), tuple(v.shape))
        for k, v in build_model(cfg, 11, seed=0).state_dict().items()
    }
    assert expected_tensors(cfg, 11) == built


def test_a_release_as_the_worker_writes_it_passes(job_dir: Path, tmp_path: Path, expected) -> None:
    out = tmp_path / "out"
    files = release_artefacts(job_dir, out, RELEASED_FILES, expected=expected)
    assert sorted(f.name for f in files) == sorted(RELEASED_FILES)
    for f in files:
        assert f.read_bytes() == (job_dir / f.name).read_bytes()
    assert not (out / "train.log").exists()


def test_federated_weights_as_the_server_writes_them_pass(tmp_path, spec, state, expected) -> None:
    from training.federated.weights import save_weights

    path = save_weights(tmp_path / "global.safetensors", state, spec.model)
    assert expected.tensors is not None and expected.metadata is not None
    check_weights("model.safetensors", path.read_bytes(), expected.tensors, expected.metadata)


def test_a_stored_spec_that_no_longer_parses_is_refused(spec: Any) -> None:
    broken = {**spec.to_dict(), "features": ["no_such_column"]}
    with pytest.raises(IntegrityError, match="stored spec does not fit"):
        expected_release(JOB, broken, {"kind": "dp-sgd"}, cohort_contract().to_dict())


# -- model.safetensors ---------------------------------------------------------------------------


def test_an_extra_tensor_of_rows_is_refused(job_dir, tmp_path, expected, spec, state) -> None:
    save_file(
        {**state, SECRET_NAME: SECRET_ROWS},
        str(job_dir / "model.safetensors"),
        metadata=_meta(spec),
    )
    _refused(job_dir, tmp_path / "out", expected, "model.safetensors: holds tensors the declared")


def test_a_reshaped_tensor_is_refused(job_dir, tmp_path, expected, spec, state) -> None:
    w = state["0.weight"]
    wide = np.concatenate([w, np.zeros((w.shape[0], 3), np.float32)], axis=1)
    save_file({**state, "0.weight": wide}, str(job_dir / "model.safetensors"), metadata=_meta(spec))
    msg = _refused(job_dir, tmp_path / "out", expected, "tensor 0.weight")
    assert f"expected F32 {list(w.shape)}, found another shape" in msg


def test_a_retyped_tensor_is_refused(job_dir, tmp_path, expected, spec, state) -> None:
    # float64 holds twice the bits: room for a row next to each weight
    wide = state["2.bias"].astype(np.float64)
    save_file({**state, "2.bias": wide}, str(job_dir / "model.safetensors"), metadata=_meta(spec))
    _refused(
        job_dir,
        tmp_path / "out",
        expected,
        r"tensor 2.bias: expected F32 \[4\], found another dtype",
    )


def test_a_missing_tensor_is_named(job_dir, tmp_path, expected, spec, state) -> None:
    rest = {k: v for k, v in state.items() if k != "4.bias"}
    save_file(rest, str(job_dir / "model.safetensors"), metadata=_meta(spec))
    _refused(
        job_dir, tmp_path / "out", expected, "lacks tensors of the declared architecture: 4.bias"
    )


def test_trailing_bytes_after_the_data_are_refused(job_dir, tmp_path, expected) -> None:
    with (job_dir / "model.safetensors").open("ab") as fh:
        fh.write(SECRET_ROWS.tobytes())
    _refused(job_dir, tmp_path / "out", expected, "data section is not the")


def test_a_gap_between_tensors_is_refused(job_dir, tmp_path, expected) -> None:
    header, data = _header_and_data(job_dir / "model.safetensors")
    meta = header.pop("__metadata__")
    first = min(header, key=lambda k: header[k]["data_offsets"][0])
    # the first tensor moved 16 bytes on: a hidden 16-byte slot before it
    shifted = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        shifted[k] = {**v, "data_offsets": [a + 16, b + 16]}
    blob = _safetensors({"__metadata__": meta, **shifted}, SECRET_ROWS.tobytes() + data)
    (job_dir / "model.safetensors").write_bytes(blob)
    _refused(job_dir, tmp_path / "out", expected, f"tensor {first}: its data leaves a gap")


@pytest.mark.parametrize(
    "metadata",
    [
        {"rows": SECRET_NAME},  # a key of its own
        None,  # the worker always writes the model config
        {"model": json.dumps({"kind": "mlp", "hidden": [8, 4]}, indent=1)},  # bits in spacing
    ],
)
def test_metadata_beyond_what_the_worker_writes_is_refused(
    job_dir, tmp_path, expected, spec, state, metadata
) -> None:
    full = None if metadata is None else {**_meta(spec), **metadata}
    save_file(state, str(job_dir / "model.safetensors"), metadata=full)
    msg = _refused(job_dir, tmp_path / "out", expected, "__metadata__ must be exactly the keys")
    assert "['model']" in msg


def test_whitespace_in_the_header_is_refused(job_dir, tmp_path, expected) -> None:
    header, data = _header_and_data(job_dir / "model.safetensors")
    raw = json.dumps(header, indent=1).encode()  # newlines and spaces: bits a reader ignores
    (job_dir / "model.safetensors").write_bytes(_safetensors(header, data, raw=raw))
    _refused(job_dir, tmp_path / "out", expected, "not in the compact form safetensors writes")


@pytest.mark.parametrize("blob", [b"\x01\x02", (10**9).to_bytes(8, "little") + b"{}"])
def test_a_truncated_or_overlong_header_is_refused(job_dir, tmp_path, expected, blob) -> None:
    (job_dir / "model.safetensors").write_bytes(blob)
    _refused(
        job_dir, tmp_path / "out", expected, "model.safetensors: (is shorter|declares a header)"
    )


def test_a_symlink_is_refused(job_dir, tmp_path, expected) -> None:
    target = tmp_path / "rows.bin"
    target.write_bytes((job_dir / "model.safetensors").read_bytes())
    (job_dir / "model.safetensors").unlink()
    os.symlink(target, job_dir / "model.safetensors")
    _refused(job_dir, tmp_path / "out", expected, "not a readable regular file")


# -- preprocessing.json and model_card.json ------------------------------------------------------


def _rewrite(path: Path, change: Any) -> None:
    obj = json.loads(path.read_text())
    path.write_text(change(obj))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda o: json.dumps({**o, "rows": [SECRET_NAME]}, indent=2), "top-level keys beyond"),
        (lambda o: json.dumps([o]), "is not a JSON object"),
        (lambda o: json.dumps(o, indent=2, sort_keys=True)[:-1], "not valid UTF-8 JSON"),
        (lambda o: json.dumps(o, indent=4, sort_keys=True), "not in the form the worker writes"),
        (
            lambda o: json.dumps({**o, "steps": o["steps"][::-1]}, indent=2, sort_keys=True),
            "'steps' is not what the schema contract gives",
        ),
        (lambda o: " " * (1 << 20) + json.dumps(o), "larger than the"),
    ],
)
def test_preprocessing_is_only_the_contracts_plan(job_dir, tmp_path, expected, change, match):
    _rewrite(job_dir / "preprocessing.json", change)
    _refused(job_dir, tmp_path / "out", expected, "preprocessing.json: .*" + match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda o: json.dumps({**o, "rows": [SECRET_NAME]}, indent=2),
            "top-level keys the service",
        ),
        (lambda o: json.dumps({**o, "job": "job-other"}, indent=2), "does not name job job-abc"),
        (lambda o: json.dumps(o, sort_keys=True), "not in the form the service writes"),
        (lambda o: '{"job": 1, "job": 2}', "without duplicate keys"),
        (lambda o: "[]", "is not a JSON object"),
    ],
)
def test_model_card_is_a_card_of_this_job(job_dir, tmp_path, expected, change, match):
    _rewrite(job_dir / "model_card.json", change)
    _refused(job_dir, tmp_path / "out", expected, "model_card.json: .*" + match)


def test_one_bad_file_keeps_the_good_ones_in_too(job_dir, tmp_path, expected) -> None:
    out = tmp_path / "out"
    out.mkdir()
    _rewrite(job_dir / "model_card.json", lambda o: json.dumps({**o, "x": 1}, indent=2))
    with pytest.raises(IntegrityError):
        release_artefacts(job_dir, out, RELEASED_FILES, expected=expected)
    assert list(out.iterdir()) == []


def test_a_name_without_a_check_is_refused(job_dir, tmp_path, expected) -> None:
    with pytest.raises(IntegrityError, match="train.log: has no content check"):
        release_artefacts(job_dir, tmp_path / "out", ("train.log",), expected=expected)
    assert not (tmp_path / "out").exists()


# -- synthetic.parquet and synth_card.json -------------------------------------------------------

SYNTH_COLS = ["age", "readmitted_30d", "sex", "subject_id"]


def _synth_dir(tmp_path: Path, table: pa.Table, card_rows: int) -> Path:
    d = tmp_path / "synth"
    d.mkdir(exist_ok=True)
    pq.write_table(table, d / "synthetic.parquet")
    card = {"job": JOB, "mechanism": "synthetic", "columns": SYNTH_COLS, "rows": card_rows}
    (d / "synth_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    return d


def _synth_expected(rows: int | None = 3) -> Expected:
    spec = {"columns": ["subject_id", "age", "sex", "readmitted_30d"], "rows": 3}
    return expected_release(JOB, spec, {"kind": "synthetic", "rows": rows}, {})


def _table(**extra: list[Any]) -> pa.Table:
    cols = {"age": [40.0, 50.0, 60.0], "readmitted_30d": [0, 1, 0], "sex": ["F", "M", "F"]}
    return pa.table({**cols, "subject_id": ["s1", "s2", "s3"], **extra})


def test_synthetic_release_with_its_declared_columns_passes(tmp_path: Path) -> None:
    d = _synth_dir(tmp_path, _table(), 3)
    files = release_artefacts(d, tmp_path / "out", SYNTH_FILES, expected=_synth_expected())
    assert sorted(f.name for f in files) == sorted(SYNTH_FILES)


@pytest.mark.parametrize(
    ("table", "card_rows", "match"),
    [
        (_table(**{SECRET_NAME: [1.0, 2.0, 3.0]}), 3, "holds columns the job did not declare"),
        (_table().drop_columns(["sex"]), 3, "lacks declared columns: sex"),
        (_table(), 2, "does not hold the number of rows"),
        (_table().replace_schema_metadata({"x": SECRET_NAME}), 3, "key-value metadata"),
    ],
)
def test_synthetic_rows_hold_only_the_declared_columns(tmp_path, table, card_rows, match) -> None:
    d = _synth_dir(tmp_path, table, card_rows)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=match) as exc:
        release_artefacts(d, out, SYNTH_FILES, expected=_synth_expected())
    assert SECRET_NAME not in str(exc.value) and not out.exists()


def test_a_non_dp_release_without_a_card_checks_the_results_row_count(tmp_path: Path) -> None:
    d = _synth_dir(tmp_path, _table(), 3)
    (d / "synth_card.json").unlink()  # a steward's non-DP baseline has no card
    with pytest.raises(IntegrityError, match="number of rows"):
        release_artefacts(d, tmp_path / "out", SYNTH_FILES, expected=_synth_expected(rows=5))
    files = release_artefacts(d, tmp_path / "ok", SYNTH_FILES, expected=_synth_expected())
    assert [f.name for f in files] == ["synthetic.parquet"]


def test_a_model_file_in_a_synthetic_release_is_refused(job_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="model.safetensors: has no content check"):
        release_artefacts(job_dir, tmp_path / "out", RELEASED_FILES, expected=_synth_expected())
