"""Free dummy data: a table drawn from the schema contract alone, never from rows.

Dummy data costs no privacy budget because it reads nothing but the steward's contract: the
governed Arrow schema, the declared domains (``min``/``max``), vocabularies (``categories``),
``fill``, ``missing_rate`` and ``positive_rate``. It lets a researcher develop and debug code
(preprocessing, models, reports) against the real schema before any access is granted. Its
values carry no information about any person and its distributions are not the data's.

What ``dummy_table`` draws, column by column (one row stands for one person, as in governed
data):

* identifier: a random 64-character hex string, shaped like the keyed HMAC-SHA256 pseudonym
  that ingest writes (and unique);
* direct identifiers: absent (as in governed data);
* site: the column's declared ``categories`` if any, else ``site-1`` .. ``site-3``;
* string columns with declared ``categories``: every category appears at least once when the
  rows allow, the first categories more often than the last (a Zipf-like fall-off, so there
  are rare categories), plus a small share of one undeclared value: the contract says values
  outside the vocabulary map to "other", and downstream code must meet that path;
  string columns without a vocabulary: ``NAME-1`` .. ``NAME-5``;
* numeric columns with a declared ``[min, max]``: integers uniformly over the integer values
  in the domain; floats uniformly, or triangular with its mode at the declared ``fill`` when
  there is one; values always lie inside the domain after rounding to the column's type;
  a column declared ``scale = "log"`` draws the same way on ``log(1 + x)`` (uniform, or
  triangular with its mode at ``log1p(fill)``, between ``log1p(min)`` and ``log1p(max)``;
  integers are rounded), so its values are heavy-tailed as the declaration says;
* numeric columns without a domain: :data:`UNDECLARED_NUMERIC_RANGE`;
* bool columns: fair coin flips;
* labels: 1 (``True``) with the declared ``positive_rate`` (else one half), else 0; an integer
  label without a declared domain is binary 0/1 (:data:`LABEL_DEFAULT_DOMAIN`);
* dates and timestamps: uniformly within the declared domain when one is declared (days since
  1970-01-01 for dates, seconds for timestamps), else within :data:`DEFAULT_DATE_RANGE`;
* nulls: exactly ``round(missing_rate * rows)`` of them in each nullable column that declares
  a ``missing_rate`` (none otherwise; identifier, site and label are never null).

Everything is drawn from one seeded generator, so ``(contract, rows, seed)`` gives the same
table every time.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa

from connectors.scale_arrays import from_scale, to_scale
from connectors.scales import Scale
from connectors.schema import SchemaContract
from connectors.schema_columns import ColumnSpec, Role
from foundation.errors import SpecError

#: Sites used when the contract declares no vocabulary for its site column.
DEFAULT_SITES = ("site-1", "site-2", "site-3")
#: Dates drawn when a temporal column declares no domain (a fixed, plausible window).
DEFAULT_DATE_RANGE = (dt.date(2019, 1, 1), dt.date(2023, 12, 31))
#: Range for numeric columns that declare no domain (only non-feature columns can lack one).
UNDECLARED_NUMERIC_RANGE = (0.0, 100.0)
#: The domain of an integer label that declares no ``min``/``max``: binary 0/1 (see
#: ``connectors.schema``).
LABEL_DEFAULT_DOMAIN = (0.0, 1.0)
#: Share of rows of a vocabulary column that get an undeclared value (exercises "other").
UNDECLARED_SHARE = 0.02
#: The undeclared value itself; a suffix is added if a contract happens to declare it.
UNDECLARED_VALUE = "undeclared-value"
#: Values used for string columns that declare no vocabulary.
_FREE_STRING_VALUES = 5

_EPOCH = dt.date(1970, 1, 1)
_SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def dummy_table(contract: SchemaContract, rows: int, seed: int) -> pa.Table:
    """A table with exactly ``contract.governed_arrow_schema()`` and ``rows`` rows (one per
    made-up person), drawn from the contract alone. See the module docstring for the rules."""
    if not isinstance(contract, SchemaContract):
        raise SpecError("contract", "must be a SchemaContract", "load the dataset's contract")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise SpecError("rows", "must be an integer >= 0", "pass e.g. 1000")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpecError("seed", "must be a non-negative integer", "pass e.g. 0")
    schema = contract.governed_arrow_schema()
    # One child generator per column (spawned in contract order) so that one column's draws
    # do not depend on how many numbers another column consumed.
    children = np.random.SeedSequence(seed).spawn(len(schema))
    arrays = [
        _column(contract.column(field.name), rows, np.random.default_rng(child))
        for field, child in zip(schema, children, strict=True)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def random_pseudonyms(rows: int, rng: np.random.Generator) -> pa.Array:
    """``rows`` random 64-hex-character strings, shaped like ingest's pseudonyms.

    256 random bits each, so a repeat (or a match with a real pseudonym) has probability
    about rows**2 / 2**257: negligible."""
    raw = rng.bytes(32 * rows)
    return pa.array([raw[32 * i : 32 * (i + 1)].hex() for i in range(rows)], pa.string())


def to_arrow_within_domain(values: np.ndarray, spec: ColumnSpec) -> pa.Array:
    """Float64 ``values`` (NaN = null) as an Arrow array of ``spec``'s numeric or bool type.

    Integers are rounded; every value is kept inside the declared ``[min, max]`` *after*
    rounding to the column's type. Why: float32 rounding can carry a value just past a bound
    (float32(0.2) > 0.2), and ingest and preprocessing treat the bounds as hard."""
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    if spec.type == "bool":
        return pa.array(np.where(missing, False, values > 0.5), pa.bool_(), mask=missing)
    if spec.min is not None and spec.max is not None:
        lo, hi = spec.min, spec.max
        values = np.clip(values, lo, hi)
    elif spec.role is Role.LABEL:
        # an integer label without a declared domain is binary 0/1 (see connectors.schema)
        lo, hi = LABEL_DEFAULT_DOMAIN
        values = np.clip(values, lo, hi)
    else:
        lo, hi = -math.inf, math.inf
    if spec.is_integer:
        arrow_type = spec.arrow_type
        # no declared domain: the integer type's own range bounds the values (math.ceil of an
        # infinite bound would raise OverflowError)
        info = np.iinfo(arrow_type.to_pandas_dtype())
        low = math.ceil(lo) if math.isfinite(lo) else int(info.min)
        high = math.floor(hi) if math.isfinite(hi) else int(info.max)
        # float64 cannot hold every int64: keep the bounds where float64 rounding cannot step
        # past them
        low = max(low, -(2**53)) if info.bits > 53 else low
        high = min(high, 2**53) if info.bits > 53 else high
        ints = np.clip(np.round(np.where(missing, 0.0, values)), low, high)
        return pa.array(ints.astype(arrow_type.to_pandas_dtype()), arrow_type, mask=missing)
    if spec.type == "float32":
        out = np.where(missing, 0.0, values).astype(np.float32)
        if math.isfinite(hi):
            # step back inside a bound that float32 rounding stepped over
            top = np.float32(hi)
            top = top if float(top) <= hi else np.nextafter(top, np.float32(-np.inf))
            bottom = np.float32(lo)
            bottom = bottom if float(bottom) >= lo else np.nextafter(bottom, np.float32(np.inf))
            out = np.clip(out, bottom, top)
        return pa.array(out, pa.float32(), mask=missing)
    return pa.array(np.where(missing, 0.0, values), pa.float64(), mask=missing)


def _column(spec: ColumnSpec, rows: int, rng: np.random.Generator) -> pa.Array:
    if spec.role is Role.IDENTIFIER:
        return random_pseudonyms(rows, rng)
    missing = _missing_mask(spec, rows, rng)
    present = int((~missing).sum())
    if spec.role is Role.SITE:
        values = _categories(list(spec.categories or DEFAULT_SITES), present, rng, other=None)
        return _strings(values, missing)
    if spec.type == "string":
        if spec.categories is None:
            words = [f"{spec.name}-{k}" for k in range(1, _FREE_STRING_VALUES + 1)]
            return _strings(_categories(words, present, rng, other=None), missing)
        other = UNDECLARED_VALUE
        while other in spec.categories:
            other += "-x"
        return _strings(_categories(list(spec.categories), present, rng, other=other), missing)
    if spec.is_temporal:
        return _temporal(spec, missing, rng)
    if spec.role is Role.LABEL:
        return _label(spec, rows, rng)
    values = np.full(rows, np.nan)
    values[~missing] = _numbers(spec, present, rng)
    return to_arrow_within_domain(values, spec)


def _missing_mask(spec: ColumnSpec, rows: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(rows, dtype=bool)
    if spec.is_nullable and spec.missing_rate:
        # an exact count, not a coin per row: small dummy tables still show the declared rate
        mask[rng.choice(rows, size=round(spec.missing_rate * rows), replace=False)] = True
    return mask


def _categories(
    words: list[str], n: int, rng: np.random.Generator, *, other: str | None
) -> np.ndarray:
    """``n`` draws: each word once first (when n allows), the rest Zipf-like, plus ``other``."""
    n_other = 0 if other is None or n <= len(words) else max(1, round(UNDECLARED_SHARE * n))
    n_other = min(n_other, n - len(words)) if n > len(words) else 0
    guaranteed = min(n, len(words))
    weights = 1.0 / np.arange(1, len(words) + 1)
    rest = rng.choice(len(words), size=n - guaranteed - n_other, p=weights / weights.sum())
    vocab = np.asarray([*words, other if other is not None else ""], dtype=object)
    codes = np.concatenate(
        [np.arange(guaranteed), rest, np.full(n_other, len(words), dtype=np.int64)]
    )
    return vocab[rng.permutation(codes)] if n else vocab[:0]


def _strings(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    out = np.empty(missing.size, dtype=object)
    out[~missing] = values
    return pa.array(out.tolist(), pa.string())


def _numbers(spec: ColumnSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.type == "bool":
        return (rng.random(n) < 0.5).astype(np.float64)
    lo, hi = _domain(spec, UNDECLARED_NUMERIC_RANGE)
    if spec.scale is Scale.LOG:
        # the contract's rules guarantee a declared domain with min >= 0 here
        a, b = float(to_scale(lo, spec.scale)), float(to_scale(hi, spec.scale))
        if spec.fill is not None and lo < spec.fill < hi:
            drawn = rng.triangular(a, float(to_scale(spec.fill, spec.scale)), b, size=n)
        else:
            drawn = rng.uniform(a, b, size=n)
        values = np.clip(from_scale(drawn, spec.scale), lo, hi)
        return np.round(values) if spec.is_integer else values
    if spec.is_integer:
        low, high = math.ceil(lo), math.floor(hi)
        return rng.integers(low, high + 1, size=n).astype(np.float64)
    if spec.fill is not None and lo < spec.fill < hi:
        return rng.triangular(lo, spec.fill, hi, size=n)
    return rng.uniform(lo, hi, size=n)


def _domain(spec: ColumnSpec, default: tuple[float, float]) -> tuple[float, float]:
    """The declared [min, max] (the contract declares both or neither), else ``default``."""
    if spec.min is None or spec.max is None:
        return default
    return spec.min, spec.max


def _label(spec: ColumnSpec, rows: int, rng: np.random.Generator) -> pa.Array:
    rate = 0.5 if spec.positive_rate is None else spec.positive_rate
    positive = rng.random(rows) < rate
    if spec.type == "bool":
        return pa.array(positive, pa.bool_())
    lo, hi = _domain(spec, LABEL_DEFAULT_DOMAIN)
    if not (lo <= 0.0 and hi >= 1.0):
        # a label whose declared domain excludes 0 or 1 is not binary: draw its integers
        return to_arrow_within_domain(rng.integers(math.ceil(lo), math.floor(hi) + 1, rows), spec)
    return to_arrow_within_domain(positive.astype(np.float64), spec)


def _temporal(spec: ColumnSpec, missing: np.ndarray, rng: np.random.Generator) -> pa.Array:
    rows = missing.size
    if spec.type == "date32":
        if spec.min is not None and spec.max is not None:
            lo, hi = math.ceil(spec.min), math.floor(spec.max)
        else:
            lo, hi = ((d - _EPOCH).days for d in DEFAULT_DATE_RANGE)
        days = rng.integers(lo, hi + 1, size=rows).astype("int32")
        return pa.array(days, pa.int32(), mask=missing).cast(pa.date32())
    unit = spec.arrow_type.unit
    per_second = _SECONDS_PER_UNIT[unit]
    if spec.min is not None and spec.max is not None:
        lo_s, hi_s = spec.min, spec.max
    else:
        lo_s, hi_s = ((d - _EPOCH).days * 86_400.0 for d in DEFAULT_DATE_RANGE)
        hi_s += 86_399.0
    ticks = np.floor(rng.uniform(lo_s, hi_s, size=rows) * per_second).astype(np.int64)
    return pa.array(ticks, pa.int64(), mask=missing).cast(spec.arrow_type)
