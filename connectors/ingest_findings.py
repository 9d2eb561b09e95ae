"""What checking a source against its contract found: every violation, and what was cleaned.

A check runs over the whole file and collects instead of stopping at the first problem, so a
steward sees every violation in one pass (``sandbox dataset check``), and ingest refuses with
the same full list. A ``Violation`` is one problem in one column: how many rows have it and
the first few data row numbers (1-based, the header not counted), never a value. ``cleaned``
counts, per column, what the contract's declared cleaning changed (``connectors.cleaning``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from foundation.errors import SchemaError

#: how many row numbers a violation lists
FIRST_ROWS = 5
#: a typical range is a reference range, about 95% of values: more than this share of a
#: column's values outside it gets a note (preprocessing maps the range to [-2, 2], so values
#: far outside become large inputs)
TYPICAL_OUTSIDE_NOTE = 0.15

#: what each cleaning count means, for people (keys of ``CheckReport.cleaned``)
CLEANED_MEANS = {
    "na_values": "declared missing text, now missing",
    "normalized": "matched a category ignoring case and spaces",
    "aliased": "matched a category through an alias",
    "clipped": "outside the domain, moved to the nearest bound",
    "nulled": "outside the domain or vocabulary, now missing",
    "other": "outside the vocabulary, kept (preprocessing maps them to 'other')",
}


# a problem is written for many rows, starting with its verb; one row takes the singular
_SINGULAR = {"are": "is", "do": "does", "lie": "lies", "repeat": "repeats"}


@dataclass(frozen=True)
class Violation:
    """One problem in one column (or in the file: ``column`` None)."""

    column: str | None
    #: what is wrong, for many rows, starting with its verb ("lie outside the domain")
    problem: str
    fix: str
    count: int
    rows: tuple[int, ...]

    def line(self) -> str:
        where = f"column {self.column!r}: " if self.column is not None else ""
        rows = ", ".join(str(r) for r in self.rows)
        more = ", ..." if self.count > len(self.rows) else ""
        label = "data row" if len(self.rows) == 1 else "data rows"
        if self.count == 1:
            verb, _, rest = self.problem.partition(" ")
            said = f"1 row {_SINGULAR.get(verb, verb)} {rest}".rstrip()
        else:
            said = f"{self.count} rows {self.problem}"
        return f"{where}{said} ({label} {rows}{more}; fix: {self.fix})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "problem": self.problem,
            "fix": self.fix,
            "count": self.count,
            "first_rows": list(self.rows),
        }


@dataclass(frozen=True)
class CheckReport:
    """Every violation of a source against its contract, and what cleaning changed."""

    rows: int
    violations: tuple[Violation, ...]
    #: column -> what was cleaned (a key of ``CLEANED_MEANS``) -> rows
    cleaned: dict[str, dict[str, int]] = field(hash=False)
    #: column with a declared typical range -> "below", "above" it and "values" (non-missing)
    typical: dict[str, dict[str, int]] = field(default_factory=dict, hash=False)

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def notes(self) -> list[str]:
        """Advice that refuses nothing: a typical range that holds too few of its column's
        values (counts and shares only, never a value)."""
        out = []
        for column, c in self.typical.items():
            values = c["values"]
            if not values or (c["below"] + c["above"]) / values <= TYPICAL_OUTSIDE_NOTE:
                continue
            below, above = c["below"] / values, c["above"] / values
            tail = (
                'declare scale = "log" if the column has a long tail, or widen the range'
                if above > below
                else "widen the range"
            )
            out.append(
                f"column {column!r}: {below + above:.0%} of its values lie outside its typical "
                f"range ({below:.0%} below, {above:.0%} above); a reference range holds about "
                f"95%, and values far outside it become large model inputs: {tail}"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": self.rows,
            "violations": [v.to_dict() for v in self.violations],
            "cleaned": {c: dict(a) for c, a in self.cleaned.items()},
            "typical": {c: dict(a) for c, a in self.typical.items()},
            "notes": self.notes,
        }

    def refusal(self) -> SchemaError:
        """The error ingest raises: every violation, one per line."""
        first = self.violations[0]
        if len(self.violations) == 1:
            message = first.line()
        else:
            message = (
                f"the source breaks its contract in {len(self.violations)} ways "
                "(nothing was written):\n" + "\n".join("  " + v.line() for v in self.violations)
            )
        return SchemaError(message, column=first.column, row=first.rows[0] if first.rows else None)


class Findings:
    """The collector one check fills: violations in the order found, and cleaning counts."""

    def __init__(self, rows: int | None = None) -> None:
        self.violations: list[Violation] = []
        self.cleaned: dict[str, dict[str, int]] = {}
        self.typical: dict[str, dict[str, int]] = {}
        #: with ``rows``: every row in some violation (a released model leaves them unscored)
        self.rejected = None if rows is None else np.zeros(rows, dtype=bool)

    def violate(self, column: str | None, mask: np.ndarray, problem: str, fix: str) -> bool:
        """Record the rows where ``mask`` is true as one violation; False when there are none."""
        where = np.flatnonzero(mask)
        if not where.size:
            return False
        if self.rejected is not None:
            self.rejected |= mask
        rows = tuple(int(i) + 1 for i in where[:FIRST_ROWS])
        self.violations.append(Violation(column, problem, fix, int(where.size), rows))
        return True

    def clean(self, column: str, what: str, count: int) -> None:
        if count:
            per = self.cleaned.setdefault(column, {})
            per[what] = per.get(what, 0) + int(count)

    def cover(self, column: str, below: int, above: int, values: int) -> None:
        """How many of ``column``'s values lie below and above its typical range."""
        self.typical[column] = {"below": int(below), "above": int(above), "values": int(values)}

    def report(self, rows: int) -> CheckReport:
        return CheckReport(
            rows,
            tuple(self.violations),
            {c: dict(a) for c, a in self.cleaned.items()},
            {c: dict(a) for c, a in self.typical.items()},
        )
