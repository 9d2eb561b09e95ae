"""The release gate's content check: a file leaves the zone for what it holds, not its name.

A worker environment that went bad could write raw training rows into the job folder under a
released name: as extra tensors in ``model.safetensors``, in a tensor's shape or dtype, in
bytes after the data section, in the header's metadata or whitespace, or as extra keys of a
JSON file. So before anything is copied out, every file is checked against what the job's
own spec and the dataset's schema contract say it must be:

- ``model.safetensors``: exactly the tensors of the declared architecture (names, shapes,
  dtypes computed from the model config and the contract's feature plan, without torch), the
  data section exactly as long as the header declares, tensors tiling it with no gap, the
  metadata exactly what the worker writes, the header in safetensors' own compact form;
- ``preprocessing.json``: byte for byte the plan the contract gives for the job's features;
- ``model_card.json`` / ``synth_card.json``: a JSON object of the keys the service writes,
  naming this job, in the form the service writes it;
- ``synthetic.parquet``: exactly the job's declared columns, as many rows as its card says,
  no key-value metadata of its own (read from the Parquet footer only, never a value).

Each file is read once and the bytes checked are the bytes released (no swap between check
and copy); a symlink is refused. A refusal is an ``IntegrityError`` naming the file and what
is wrong by *our* names (the expected tensor, key or column): never a name, number or value
found in the file, since the message reaches the researcher and would itself be a channel.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.preprocess import FeaturePlan
from connectors.schema import SchemaContract
from foundation.errors import IntegrityError, SchemaError, ZoneError
from training.model_config import ModelConfig, linear_shapes

#: a tensor as the safetensors header declares it: dtype name and shape
TensorSpec = tuple[str, tuple[int, ...]]

#: JSON files are small: a card or a plan of a few hundred columns is a few tens of KiB
MAX_JSON_BYTES = 1 << 20
#: the header of our models is one line per tensor; 1 MiB is hundreds of times that
MAX_HEADER_BYTES = 1 << 20
#: bytes per element of the dtypes a released model may hold (weights are float32)
DTYPE_BYTES = {"F32": 4}
#: top-level keys of a DP-SGD card (``sandbox.release.write_model_card``) and a federated one
#: (``sandbox.mechanisms.federated.write_federated_card``); a card key the service starts
#: writing must be added here, or the release is refused
# fmt: off
MODEL_CARD_KEYS = frozenset(
    {
        "job", "project", "dataset", "label", "features", "columns", "model", "mechanism",
        "privacy", "training", "evaluation", "dp_metrics", "dp_metrics_display",
        "dp_metrics_note", "spec_hash", "ledger_event", "audit_event", "compute",
        "preprocessing", "federated", "rounds_done", "per_site_dp_metrics",
        "global_dp_metrics", "global_dp_metrics_display", "per_site_dp_metrics_display",
        "excluded_sites", "dropped_sites", "learned", "tuning",
    }
)
#: top-level keys of ``sandbox.release.write_synth_card``
SYNTH_CARD_KEYS = frozenset(
    {
        "job", "project", "dataset", "mechanism", "method", "differentially_private",
        "columns", "rows", "privacy", "fitted_on", "spec_hash", "ledger_event", "audit_event",
    }
)
# fmt: on
#: the only key-value entry pyarrow's writer puts in a Parquet footer (the Arrow schema)
PARQUET_KEYS = frozenset({b"ARROW:schema"})


@dataclass(frozen=True)
class Expected:
    """What the releasable files of one job must hold (``expected_release`` builds it)."""

    job: str
    #: a model job: the tensors, the weights' metadata and the preprocessing plan
    tensors: Mapping[str, TensorSpec] | None = None
    metadata: Mapping[str, str] | None = None
    preprocessing: Mapping[str, Any] | None = None
    #: a synthetic-data job: its declared columns and the rows its result recorded
    columns: frozenset[str] = field(default_factory=frozenset)
    rows: int | None = None


def _refuse(name: str, problem: str) -> IntegrityError:
    return IntegrityError(
        f"{name}: {problem}; nothing is released (the job's files stay in the zone for a steward to inspect)"
    )


# -- what a job must release -------------------------------------------------------------------


def expected_tensors(
    model: ModelConfig, n_inputs: int, n_outputs: int = 1
) -> dict[str, TensorSpec]:
    """The state dict ``training.models.build_model`` gives, as safetensors declares it
    (``training.model_config.linear_shapes``, all float32): torch-free, so the CLI and the
    service need not import torch to check a release."""
    return {k: ("F32", shape) for k, shape in linear_shapes(model, n_inputs, n_outputs).items()}


def weights_metadata(model: ModelConfig) -> dict[str, str]:
    """The metadata the DP-SGD worker and the federated server write into the weights (and
    ``training.predict.ReleasedModel`` reads), string for string."""
    return {"model": json.dumps({"kind": model.kind.value, "hidden": list(model.hidden)})}


def expected_release(
    job_id: str, spec: Mapping[str, Any], result: Mapping[str, Any], contract: Mapping[str, Any]
) -> Expected:
    """What job ``job_id`` may release, from its stored spec and result and the dataset's
    contract (the same inputs the worker built its model and plan from). Only the spec's
    ``model`` and ``features`` (or a synthetic job's ``columns``) are read: they fix the files."""
    try:
        if result.get("kind") == "synthetic":
            rows = result.get("rows")
            return Expected(
                job=job_id,
                columns=frozenset(str(c) for c in spec["columns"]),
                rows=rows if isinstance(rows, int) and not isinstance(rows, bool) else None,
            )
        model = ModelConfig(kind=spec["model"]["kind"], hidden=tuple(spec["model"]["hidden"]))
        plan = FeaturePlan.from_contract(SchemaContract.from_dict(contract), spec["features"])
    except (ZoneError, KeyError, TypeError) as exc:
        # a SpecError names fields and contract columns only, never a row value
        raise IntegrityError(
            f"job {job_id}: its stored spec does not fit its dataset's contract "
            f"({type(exc).__name__}: {exc}); nothing is released, ask the zone operator"
        ) from None
    return Expected(
        job=job_id,
        tensors=expected_tensors(model, plan.n_outputs),
        metadata=weights_metadata(model),
        preprocessing=plan.to_dict(),
    )


# -- reading -------------------------------------------------------------------------------------


def _read(path: Path, limit: int | None) -> bytes:
    """The file's bytes, read once; a symlink or anything not a regular file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise _refuse(path.name, "is not a readable regular file (a symlink?)") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path.name, "is not a regular file")
        if limit is not None and info.st_size > limit:
            raise _refuse(path.name, f"is larger than the {limit} bytes it may hold")
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:  # it grew while we read it
        raise _refuse(path.name, f"is larger than the {limit} bytes it may hold")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _json(name: str, raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _refuse(name, "is not valid UTF-8 JSON without duplicate keys") from None


def _json_object(name: str, raw: bytes, keys: frozenset[str], job: str) -> dict[str, Any]:
    """A card: a JSON object of known keys naming ``job``, written as ``json.dumps(indent=2)``
    writes it (whitespace of any other shape could carry bits)."""
    obj = _json(name, raw)
    if not isinstance(obj, dict):
        raise _refuse(name, "is not a JSON object")
    if not set(obj) <= keys:
        raise _refuse(name, "holds top-level keys the service does not write")
    if obj.get("job") != job:
        raise _refuse(name, f"does not name job {job} in its 'job' key")
    if raw != json.dumps(obj, indent=2).encode("utf-8"):
        raise _refuse(name, "is not in the form the service writes (json.dumps, indent 2)")
    return obj


# -- the checks ----------------------------------------------------------------------------------


def check_weights(
    name: str, data: bytes, tensors: Mapping[str, TensorSpec], metadata: Mapping[str, str]
) -> None:
    """Refuse a safetensors file that is not exactly ``tensors`` with ``metadata``."""
    if len(data) < 8:
        raise _refuse(name, "is shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _refuse(name, "declares a header longer than the file or the limit")
    raw = data[8 : 8 + n]
    header = _json(name, raw)
    if not isinstance(header, dict):
        raise _refuse(name, "has a header that is not a JSON object")
    # safetensors writes compact JSON padded with < 8 spaces: other whitespace carries bits
    body = raw.rstrip(b" ")
    compact = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if body != compact or n - len(body) >= 8:
        raise _refuse(name, "has a header not in the compact form safetensors writes")
    found_meta = header.pop("__metadata__", None)
    if found_meta != dict(metadata):
        raise _refuse(
            name,
            f"__metadata__ must be exactly the keys {sorted(metadata)} as the worker writes them",
        )
    missing = [t for t in tensors if t not in header]
    if missing:
        raise _refuse(name, f"lacks tensors of the declared architecture: {', '.join(missing)}")
    if len(header) != len(tensors):
        raise _refuse(name, "holds tensors the declared architecture does not have")
    spans = []
    for tname, (dtype, shape) in tensors.items():
        info = header[tname]
        want = f"expected {dtype} {list(shape)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _refuse(name, f"tensor {tname}: is not a {{dtype, shape, data_offsets}} entry")
        if info["dtype"] != dtype:
            raise _refuse(name, f"tensor {tname}: {want}, found another dtype")
        if info["shape"] != list(shape):
            raise _refuse(name, f"tensor {tname}: {want}, found another shape")
        offsets = info["data_offsets"]
        size = DTYPE_BYTES[dtype] * math.prod(shape)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or offsets[1] - offsets[0] != size
        ):
            raise _refuse(name, f"tensor {tname}: data_offsets do not span its {size} bytes")
        spans.append((offsets[0], offsets[1], tname))
    # the tensors tile the data section in order: no gap, no overlap, nothing after the last
    end = 0
    for begin, stop, tname in sorted(spans):
        if begin != end:
            raise _refuse(name, f"tensor {tname}: its data leaves a gap or overlaps another")
        end = stop
    if len(data) - 8 - n != end:
        raise _refuse(name, f"the data section is not the {end} bytes the header declares")


def check_preprocessing(name: str, raw: bytes, plan: Mapping[str, Any]) -> None:
    """Refuse anything but the contract's plan, as the worker writes it."""
    obj = _json(name, raw)
    if not isinstance(obj, dict):
        raise _refuse(name, "is not a JSON object")
    if not set(obj) <= set(plan):
        raise _refuse(name, f"holds top-level keys beyond {sorted(plan)}")
    for key in plan:
        if obj.get(key) != json.loads(json.dumps(plan[key])):
            raise _refuse(name, f"'{key}' is not what the schema contract gives for the job")
    if raw != json.dumps(dict(plan), indent=2, sort_keys=True).encode("utf-8"):
        raise _refuse(name, "is not in the form the worker writes (json.dumps, indent 2, sorted)")


def check_synthetic(name: str, data: bytes, columns: frozenset[str], rows: list[int]) -> None:
    """Refuse a Parquet file whose columns are not the job's or whose row count is off; read
    from the footer only (``connectors.parquet_footer``: only connectors opens Parquet)."""
    from connectors.parquet_footer import read_footer

    try:
        footer = read_footer(data)
    except SchemaError:
        raise _refuse(name, "is not a readable Parquet file") from None
    names = footer.names
    if len(set(names)) != len(names):
        raise _refuse(name, "lists a column twice")
    missing = sorted(columns - set(names))
    if missing:
        raise _refuse(name, f"lacks declared columns: {', '.join(missing)}")
    if set(names) != columns:
        raise _refuse(name, "holds columns the job did not declare")
    if any(r != footer.num_rows for r in rows):
        raise _refuse(name, "does not hold the number of rows its card and result record")
    if not footer.kv_keys <= PARQUET_KEYS or footer.schema_metadata:
        raise _refuse(name, "carries key-value metadata the synthesizer does not write")


def _limit(name: str, expected: Expected) -> int | None:
    """How many bytes ``name`` may hold for this job; refuse a file it has no check for."""
    if name == "model.safetensors" and expected.tensors is not None:
        total = sum(DTYPE_BYTES[d] * math.prod(s) for d, s in expected.tensors.values())
        return 8 + MAX_HEADER_BYTES + total
    if name in ("model_card.json", "preprocessing.json") and expected.tensors is not None:
        return MAX_JSON_BYTES
    if name == "synth_card.json" and expected.columns:
        return MAX_JSON_BYTES
    if name == "synthetic.parquet" and expected.columns:
        # synthetic rows are bounded by the job's row cap (synthetic.MAX_ROWS), not here
        return None
    raise _refuse(name, "has no content check for this job's kind")


def check_release(job_dir: Path, names: tuple[str, ...], expected: Expected) -> dict[str, bytes]:
    """Check every file of ``names`` present in ``job_dir``; return their bytes to release.

    All files are checked before the caller writes any: one refusal releases nothing. A name
    absent from the folder is skipped (a dry run has no card), but a dangling symlink is not.
    """
    out = {
        name: _read(job_dir / name, _limit(name, expected))
        for name in names
        if os.path.lexists(job_dir / name)
    }
    if "model.safetensors" in out:
        assert expected.tensors is not None and expected.metadata is not None
        check_weights(
            "model.safetensors", out["model.safetensors"], expected.tensors, expected.metadata
        )
    if "preprocessing.json" in out:
        assert expected.preprocessing is not None
        check_preprocessing("preprocessing.json", out["preprocessing.json"], expected.preprocessing)
    if "model_card.json" in out:
        _json_object("model_card.json", out["model_card.json"], MODEL_CARD_KEYS, expected.job)
    rows = [] if expected.rows is None else [expected.rows]
    if "synth_card.json" in out:
        card = _json_object(
            "synth_card.json", out["synth_card.json"], SYNTH_CARD_KEYS, expected.job
        )
        if set(card.get("columns") or ()) != expected.columns:
            raise _refuse("synth_card.json", "does not list the job's declared columns")
        if not isinstance(card.get("rows"), int) or isinstance(card.get("rows"), bool):
            raise _refuse("synth_card.json", "has no whole-number 'rows'")
        rows.append(card["rows"])
    if "synthetic.parquet" in out:
        check_synthetic("synthetic.parquet", out["synthetic.parquet"], expected.columns, rows)
    return out
