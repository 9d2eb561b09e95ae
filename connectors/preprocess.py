"""Feature preprocessing whose every parameter comes from the schema contract.

A mean, a range or a vocabulary computed on real rows would be an uncharged release (see
``docs/privacy-model.md``), so ``FeaturePlan.from_contract`` reads nothing but the contract:
each feature column becomes one ``FeatureStep`` (``connectors.preprocess_steps``: a numeric
column scaled by its declared domain, linearly or, where the contract declares
``scale = "log"``, by ``log(1 + x)``; a bool flag as 0/1; or a string one-hot over its declared
vocabulary; each with a missing indicator), and the plan is those steps in order.

The plan is JSON-safe (``to_dict``/``from_dict``) and travels with a released model, so that
``predict`` outside the zone applies exactly the same transformation to new rows.

``transform`` is vectorised per Arrow chunk: it reads Arrow buffers directly (no pandas, no
per-row Python) into a feature-major scratch block that stays in cache, then transposes the
block into the row-major output. ``transform_into`` writes into a caller's array, which is
how the reader fills one preallocated tensor from several row groups at once. The per-column
kernels it runs on each block are in ``connectors.preprocess_kernels``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from connectors.preprocess_kernels import _apply, _column, _Input, _normalise
from connectors.preprocess_steps import UNIT_SPAN, FeatureStep, _step_for
from connectors.schema import SchemaContract
from foundation.errors import NotFoundError, SpecError

PLAN_VERSION = 1
# The scratch block (outputs x rows, float32) is sized to ~6 MiB: it stays in the last-level
# cache between the per-feature writes and the transpose into the output, and it is large
# enough that numpy's per-call cost (~1-3 us) is small beside the work (measured on 1M rows
# x 25 outputs: 16 Ki-row blocks 43 ms, 64 Ki-row blocks 33 ms, 128 Ki-row blocks 37 ms).
_SCRATCH_BYTES = 6 * 2**20
_MIN_BLOCK_ROWS = 4_096
_MAX_BLOCK_ROWS = 65_536
# Scratch rows are padded so their stride is not a power of two: with a 64 KiB stride every
# output's row maps to the same cache sets and the transpose ran 4-7x slower (measured).
_SCRATCH_PAD = 40


@dataclass(frozen=True)
class FeaturePlan:
    """An ordered list of steps; outputs are the steps' outputs concatenated in order."""

    steps: tuple[FeatureStep, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple) or not self.steps:
            raise SpecError("features", "the plan has no features", "name at least one feature")
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise SpecError("features", "a feature is listed twice", "list each feature once")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_contract(cls, contract: SchemaContract, features: Sequence[str]) -> FeaturePlan:
        """Build the plan for ``features`` (in that order) from the contract alone."""
        if not isinstance(contract, SchemaContract):
            raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
        if isinstance(features, str) or not isinstance(features, Sequence):
            raise SpecError("features", "must be a list of column names", 'write ["age", "sex"]')
        if not features:
            raise SpecError("features", "is empty", "name at least one feature column")
        usable = ", ".join(contract.feature_names())
        seen: set[str] = set()
        steps = []
        for name in features:
            if not isinstance(name, str):
                raise SpecError("features", "must hold column names (strings)", f"use: {usable}")
            if name in seen:
                raise SpecError("features", f"{name!r} is listed twice", "list each feature once")
            seen.add(name)
            try:
                spec = contract.column(name)
            except NotFoundError:
                raise SpecError(
                    "features", f"{name!r} is not a column of the dataset", f"use: {usable}"
                ) from None
            steps.append(_step_for(spec, contract.na_values))
        return cls(steps=tuple(steps))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeaturePlan:
        if not isinstance(data, Mapping) or data.get("version") != PLAN_VERSION:
            raise SpecError(
                "preprocessing", f"is not a version-{PLAN_VERSION} feature plan", "re-export it"
            )
        raw = data.get("steps")
        if not isinstance(raw, list):
            raise SpecError("preprocessing.steps", "is missing", "re-export the plan")
        steps = []
        for item in raw:
            if not isinstance(item, Mapping):
                raise SpecError("preprocessing.steps", "holds a non-table", "re-export the plan")
            unknown = set(item) - {
                "name",
                "kind",
                "type",
                "min",
                "max",
                "fill",
                "categories",
                "cleaning",
                "typical",
                "span",
            }
            if unknown:
                raise SpecError("preprocessing.steps", "has unknown keys", "re-export the plan")
            cats = item.get("categories", ())
            if not isinstance(cats, list | tuple):
                raise SpecError("preprocessing.steps", "categories must be a list", "re-export")
            steps.append(
                FeatureStep(
                    name=item.get("name"),  # type: ignore[arg-type]
                    kind=item.get("kind"),  # type: ignore[arg-type]
                    type=str(item.get("type", "")),
                    min=item.get("min"),
                    max=item.get("max"),
                    fill=item.get("fill"),
                    categories=tuple(cats),
                    cleaning=item.get("cleaning"),
                    typical=item.get("typical"),
                    # a plan released before spans: its typical range went to [0, 1]
                    span=item.get("span", UNIT_SPAN),
                )
            )
        plan = cls(steps=tuple(steps))
        if "output_names" in data and list(data["output_names"]) != list(plan.output_names):
            raise SpecError("preprocessing.output_names", "do not match the steps", "re-export")
        return plan

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe; ``features`` lists the input columns ``transform`` needs."""
        return {
            "version": PLAN_VERSION,
            "features": list(self.features),
            "steps": [s.to_dict() for s in self.steps],
            "output_names": list(self.output_names),
        }

    # -- shape -------------------------------------------------------------------------------
    @property
    def features(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(name for s in self.steps for name in s.output_names)

    @property
    def n_outputs(self) -> int:
        return sum(s.width for s in self.steps)

    # -- transformation ----------------------------------------------------------------------
    def transform(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """Rows of ``table`` -> float32 array [rows, n_outputs] (C order)."""
        out = np.empty((table.num_rows, self.n_outputs), dtype=np.float32)
        self.transform_into(table, out)
        return out

    def transform_into(self, table: pa.Table | pa.RecordBatch, out: np.ndarray) -> None:
        """Write the transformation of ``table`` into ``out`` (float32 [rows, n_outputs])."""
        n = table.num_rows
        if out.dtype != np.float32 or out.shape != (n, self.n_outputs):
            raise SpecError("out", "must be float32 [rows, n_outputs]", "allocate it so")
        if not out.flags.c_contiguous:
            raise SpecError("out", "must be C-contiguous", "use np.empty((rows, n_outputs))")
        inputs = [
            _Input.of(step, _normalise(step, _column(table, step.name))) for step in self.steps
        ]
        rows = _block_rows(self.n_outputs)
        scratch = np.empty((self.n_outputs, min(n, rows) + _SCRATCH_PAD), dtype=np.float32)
        with np.errstate(all="ignore"):  # buffer slots under nulls hold arbitrary numbers
            for start in range(0, n, rows):
                m = min(rows, n - start)
                block = scratch[:, :m]
                row = 0
                for step, source in zip(self.steps, inputs, strict=True):
                    part = block[row : row + step.width]
                    for piece, lookup, at in source.pieces(start, m):
                        _apply(step, piece, lookup, part[:, at : at + len(piece)])
                    row += step.width
                out[start : start + m] = block.T


def _block_rows(n_outputs: int) -> int:
    rows = _SCRATCH_BYTES // (4 * max(n_outputs, 1))
    return max(_MIN_BLOCK_ROWS, min(_MAX_BLOCK_ROWS, rows - rows % 1024))
