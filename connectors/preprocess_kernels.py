"""The transformation kernels of a feature plan: Arrow columns -> float32 rows.

Two stages, per input column:

* **preparation** (``_column``, ``_normalise``): any reasonable input type is brought to the
  type its step's kernel reads (numbers, bool, strings or a dictionary of strings); a value
  that does not convert is reported by column and row, never quoted.
* **kernels** (``_apply``): one Arrow slice -> the step's rows of a feature-major block.
  They read Arrow buffers directly (no pandas, no per-row Python): validity bitmaps are
  unpacked only over the slice, missing values are blended in on float32 bit patterns, and
  a dictionary-encoded category column is looked up in the vocabulary once per chunk
  (``_Input``).

``FeaturePlan.transform_into`` (``connectors.preprocess``) drives them block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectors.preprocess_steps import UNIT_SPAN, FeatureStep, StepKind
from foundation.errors import SchemaError

# Up to this many one-hot outputs, one broadcast "codes == j" comparison (contiguous writes)
# beats a scattered write; above it a scatter into a zeroed block is cheaper.
_ONE_HOT_COMPARE_MAX = 24
_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


# --- column preparation: any reasonable input type -> the type the kernel reads ---------------


def _column(table: pa.Table | pa.RecordBatch, name: str) -> pa.ChunkedArray:
    if name not in table.schema.names:
        raise SchemaError(f"column {name!r} is missing from the table", column=name)
    column = table.column(name)
    return column if isinstance(column, pa.ChunkedArray) else pa.chunked_array([column])


def _first_failing(array: pa.Array, target: pa.DataType) -> int:
    """First element that does not convert (halving search; about two passes in all)."""
    lo, hi = 0, len(array)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(array.slice(lo, mid - lo), target, safe=True)
        except _CAST_ERRORS:
            hi = mid
        else:
            lo = mid
    return lo


def _convert(column: pa.ChunkedArray, target: pa.DataType, name: str) -> pa.ChunkedArray:
    problem = False
    try:
        return pc.cast(column, target, safe=True)
    except _CAST_ERRORS:
        problem = True
    # raised outside the except block: pyarrow's message quotes the value
    if problem and pa.types.is_string(column.type):
        row = _first_failing(column.combine_chunks(), target) + 1
        raise SchemaError(
            f"column {name!r}: row {row} does not parse as {target}", column=name, row=row
        )
    raise SchemaError(f"column {name!r}: its type cannot be read as {target}", column=name)


def _normalise(step: FeatureStep, column: pa.ChunkedArray) -> pa.ChunkedArray:
    t = column.type
    if pa.types.is_dictionary(t) and step.kind is not StepKind.CATEGORY:
        column, t = pc.cast(column, t.value_type), t.value_type
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        column, t = pc.cast(column, pa.string()), pa.string()
    if step.scaled:
        if pa.types.is_integer(t) or t in (pa.float32(), pa.float64()):
            return column
        if pa.types.is_boolean(t):
            return pc.cast(column, pa.int8())
        if pa.types.is_null(t):
            return pa.chunked_array([pa.nulls(len(column), pa.float32())])
        if pa.types.is_string(t):
            return _convert(column, pa.float64(), step.name)
        if pa.types.is_floating(t) or pa.types.is_decimal(t):
            return _convert(column, pa.float64(), step.name)
        raise SchemaError(f"column {step.name!r}: its type is not numeric", column=step.name)
    if step.kind is StepKind.FLAG:
        if pa.types.is_boolean(t):
            return column
        if pa.types.is_null(t):
            return pa.chunked_array([pa.nulls(len(column), pa.bool_())])
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return pc.not_equal(column, 0)
        if pa.types.is_string(t):
            return _convert(column, pa.bool_(), step.name)
        raise SchemaError(f"column {step.name!r}: its type is not bool", column=step.name)
    # CATEGORY: strings, or a dictionary of strings (what the reader asks Parquet for)
    if pa.types.is_dictionary(t):
        if not pa.types.is_string(t.value_type):
            column = pc.cast(column, pa.string())
        return column
    if pa.types.is_string(t):
        return column
    return pc.cast(column, pa.string())


# --- kernels: one Arrow slice -> rows of a feature-major block --------------------------------


@dataclass(frozen=True)
class _Input:
    """One normalised input column: its chunks, where each starts, and per-chunk lookups.

    A categorical chunk read from Parquet is a dictionary array; its dictionary is looked up
    in the vocabulary once per chunk here, not once per block.
    """

    chunks: tuple[pa.Array, ...]
    starts: tuple[int, ...]
    lookups: tuple[np.ndarray | None, ...]

    @classmethod
    def of(cls, step: FeatureStep, column: pa.ChunkedArray) -> _Input:
        chunks = tuple(c for c in column.chunks if len(c))
        starts, at = [], 0
        for chunk in chunks:
            starts.append(at)
            at += len(chunk)
        lookups = tuple(
            _dictionary_lookup(step, c) if isinstance(c, pa.DictionaryArray) else None
            for c in chunks
        )
        return cls(chunks, tuple(starts), lookups)

    def pieces(self, start: int, m: int) -> list[tuple[pa.Array, np.ndarray | None, int]]:
        """The chunk slices covering rows [start, start + m), each with its block offset."""
        out = []
        end = start + m
        for chunk, first, lookup in zip(self.chunks, self.starts, self.lookups, strict=True):
            last = first + len(chunk)
            if last <= start or first >= end:
                continue
            lo, hi = max(start, first), min(end, last)
            out.append((chunk.slice(lo - first, hi - lo), lookup, lo - start))
        return out


def _bitmap(buffer: pa.Buffer, offset: int, m: int, invert: bool) -> np.ndarray:
    """Bits [offset, offset + m) of an Arrow bitmap as a uint8 0/1 array.

    Only the bytes that hold those bits are unpacked, so slicing a long array into blocks
    stays linear.
    """
    first, shift = divmod(offset, 8)
    packed = np.frombuffer(buffer, dtype=np.uint8)[first : first + (shift + m + 7) // 8]
    if invert:
        packed = np.invert(packed)
    return np.unpackbits(packed, count=shift + m, bitorder="little")[shift:]


def _missing(array: pa.Array) -> np.ndarray | None:
    """Boolean "is null" per element, or None when there are no nulls."""
    if array.null_count == 0:
        return None
    return _bitmap(array.buffers()[0], array.offset, len(array), invert=True).view(bool)


def _values(array: pa.Array) -> np.ndarray:
    """Zero-copy view of a primitive array's values (slots under nulls are arbitrary)."""
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


def _finish(
    values: np.ndarray, indicator: np.ndarray, missing: np.ndarray | None, fill: float
) -> None:
    if missing is None:
        indicator.fill(0.0)
        return
    np.copyto(indicator, missing, casting="unsafe")
    # Blend the fill in on the float32 bit patterns, without a branch per element:
    # values ^= (values ^ fill) & mask, with mask all ones on missing rows. Exact, immune to
    # whatever (even NaN) sits under a null, and 3-5x faster here than putmask or
    # copyto(where=) on scattered masks (measured, 64 Ki rows, 6-70% missing).
    bits = values.view(np.int32)
    mask = np.negative(missing.view(np.uint8), dtype=np.int32)
    np.bitwise_and(mask, np.bitwise_xor(bits, np.float32(fill).view(np.int32)), out=mask)
    np.bitwise_xor(bits, mask, out=bits)


def _all_missing(step: FeatureStep, rows: np.ndarray) -> None:
    if step.kind is StepKind.CATEGORY:
        rows.fill(0.0)
        rows[-1].fill(1.0)
    else:
        rows[0].fill(np.float32(step.scaled_fill))
        rows[1].fill(1.0)


def _numeric_kernel(step: FeatureStep, chunk: pa.Array, rows: np.ndarray) -> None:
    values, indicator = rows[0], rows[1]
    if step.typical is None:
        lo, hi = step.min, step.max
        # (x - min) * (1 / (max - min)) in float32, then clip to [0, 1]; subtracting first
        # keeps the domain's ends exact (x = min gives 0, not a rounding residue)
        np.subtract(_values(chunk), np.float32(lo), out=values, dtype=np.float32, casting="unsafe")
        np.multiply(values, np.float32(1.0 / (hi - lo)), out=values)  # type: ignore[operator]
        np.clip(values, 0.0, 1.0, out=values)
    else:
        # clamp into the domain, then (x - low) / (high - low): the typical range spans
        # [0, 1] and the rest of the domain keeps its distance beyond it
        a, b = step.typical
        np.copyto(values, _values(chunk), casting="unsafe")
        np.clip(values, np.float32(step.min), np.float32(step.max), out=values)
        np.subtract(values, np.float32(a), out=values)
        np.divide(values, np.float32(b - a), out=values)
        _to_span(step, values)
    missing = _missing(chunk)
    if pa.types.is_floating(chunk.type) and np.isnan(values).any():
        nan = np.isnan(values)  # NaN is missing too (it arrives from files outside the zone)
        missing = nan if missing is None else np.logical_or(missing, nan)
    _finish(values, indicator, missing, step.scaled_fill)


def _to_span(step: FeatureStep, values: np.ndarray) -> None:
    """Unit scale (the low anchor 0, the high 1) -> the step's span, in place; the unit
    span is left alone, so a plan from before spans gives the same bits."""
    if step.span != UNIT_SPAN:
        lo, hi = step.span
        np.multiply(values, np.float32(hi - lo), out=values)
        np.add(values, np.float32(lo), out=values)


def _log_kernel(step: FeatureStep, chunk: pa.Array, rows: np.ndarray) -> None:
    values, indicator = rows[0], rows[1]
    lo, width = step.log_bounds
    # clamp into [min, max] first (log1p of a value below -1 would be NaN, read as missing),
    # then (log1p(x) - log1p(min)) / (log1p(max) - log1p(min)) in float32; a division, not a
    # multiplication by the reciprocal, so x = max gives exactly 1 (x = min gives exactly 0)
    np.copyto(values, _values(chunk), casting="unsafe")
    np.clip(values, np.float32(step.min), np.float32(step.max), out=values)
    np.log1p(values, out=values)
    np.subtract(values, lo, out=values)
    np.divide(values, width, out=values)
    if step.typical is None:
        np.clip(values, 0.0, 1.0, out=values)
    _to_span(step, values)
    missing = _missing(chunk)
    if pa.types.is_floating(chunk.type) and np.isnan(values).any():
        nan = np.isnan(values)  # NaN is missing too (it arrives from files outside the zone)
        missing = nan if missing is None else np.logical_or(missing, nan)
    _finish(values, indicator, missing, step.scaled_fill)


def _flag_kernel(step: FeatureStep, chunk: pa.Array, rows: np.ndarray) -> None:
    values, indicator = rows[0], rows[1]
    bits = _bitmap(chunk.buffers()[1], chunk.offset, len(chunk), invert=False)
    np.copyto(values, bits, casting="unsafe")
    _finish(values, indicator, _missing(chunk), step.scaled_fill)


def _code_dtype(step: FeatureStep) -> type[np.integer]:
    return np.uint8 if step.width <= 255 else np.int32


def _dictionary_lookup(step: FeatureStep, chunk: pa.DictionaryArray) -> np.ndarray:
    """Dictionary entry -> category code (K for "other"); one extra slot for clipped garbage."""
    k = len(step.categories)
    found = pc.index_in(chunk.dictionary, value_set=pa.array(step.categories, pa.string()))
    codes = np.asarray(pc.fill_null(found, k), dtype=np.int64)
    return np.append(codes, k).astype(_code_dtype(step))


def _category_kernel(
    step: FeatureStep, chunk: pa.Array, lookup: np.ndarray | None, rows: np.ndarray
) -> None:
    """Codes per row (index of the category, K for "other", K + 1 for missing), one-hot."""
    k = len(step.categories)
    if lookup is not None:
        # slots under nulls hold arbitrary indices: clip keeps the lookup in bounds
        codes = np.take(lookup, _values(chunk.indices), mode="clip")
    else:
        found = pc.index_in(chunk, value_set=pa.array(step.categories, pa.string()))
        codes = np.asarray(pc.fill_null(found, k), dtype=_code_dtype(step))
        if not codes.flags.writeable:
            codes = codes.copy()
    missing = _missing(chunk)
    if missing is not None:
        np.putmask(codes, missing, k + 1)
    if step.width <= _ONE_HOT_COMPARE_MAX:
        # all outputs in one broadcast comparison: codes (1, m) == 0..width-1 (width, 1)
        outputs = np.arange(step.width, dtype=codes.dtype)[:, None]
        np.equal(codes[None, :], outputs, out=rows, casting="unsafe")
    else:
        rows.fill(0.0)
        rows[codes, np.arange(len(chunk))] = 1.0


def _apply(step: FeatureStep, chunk: pa.Array, lookup: np.ndarray | None, rows: np.ndarray) -> None:
    if pa.types.is_null(chunk.type) or chunk.null_count == len(chunk):
        _all_missing(step, rows)
    elif step.kind is StepKind.NUMERIC:
        _numeric_kernel(step, chunk, rows)
    elif step.kind is StepKind.LOG:
        _log_kernel(step, chunk, rows)
    elif step.kind is StepKind.FLAG:
        _flag_kernel(step, chunk, rows)
    else:
        _category_kernel(step, chunk, lookup, rows)
