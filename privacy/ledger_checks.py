"""Argument checks and refusal messages for ``privacy.ledger.Ledger``.

A caller's bad epsilon, delta or name is a ``SpecError`` naming the field; an accountant's
broken figure at commit is an ``IntegrityError`` (a backend fault, nothing written). ``fits``
is the one comparison of a request with what is left, with ``REL_TOLERANCE`` of slack for float
rounding (see the ledger's module docstring); ``check_fits`` raises the refusal a reservation,
a quote and a dry run share. A refusal's fix names what would help: a smaller request (down to
what is left) while something is left, only more budget from the steward once nothing is.
"""

from __future__ import annotations

import math

from foundation.errors import BudgetExceeded, IntegrityError, SpecError
from privacy.budget_events import MAX_NAME, Balance, BudgetKey

#: relative slack for float rounding when comparing a request with what is left (see
#: ``privacy.ledger``'s module docstring)
REL_TOLERANCE = 1e-12


def check_amount(value: object, field_name: str, *, positive: bool, below_one: bool) -> float:
    """Validate one epsilon/delta figure given by a caller; SpecError names the field."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(field_name, "must be a number", "give a finite decimal number")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise SpecError(field_name, "must be finite", "give a finite decimal number")
    if positive and number <= 0:
        raise SpecError(field_name, "must be greater than 0", "give a positive number")
    if number < 0:
        raise SpecError(field_name, "must not be negative", "give 0 or a positive number")
    if below_one and number >= 1:
        raise SpecError(field_name, "must be below 1", "give a delta well below 1/n")
    return number


def check_name(value: object, field_name: str, fix: str, *, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(field_name, "is empty", fix)
    if len(value) > limit:
        raise SpecError(field_name, f"is longer than {limit} characters", "use a shorter id")
    return value


def check_spent(value: object, field_name: str, reservation_id: str) -> float:
    """Validate an accountant's figure for ``commit``: a bad one is a backend fault."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        number = math.nan
    else:
        number = float(value)
    if math.isnan(number) or math.isinf(number) or number < 0:
        raise IntegrityError(
            f"{field_name} for reservation {reservation_id} is not a finite non-negative "
            "number: the accountant's figure is broken; nothing was written, the reservation "
            "stays open (fix the accountant and commit again, or release if no data was read)"
        )
    return number


def fits(amount: float, remaining: float, scale: float) -> bool:
    return amount <= remaining + REL_TOLERANCE * scale


def scale_of(what: str, bal: Balance) -> float:
    """The scale a request on ``what`` is compared at (``fits``): the grant, at least 1.0 for
    epsilon (see the ledger's module docstring)."""
    return max(bal.granted_epsilon, 1.0) if what == "epsilon" else bal.granted_delta


def check_fits(key: BudgetKey, bal: Balance, epsilon: float, delta: float) -> None:
    """Raise ``BudgetExceeded`` unless ``(epsilon, delta)`` fits what ``bal`` has left: the
    one comparison ``Ledger.reserve`` makes under the key's lock, and the one a quote or a
    dry run makes on a read (``sandbox.mechanisms.precheck``), so all say the same."""
    if not fits(epsilon, bal.remaining_epsilon, scale_of("epsilon", bal)):
        raise BudgetExceeded(budget_refusal(key, "epsilon", epsilon, bal.remaining_epsilon, bal))
    if not fits(delta, bal.remaining_delta, scale_of("delta", bal)):
        raise BudgetExceeded(budget_refusal(key, "delta", delta, bal.remaining_delta, bal))


def nothing_left(what: str, remaining: float, bal: Balance) -> bool:
    """Whether ``what`` is used up on this budget (within float rounding): then no job
    can run on it, whatever it asks, until a steward grants more."""
    return remaining <= REL_TOLERANCE * scale_of(what, bal)


def _rounded_down(value: float) -> str:
    """``value`` at 3 significant digits, rounded down: lowering a request to the figure
    shown must fit what is left (the nudge only absorbs the division's float error)."""
    if value <= 0:
        return "0"
    step = 10.0 ** (math.floor(math.log10(value)) - 2)
    return f"{math.floor(value / step * (1 + REL_TOLERANCE)) * step:.3g}"


def budget_fix(what: str, remaining: float, bal: Balance) -> str:
    """What would actually help a refused request: with something left, asking less (down to
    what is left) or asking the steward for more; with nothing left, only more budget, since
    lowering the request cannot fit a budget that is used up."""
    if nothing_left(what, remaining, bal):
        return (
            f"nothing remains of this budget's {what}, so lowering privacy.{what} cannot "
            f"help: ask the steward for more {what} (a new access request, whose approval "
            "adds to this budget)"
        )
    return (
        f"ask the steward for more budget or lower privacy.{what} to at most "
        f"{_rounded_down(remaining)}"
    )


def budget_refusal(
    key: BudgetKey,
    what: str,
    requested: float,
    remaining: float,
    bal: Balance,
) -> str:
    granted = bal.granted_epsilon if what == "epsilon" else bal.granted_delta
    spent = bal.spent_epsilon if what == "epsilon" else bal.spent_delta
    reserved = bal.reserved_epsilon if what == "epsilon" else bal.reserved_delta
    if granted == 0:
        return (
            f"budget {key}: requested {what} {requested:g} but no {what} has been granted "
            f"on this key (remaining {what} 0); ask a data steward to grant it (an access "
            "request naming this dataset)"
        )
    return (
        f"budget {key}: requested {what} {requested:g} but only {max(remaining, 0.0):g} "
        f"remains (granted {granted:g}, spent {spent:g}, reserved by open jobs "
        f"{reserved:g}); {budget_fix(what, remaining, bal)}"
    )


def unknown_reservation(reservation_id: str) -> str:
    return (
        f"reservation_id {reservation_id!r} is not in the ledger: "
        "pass the id that reserve() returned for this job"
    )
