"""SDV's synthesizers as NON-DP baselines, behind the same interface as the DP methods.

This is the one module that imports SDV (and sdmetrics through it). SDV is BUSL-licensed and
heavy; keeping it here keeps it swappable and out of every other import path.

NOT DIFFERENTIALLY PRIVATE. GaussianCopula, CTGAN and TVAE fit their parameters (marginal
distributions, correlations, network weights) to the real rows with no noise and no bound on
what one person can change; CTGAN and TVAE can reproduce training rows. Their results carry
``epsilon = delta = None`` and no steps: the zone holds them for a steward, like any other
non-DP output, and uses them to judge what the DP methods cost in utility.

Two things are still done the zone's way, so that comparisons with the DP methods are
like-for-like and rare strings are not copied verbatim:

* SDV's metadata is built from the contract (:func:`sdv_metadata`), not detected from the
  rows: sdtypes follow the declared Arrow types and roles (the identifier is left out: output
  pseudonyms are fresh random strings, never the input's);
* values outside a declared vocabulary become "other" before SDV sees them, and the output
  is put back into the governed schema with numbers inside their declared domains.

``quality_scores`` wraps sdmetrics' quality report. It reads real rows and is not DP either:
its figures are for stewards and benchmarks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from connectors.dummy import random_pseudonyms, to_arrow_within_domain
from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import BackendError, SpecError
from privacy.synth.codec import OTHER, SynthMethod, SynthResult

#: Training epochs for CTGAN and TVAE. Few, on CPU: the baselines are reference points, and
#: on 2 shared cores 10 epochs over 50k rows already take minutes.
BASELINE_EPOCHS = 10
#: SDV's table name inside its metadata (any fixed name; it never leaves this module).
TABLE_NAME = "persons"


@dataclass(frozen=True)
class QualityScores:
    """sdmetrics' quality report, in [0, 1]: the mean of column shapes and column pair
    trends. Computed on real rows: not DP, for stewards and benchmarks only."""

    overall: float
    column_shapes: float
    column_pair_trends: float


def sdv_metadata(contract: SchemaContract) -> Any:
    """SDV ``Metadata`` for the governed table minus its identifier, from the contract alone.

    Strings (vocabulary columns, the site) and integer columns with at most two declared
    values (0/1 flags, binary labels) are categorical; bool is boolean; dates and timestamps
    are datetime; other numbers are numerical."""
    Metadata = _sdv().Metadata
    columns: dict[str, dict[str, str]] = {}
    for spec in _columns(contract):
        columns[spec.name] = {"sdtype": _sdtype(spec)}
    return Metadata.load_from_dict(
        {
            "tables": {TABLE_NAME: {"columns": columns}},
            "relationships": [],
            "METADATA_SPEC_VERSION": "V1",
        }
    )


def fit_and_sample_sdv(
    method: SynthMethod,
    table: pa.Table,
    contract: SchemaContract,
    *,
    rows: int,
    seed: int,
    epochs: int = BASELINE_EPOCHS,
) -> SynthResult:
    """Fit SDV's ``method`` on governed rows (one row per person) and sample ``rows`` rows
    in the governed schema. NOT DP: see the module docstring. The registry's engine for the
    three baselines: ``privacy.synth.base.fit_and_sample`` (which validates its arguments)
    looks it up in ``privacy.synth.registry`` and calls it."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SpecError("epochs", "must be an integer >= 1", "use e.g. 10")
    sdv = _sdv()
    metadata = sdv_metadata(contract)
    if method is SynthMethod.GAUSSIAN_COPULA:
        synthesizer = sdv.GaussianCopulaSynthesizer(metadata)
        notes: tuple[str, ...] = ("gaussian-copula: SDV GaussianCopulaSynthesizer, defaults",)
    elif method is SynthMethod.CTGAN:
        synthesizer = sdv.CTGANSynthesizer(metadata, epochs=epochs, enable_gpu=False)
        notes = (f"ctgan: SDV CTGANSynthesizer, {epochs} epochs, CPU",)
    elif method is SynthMethod.TVAE:
        synthesizer = sdv.TVAESynthesizer(metadata, epochs=epochs, enable_gpu=False)
        notes = (f"tvae: SDV TVAESynthesizer, {epochs} epochs, CPU",)
    else:
        raise SpecError("method", "is not an SDV baseline", "use gaussian-copula, ctgan or tvae")
    notes = (*notes, "NOT differentially private: hold the output for a steward")
    frame = to_frame(table, contract)
    rng = np.random.default_rng(seed)
    _seed_torch(seed)
    try:
        start = time.perf_counter()
        synthesizer.fit({TABLE_NAME: frame})
        fit_seconds = time.perf_counter() - start
        # SDV samples from a fixed seed unless told otherwise; this is its (pinned, 2.0.0)
        # way to take ours, so that ``seed`` decides the sample as for the DP methods.
        synthesizer._set_random_state(seed)
        start = time.perf_counter()
        sampled = synthesizer.sample(num_rows=rows)
        if isinstance(sampled, dict):  # SDV 2.0 returns {table name: frame}
            sampled = sampled[TABLE_NAME]
        out = from_frame(sampled, contract, rng)
        sample_seconds = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - the adapter translates every SDV failure
        # SDV's messages can quote data values: report only the engine and the error's type.
        raise BackendError(
            f"{method.value}: SDV failed ({type(exc).__name__}); rerun with the same inputs "
            "will fail the same way",
            retryable=False,
        ) from None
    return SynthResult(
        table=out,
        method=method,
        epsilon=None,
        delta=None,
        steps=(),
        fit_seconds=fit_seconds,
        sample_seconds=sample_seconds,
        notes=notes,
    )


def quality_scores(real: pa.Table, synthetic: pa.Table, contract: SchemaContract) -> QualityScores:
    """sdmetrics' quality report of ``synthetic`` against ``real`` (both governed tables;
    the identifier is left out). NOT DP: it reads real rows."""
    evaluate_quality = _sdv().evaluate_quality
    report = evaluate_quality(
        to_frame(real, contract), to_frame(synthetic, contract), sdv_metadata(contract), False
    )
    props = report.get_properties().set_index("Property")["Score"]
    return QualityScores(
        overall=float(report.get_score()),
        column_shapes=float(props["Column Shapes"]),
        column_pair_trends=float(props["Column Pair Trends"]),
    )


def to_frame(table: pa.Table, contract: SchemaContract) -> pd.DataFrame:
    """The governed columns but the identifier as a DataFrame SDV understands; strings
    outside the declared vocabulary become "other"."""
    data: dict[str, Any] = {}
    for spec in _columns(contract):
        column = table.column(spec.name)
        if spec.type == "string":
            vocab = pa.array([*(spec.categories or ()), OTHER], pa.string())
            known = pc.fill_null(pc.is_in(column, value_set=vocab), True)
            column = pc.if_else(known, column, pa.scalar(OTHER, pa.string()))
            data[spec.name] = column.to_pandas()
        elif spec.is_temporal:
            data[spec.name] = pd.to_datetime(
                pc.cast(column, pa.timestamp("s")).to_pandas(), errors="coerce"
            )
        else:
            data[spec.name] = column.to_pandas()
    return pd.DataFrame(data)


def from_frame(frame: pd.DataFrame, contract: SchemaContract, rng: np.random.Generator) -> pa.Table:
    """SDV's sample back in the governed schema, with fresh random pseudonyms."""
    schema = contract.governed_arrow_schema()
    arrays: dict[str, pa.Array] = {}
    n = len(frame)
    for spec in _columns(contract):
        series = frame[spec.name]
        if spec.type == "string":
            allowed = {*(spec.categories or ()), OTHER}
            words = [
                None if _is_null(v) else (str(v) if str(v) in allowed else OTHER) for v in series
            ]
            if not spec.is_nullable:
                words = [OTHER if v is None else v for v in words]
            arrays[spec.name] = pa.array(words, pa.string())
        elif spec.is_temporal:
            stamps = pd.to_datetime(series, errors="coerce")
            seconds = pa.array(stamps.astype("datetime64[s]"), pa.timestamp("s"))
            arrays[spec.name] = pc.cast(seconds, spec.arrow_type, safe=False)
        else:
            values = pd.to_numeric(series, errors="coerce").astype(np.float64).to_numpy()
            if not spec.is_nullable:
                values = np.where(np.isnan(values), _fallback(spec), values)
            if spec.role is Role.LABEL and spec.min is None and spec.type != "bool":
                values = np.clip(values, 0.0, 1.0)
            arrays[spec.name] = to_arrow_within_domain(values, spec)
    if contract.identifier is not None:
        arrays[contract.identifier] = random_pseudonyms(n, rng)
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


# -- helpers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SDV:
    Metadata: Any
    GaussianCopulaSynthesizer: Any
    CTGANSynthesizer: Any
    TVAESynthesizer: Any
    evaluate_quality: Any


def _sdv() -> _SDV:
    """Import SDV, refusing when its usage log would land outside the zone."""
    if not os.environ.get("XDG_DATA_HOME"):
        raise BackendError(
            "SDV would write its usage log under the home directory: call "
            "foundation.engine_env.configure_engine_env(zone_dir) (or set XDG_DATA_HOME) before "
            "running an SDV baseline",
            retryable=False,
        )
    from sdv.evaluation import evaluate_quality
    from sdv.metadata import Metadata
    from sdv.single_table import (
        CTGANSynthesizer,
        GaussianCopulaSynthesizer,
        TVAESynthesizer,
    )

    return _SDV(
        Metadata, GaussianCopulaSynthesizer, CTGANSynthesizer, TVAESynthesizer, evaluate_quality
    )


def _seed_torch(seed: int) -> None:
    # CTGAN and TVAE draw their initial weights and batches from torch's global generator.
    import torch

    torch.manual_seed(seed)


def _columns(contract: SchemaContract) -> list[ColumnSpec]:
    names = contract.governed_arrow_schema().names
    return [contract.column(n) for n in names if n != contract.identifier]


def _sdtype(spec: ColumnSpec) -> str:
    if spec.type == "string":
        return "categorical"
    if spec.type == "bool":
        return "boolean"
    if spec.is_temporal:
        return "datetime"
    if spec.is_integer:
        lo, hi = (0.0, 1.0) if spec.min is None else (spec.min, spec.max)
        if hi is not None and math.floor(hi) - math.ceil(lo) <= 1:
            return "categorical"
    return "numerical"


def _fallback(spec: ColumnSpec) -> float:
    if spec.fill is not None:
        return spec.fill
    if spec.min is not None and spec.max is not None:
        return (spec.min + spec.max) / 2.0
    return 0.0


def _is_null(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
