"""A query's plan: its noisy parts, their epsilon shares, sensitivities and scales, from the
contract alone.

Both ``quote`` (no data) and ``run`` (the rows) use the one plan, so the scales a quote shows
are the scales a run draws with. The neighbouring relation is add or remove one person; a
person contributes at most k = ``contract.query_rows_per_person`` rows (the reader keeps
their first k), so every sensitivity is k times a row's:

- count / histogram cells: discrete Laplace, L1 sensitivity k (a row is in one cell);
- sum: Laplace, L1 sensitivity k * max(|min|, |max|) plus the float slack below;
- mean: half the epsilon on the sum of (x - min) in [0, max - min] (sensitivity
  k * (max - min) plus slack), half on the count of non-null values (k);
- quantiles: epsilon split evenly over the levels, d_in = k rows for each.

Float sums: a sum is ``math.fsum`` of the clamped values (correctly rounded: within half an
ulp of the exact sum, |error| <= 2^-53 |S|). Two neighbouring exact sums differ by at most
the sensitivity; after rounding, by at most that plus 2^-52 max|S| in total over the cells,
and |S| <= rows * bound. The engine refuses more than ``MAX_SUM_ROWS`` = 2^31 rows, so
``bound * 2^-20`` covers the rounding (with room for subnormal steps), and is added to the
sensitivity. It is a millionth of one row's bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any

import numpy as np

from connectors.schema import SchemaContract
from privacy.dpquery import noise
from privacy.dpquery.cells import Cells, bin_cells, bin_note, bounds, category_cells
from privacy.dpquery.spec import MISSING, OTHER, QueryKind, QuerySpec, check_against

#: the most rows a float sum may add (see the module docstring's slack)
MAX_SUM_ROWS = 2**31
#: the float-rounding slack per unit of a row's bound
SUM_SLACK = 2.0**-20
#: quantile candidates: every integer when an integer column's range holds at most this many
MAX_INTEGER_CANDIDATES = 1000
#: otherwise this many equally spaced points over [min, max]
GRID_CANDIDATES = 201


class Mechanism(StrEnum):
    DISCRETE_LAPLACE = "discrete-laplace"
    LAPLACE = "laplace"
    QUANTILE = "exponential-mechanism-quantile"


@dataclass(frozen=True)
class Part:
    """One noisy release of a query."""

    measures: str
    mechanism: Mechanism
    epsilon: float
    #: L1 sensitivity (Laplace), or d_in in rows (quantile)
    sensitivity: float
    noise_scale: float
    #: how many noisy numbers (cells); for a quantile the number of candidates it picks from
    cells: int
    #: 95% half-width of each noisy number (Laplace kinds)
    half_width_95: float | None = None
    #: 95% rank error (quantiles; ``noise.quantile_rank_error``)
    rank_error_95: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "measures": self.measures,
            "mechanism": self.mechanism.value,
            "epsilon": self.epsilon,
            "sensitivity": self.sensitivity,
            "noise_scale": self.noise_scale,
            "cells": self.cells,
            "half_width_95": self.half_width_95,
            "rank_error_95": self.rank_error_95,
        }


@dataclass(frozen=True)
class Plan:
    spec: QuerySpec
    k: int
    parts: tuple[Part, ...]
    notes: tuple[str, ...]
    #: the cells of the noisy vector: ``by`` groups, or the histogram's cells; None: one cell
    cells: Cells | None = None
    #: the declared [min, max] of a numeric value column
    lo: float = 0.0
    hi: float = 0.0
    candidates: tuple[float, ...] = ()


def _share(epsilon: float, parts: int) -> float:
    """epsilon / parts, rounded down if need be so that parts shares never sum above it."""
    share = epsilon / parts
    while Fraction(share) * parts > Fraction(epsilon):
        share = math.nextafter(share, 0.0)
    return share


def level_label(level: float) -> str:
    """``p50``, ``p2.5``, ``p12.34567``: exact (decimal of the level's repr), so distinct
    levels never share a label."""
    percent = Decimal(repr(level)) * 100
    return "p" + format(percent.normalize(), "f")


def quantile_candidates(lo: float, hi: float, integer: bool) -> tuple[float, ...]:
    first, last = math.ceil(lo), math.floor(hi)
    if integer and 2 <= last - first + 1 <= MAX_INTEGER_CANDIDATES:
        return tuple(float(c) for c in range(first, last + 1))
    return tuple(float(c) for c in np.linspace(lo, hi, GRID_CANDIDATES))


def _count_part(measures: str, epsilon: float, k: int, cells: int) -> Part:
    scale = noise.discrete_laplace_scale(k, epsilon)
    return Part(
        measures,
        Mechanism.DISCRETE_LAPLACE,
        epsilon,
        float(k),
        scale,
        cells,
        half_width_95=float(noise.discrete_laplace_half_width(scale)),
    )


def sum_sensitivity(k: int, bound: float) -> float:
    return k * bound + bound * SUM_SLACK


def _sum_part(measures: str, epsilon: float, sensitivity: float, cells: int) -> Part:
    scale = noise.laplace_scale(sensitivity, epsilon)
    return Part(
        measures,
        Mechanism.LAPLACE,
        epsilon,
        sensitivity,
        scale,
        cells,
        half_width_95=noise.laplace_half_width(scale),
    )


def _group_notes(cells: Cells) -> list[str]:
    extra = f", then {OTHER} for values outside them"
    if cells.has_missing:
        extra += f" and {MISSING} for nulls"
    return [
        f"the cells are the declared categories of {cells.column}{extra}; "
        "no cell comes from the data"
    ]


def make_plan(spec: QuerySpec, contract: SchemaContract) -> Plan:
    """The plan of ``spec`` on ``contract``; refuses what ``check_against`` refuses."""
    check_against(spec, contract)
    k = contract.query_rows_per_person
    eps = spec.epsilon
    rows = "one row" if k == 1 else f"{k} rows"
    notes = [
        f"each person counts at most {rows} (their first in storage order); epsilon "
        f"{eps:g} with delta 0 covers adding or removing one person with all of them"
        if contract.identifier is not None
        else f"the dataset has no identifier column: each row is a person; epsilon {eps:g} "
        "with delta 0 covers adding or removing one row"
    ]
    groups = category_cells(contract.column(spec.by)) if spec.by is not None else None
    n_cells = groups.size if groups is not None else 1
    if groups is not None:
        notes += _group_notes(groups)
    kind = spec.kind
    if kind is QueryKind.COUNT:
        what = "rows" if k == 1 else f"rows (at most {k} per person), not persons"
        notes.append(
            f"counts {what}; noisy counts are whole numbers and may be negative: the values "
            "are not clamped (their intervals are, at 0)"
        )
        parts: tuple[Part, ...] = (_count_part("count", eps, k, n_cells),)
        return Plan(spec, k, parts, tuple(notes), cells=groups)

    col = contract.column(spec.column or "")
    if kind is QueryKind.HISTOGRAM:
        if col.categories is not None:
            cells = category_cells(col)
            notes += _group_notes(cells)
        else:
            cells = bin_cells(col, spec.bins)
            notes.append(
                bin_note(col, spec.bins)
                + "; values outside it count in the first or last bin"
                + (f"; nulls count in {MISSING}" if cells.has_missing else "")
            )
        notes.append("noisy counts are whole numbers and may be negative: they are not clamped")
        parts = (_count_part(f"histogram of {col.name}", eps, k, cells.size),)
        return Plan(spec, k, parts, tuple(notes), cells=cells)

    lo, hi = bounds(col)
    clamp = f"values are clamped to the declared [{lo:g}, {hi:g}]; nulls are skipped"
    if kind is QueryKind.SUM:
        bound = max(abs(lo), abs(hi))
        parts = (_sum_part(f"sum of {col.name}", eps, sum_sensitivity(k, bound), n_cells),)
        notes.append(clamp)
        return Plan(spec, k, parts, tuple(notes), cells=groups, lo=lo, hi=hi)

    if kind is QueryKind.MEAN:
        half = eps / 2.0  # exact: halving a float never rounds (above the subnormals)
        width = hi - lo
        parts = (
            _sum_part(f"sum of ({col.name} - {lo:g})", half, sum_sensitivity(k, width), n_cells),
            _count_part(f"count of non-null {col.name}", half, k, n_cells),
        )
        notes += [
            clamp,
            "half the epsilon measures the sum of (value - min), half the count of non-null "
            "values; mean = min + sum / count, kept inside [min, max]; its 95% interval joins "
            "97.5% intervals of both",
        ]
        return Plan(spec, k, parts, tuple(notes), cells=groups, lo=lo, hi=hi)

    # quantiles
    candidates = quantile_candidates(lo, hi, col.is_integer)
    share = _share(eps, len(spec.quantiles))
    qparts = []
    for level in spec.quantiles:
        scale = noise.quantile_scale(candidates, level, share, k)
        qparts.append(
            Part(
                level_label(level),
                Mechanism.QUANTILE,
                share,
                float(k),
                scale,
                len(candidates),
                rank_error_95=noise.quantile_rank_error(scale, len(candidates)),
            )
        )
    spacing = candidates[1] - candidates[0]
    notes += [
        clamp,
        f"epsilon is split evenly over the {len(spec.quantiles)} level(s)",
        f"each answer is one of {len(candidates)} fixed candidates over [{lo:g}, {hi:g}] "
        f"(spacing {spacing:g})",
        "rank_error: with 95% probability the released value's rank is within rank_error "
        "rows of the target rank (level x the number of values), plus the rows that fall "
        "between two neighbouring candidates",
    ]
    return Plan(spec, k, tuple(qparts), tuple(notes), lo=lo, hi=hi, candidates=tuple(candidates))
