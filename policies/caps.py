"""The zone-wide cap per dataset: may a new grant be created under it?

A ``DatasetCap`` is a steward's ceiling on what one person of a dataset may be charged across
every grant ever made on it, in every project (``policies.worst_case.person_worst_case``).
``decide_dataset_cap(cap, existing, new, now, ledger) -> CapDecision`` says whether a new
grant fits, how much room is left and the largest figure that would fit; ``within_cap``
forgives the float rounding of decimal figures. Pure functions of frozen values, like
``policies.decisions``: the store reads the grants, the cap and the ledger's budgets in the
transaction that writes the grant and passes them in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from foundation.errors import PolicyDenied, SpecError
from policies.decisions import GrantView
from policies.worst_case import Charges, KeySpend, NewGrant, WorstCase, grant_terms


@dataclass(frozen=True)
class DatasetCap:
    """A steward's ceiling on what one person of ``dataset`` may be charged across every grant
    ever made on it, in every project (``person_worst_case``: what live grants can still
    release plus what expired and revoked ones did release); ``delta`` ``None``: no delta cap."""

    dataset: str
    epsilon: float
    delta: float | None
    set_by: str
    set_at: datetime

    def to_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "set_by": self.set_by,
            "set_at": self.set_at.isoformat(),
        }


@dataclass(frozen=True)
class CapDecision:
    """May a new grant be created under its dataset's cap?

    ``before`` is one person's worst case over what is already there (``person_worst_case``),
    ``after`` with the new grant added. ``epsilon_left``/``delta_left`` are the room under the
    cap before the new grant; ``max_epsilon``/``max_delta`` the largest figure the new grant
    could get (0: no room at all; less than the room when the new grant would reopen a ledger
    key with a dormant remainder); all four ``None`` when there is no such cap. When
    ``allowed`` is false, ``reason`` is one line naming ``--epsilon`` (or ``--delta``), the
    room left and the fixes, which ``fixes`` also lists.
    """

    allowed: bool
    dataset: str
    reason: str
    cap: DatasetCap | None
    before: WorstCase
    after: WorstCase
    epsilon_left: float | None = None
    delta_left: float | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    fixes: tuple[str, ...] = ()

    def raise_if_denied(self) -> None:
        """Raise ``PolicyDenied`` with the one-line reason (it already names the fixes)."""
        if not self.allowed:
            raise PolicyDenied(self.reason)

    def to_dict(self) -> dict[str, object]:
        return {
            "allowed": self.allowed,
            "dataset": self.dataset,
            "reason": self.reason,
            "cap": None if self.cap is None else self.cap.to_dict(),
            "worst_case_before": self.before.to_dict(),
            "worst_case_after": self.after.to_dict(),
            "epsilon_left": self.epsilon_left,
            "delta_left": self.delta_left,
            "max_epsilon": self.max_epsilon,
            "max_delta": self.max_delta,
            "fixes": list(self.fixes),
        }


#: significant digits of the figures a cap decision suggests
_SHOWN_DIGITS = 6
#: the float rounding of decimal figures a cap forgives, as a fraction of the cap (so that
#: 0.1 + 0.1 + 0.1 fits a cap of 0.3): far below any epsilon or delta that means anything
CAP_SLACK = 1e-9


def within_cap(total: float, cap: float) -> bool:
    """``total`` is at most ``cap`` (give or take ``CAP_SLACK`` of it for float rounding)."""
    return total <= cap + abs(cap) * CAP_SLACK


def _shown(x: float) -> float:
    """``x`` rounded to ``_SHOWN_DIGITS`` significant digits (to nearest)."""
    return float(f"{x:.{_SHOWN_DIGITS}g}")


def _nudged(x: float, steps: int) -> float:
    """``x`` (> 0) moved by ``steps`` units in its last shown digit, then shown."""
    unit = 10.0 ** (math.floor(math.log10(x)) - _SHOWN_DIGITS + 1)
    return _shown(x + steps * unit)


def _cap_for(x: float) -> float:
    """The smallest cap of ``_SHOWN_DIGITS`` significant digits that ``x`` fits."""
    if not x > 0:
        return x
    up = _shown(x)
    return up if within_cap(x, up) else _nudged(up, 1)


def _largest_fitting(total_at: Callable[[float], float], times: int, limit: float) -> float:
    """The largest x of ``_SHOWN_DIGITS`` significant digits for which ``total_at(x)`` (the
    worst case with the new grant at x, which counts ``times`` times) is ``within_cap`` of
    ``limit``; 0 when no x above 0 fits."""

    def fits(x: float) -> bool:
        return x > 0 and within_cap(total_at(x), limit)

    room = (limit - total_at(0.0)) / times
    if not room > 0:
        return 0.0
    x = _shown(room)
    for _ in range(3):  # rounding error is at most a step or so
        if fits(x):
            return x
        x = _nudged(x, -1)
    return 0.0


def decide_dataset_cap(
    cap: DatasetCap | None,
    existing: Sequence[GrantView],
    new: NewGrant,
    now: datetime,
    ledger: Sequence[KeySpend] = (),
) -> CapDecision:
    """May ``new`` be granted under the zone-wide cap on ``new.dataset``?

    One person's worst case (``person_worst_case``: live grants in full, expired and revoked
    ones by what the ledger shows they spent or reserved, per ledger key) over every grant on
    the dataset in every project, plus ``new``, must stay within ``cap.epsilon`` and, if set,
    ``cap.delta`` (``within_cap``: float rounding of decimal figures is forgiven). ``new``
    opens its ledger keys: a key it shares with earlier, now dead grants of its project (same
    project and dataset) brings their unspent remainder back, and that counts too. This is
    the defence against differencing one person across projects: two projects each granted
    epsilon 3 on the same dataset let a researcher in both spend 6 on one person; and loss
    spent under a grant stays loss after the grant expires or is revoked.
    No cap: allowed. A cap already below the existing charges refuses every new grant.
    A cap on another dataset than ``new.dataset`` is a caller's bug (``SpecError``).
    Pure: ``ledger`` is the ledger's keys on the dataset as values (``key_spends``).
    """
    if cap is not None and cap.dataset != new.dataset:
        raise SpecError(
            "cap",
            f"is for dataset {cap.dataset} but the grant is on {new.dataset}",
            "pass the cap of the dataset the grant is on",
        )

    def worst_with(g: NewGrant | None) -> WorstCase:
        return Charges.of(existing, ledger, new.dataset, now, g).worst()

    before, after = worst_with(None), worst_with(new)
    where = f"dataset {new.dataset}"
    if cap is None:
        return CapDecision(True, new.dataset, f"{where} has no cap", None, before, after)

    wide, per_site = grant_terms(new.mechanisms, 1.0)
    times = len(wide) + len(per_site)  # how many budgets the new grant would create
    eps_left = max(cap.epsilon - before.epsilon, 0.0)
    max_eps = (
        _largest_fitting(lambda x: worst_with(replace(new, epsilon=x)).epsilon, times, cap.epsilon)
        if times
        else None
    )
    over_e = not within_cap(after.epsilon, cap.epsilon)
    cap_delta = cap.delta
    delta_left = max_delta = None
    over_d = False
    if cap_delta is not None:
        delta_left = max(cap_delta - before.delta, 0.0)
        max_delta = (
            _largest_fitting(lambda x: worst_with(replace(new, delta=x)).delta, times, cap_delta)
            if times
            else None
        )
        over_d = not within_cap(after.delta, cap_delta)
    if not (over_e or over_d):
        return CapDecision(
            True,
            new.dataset,
            f"one person's worst case on {where} would be epsilon {after.epsilon:g}"
            f" of the cap {cap.epsilon:g}",
            cap,
            before,
            after,
            epsilon_left=eps_left,
            delta_left=delta_left,
            max_epsilon=max_eps,
            max_delta=max_delta,
        )

    twice = " (the grant counts twice: a dataset-wide and a per-site budget)" if times == 2 else ""
    reopened = worst_with(replace(new, epsilon=0.0, delta=0.0)).epsilon
    back = (
        f"; a grant to project {new.project} reopens its ledger budget on {new.dataset}, which"
        f" brings back epsilon {reopened - before.epsilon:g} its expired or revoked grants"
        " left unspent"
        if not within_cap(reopened, before.epsilon)
        else ""
    )
    parts: list[str] = []
    fixes: list[str] = []
    if over_e:
        parts.append(
            f"--epsilon {float(new.epsilon):g} would let one person of {where} be charged"
            f" epsilon {after.epsilon:g} across all projects, over the dataset's cap of"
            f" {cap.epsilon:g} ({eps_left:g} left under the cap){twice}{back}"
        )
        if max_eps:
            fixes.append(f"lower --epsilon to at most {max_eps:g}")
    raise_cmd = f"sandbox dataset cap {new.dataset} --epsilon " + (
        f"{_cap_for(max(after.epsilon, cap.epsilon)):g}"
    )
    if cap_delta is not None:
        if over_d:
            parts.append(
                f"--delta {float(new.delta):g} would take one person's delta to"
                f" {after.delta:g}, over the cap of {cap_delta:g} ({delta_left:g} left)"
            )
            if max_delta:
                fixes.append(f"lower --delta to at most {max_delta:g}")
        raise_cmd += f" --delta {_cap_for(max(after.delta, cap_delta)):g}"
    fixes.append(f"have a data steward raise the cap ({raise_cmd})")
    return CapDecision(
        False,
        new.dataset,
        "; ".join(parts) + ": " + ", or ".join(fixes),
        cap,
        before,
        after,
        epsilon_left=eps_left,
        delta_left=delta_left,
        max_epsilon=max_eps,
        max_delta=max_delta,
        fixes=tuple(fixes),
    )
