"""The contract every synthesizer meets, and its one entry point.

``fit_and_sample(method, table, contract, ...)`` is the one entry point. It takes a governed
table with **one row per person** (the reader guarantees it: the privacy unit is the person,
so each person contributes exactly one row to every count below) and returns a
:class:`~privacy.synth.codec.SynthResult` whose table has exactly ``contract.governed_arrow_schema()``.

Methods (:class:`~privacy.synth.codec.SynthMethod`):

* ``mst`` (:mod:`privacy.synth.marginals`) and ``dp-copula`` (:mod:`privacy.synth.copula`) are
  differentially private for the add/remove-one-person relation. Every noisy release they make
  is recorded in ``SynthResult.steps`` as a :class:`~privacy.accountant.GaussianStep`, and
  ``SynthResult.epsilon`` is ``privacy.accountant.epsilon_for(steps, delta)``: anyone can
  recompute it from the steps, and it never exceeds the requested epsilon.
* ``gaussian-copula``, ``ctgan`` and ``tvae`` (:mod:`privacy.synth.baselines`) are SDV's
  synthesizers and are NOT differentially private: ``epsilon`` and ``delta`` are ``None`` and
  their output must be held for a steward, like any other non-DP release.

The encoding every DP method shares (bins, vocabularies, "other", "missing", all fixed by the
contract before any row is read) is :class:`privacy.synth.codec.Codec`, described in
:mod:`privacy.synth.codec`. Which engine runs a method, and whether it is DP, is
:data:`privacy.synth.registry.REGISTRY`; this module looks the method up there and never
imports an engine itself (see :mod:`privacy.synth.registry` for the import graph).

Randomness: ``noise_seed`` drives the DP noise and ``seed`` the sampling, so a fixed pair gives
the same output. Whoever knows a fixed ``noise_seed`` can regenerate the noise and subtract it:
in the zone, pass ``noise_seed=None`` (fresh OS entropy); fixed seeds are for tests.

``fit_seconds`` and ``sample_seconds`` depend on the data (its size): they are for operators'
benchmarks and, like any data-dependent timing, are not released without a steward.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.schema import SchemaContract
from foundation.errors import IntegrityError, SchemaError, SpecError
from privacy.accountant import epsilon_for
from privacy.synth.codec import (
    MAX_ROWS,
    Codec,
    DPFit,
    SynthMethod,
    SynthResult,
    check_epsilon,
    parse_method,
)
from privacy.synth.registry import engine, is_dp

# fit_and_sample is this module's own; the others are re-exported for callers that import them
# from here (their homes: codec for Codec/SynthMethod/SynthResult, registry for is_dp).
__all__ = ["Codec", "SynthMethod", "SynthResult", "fit_and_sample", "is_dp"]


def fit_and_sample(
    method: SynthMethod | str,
    table: pa.Table,
    contract: SchemaContract,
    *,
    epsilon: float | None,
    delta: float | None,
    rows: int,
    seed: int,
    noise_seed: int | None,
) -> SynthResult:
    """Fit ``method`` on ``table`` (governed rows, ONE ROW PER PERSON: the reader guarantees
    it, and every sensitivity bound below counts one row as one person) and sample ``rows``
    synthetic rows with ``contract.governed_arrow_schema()``.

    DP methods need a finite ``epsilon > 0`` and ``0 < delta < 1/persons``; the result's
    epsilon (from the accountant, add/remove one person) never exceeds ``epsilon``. The
    baselines are NOT DP: pass ``epsilon=None`` (or ``math.inf``) to say you know it.
    ``seed`` drives sampling, ``noise_seed`` the DP noise (``None``: fresh OS entropy)."""
    kind = parse_method(method)
    entry = engine(kind)
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    if not isinstance(table, pa.Table):
        raise SpecError("table", "must be a pyarrow Table", "read the governed dataset first")
    check_int("rows", rows, 1, MAX_ROWS)
    check_int("seed", seed, 0, None)
    if noise_seed is not None:
        check_int("noise_seed", noise_seed, 0, None)
    table = _conform(table, contract)
    if not entry.is_dp:
        if epsilon is not None and not (isinstance(epsilon, float) and math.isinf(epsilon)):
            raise SpecError(
                "epsilon",
                f"method {kind.value} is not differentially private, so it has no epsilon",
                "pass epsilon=None, or choose mst or dp-copula for a DP release",
            )
        # the engine's module (SDV behind it) is imported only now, when a baseline runs
        result = entry.load()(kind, table, contract, rows=rows, seed=seed)
        if not isinstance(result, SynthResult) or result.method is not kind or result.is_dp:
            raise IntegrityError(
                f"{kind.value}: the engine did not return a non-DP result for this method; "
                "nothing was released"
            )
        return result

    target = check_epsilon(epsilon)
    n = table.num_rows
    if (
        isinstance(delta, bool)
        or not isinstance(delta, int | float)
        or not (0.0 < delta < 1.0)
        or delta * n >= 1.0
    ):
        raise SpecError(
            "delta",
            "must be a number in (0, 1) and below 1 / (number of persons)",
            "use e.g. 1e-6",
        )
    codec = Codec.from_contract(contract)
    noise_rng = np.random.default_rng(noise_seed)
    sample_rng = np.random.default_rng(seed)

    start = time.perf_counter()
    codes = codec.encode(table)
    fit = entry.load()(codes, codec, epsilon=target, delta=float(delta), rng=noise_rng)
    fit_seconds = time.perf_counter() - start
    if not isinstance(fit, DPFit) or not fit.steps:
        raise IntegrityError(
            f"{kind.value}: the engine charged no steps for a DP method; nothing was released"
        )

    spent = epsilon_for(fit.steps, float(delta))
    if spent > target:
        # Calibration makes this impossible; checked anyway because the guarantee rests on it.
        raise IntegrityError(
            f"{kind.value}: the charged steps spend epsilon {spent:.6g}, above the "
            f"requested {target:.6g}; nothing was released"
        )
    start = time.perf_counter()
    synthetic = codec.decode(fit.sampler(rows, sample_rng), sample_rng)
    sample_seconds = time.perf_counter() - start
    return SynthResult(
        table=synthetic,
        method=kind,
        epsilon=spent,
        delta=float(delta),
        steps=fit.steps,
        fit_seconds=fit_seconds,
        sample_seconds=sample_seconds,
        notes=fit.notes,
    )


def _conform(table: pa.Table, contract: SchemaContract) -> pa.Table:
    """The governed columns of ``table`` with their governed types (extra columns, e.g. direct
    identifiers of a source table, are dropped unread). Errors name the column only."""
    schema = contract.governed_arrow_schema()
    arrays = []
    for f in schema:
        if f.name not in table.column_names:
            raise SchemaError(
                f"column {f.name!r} is missing from the table (pass the governed dataset)",
                column=f.name,
            )
        column = table.column(f.name)
        if column.type != f.type:
            try:
                column = pc.cast(column, f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise SchemaError(
                    f"column {f.name!r} does not convert to its declared type {f.type}",
                    column=f.name,
                ) from None
        arrays.append(column)
    return pa.Table.from_arrays(arrays, schema=schema)


def check_int(name: str, value: object, low: int, high: int | None) -> None:
    """``SpecError`` naming ``name`` unless ``value`` is an integer in ``[low, high]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        limit = f"between {low} and {high}" if high is not None else f">= {low}"
        raise SpecError(name, f"must be an integer {limit}")
