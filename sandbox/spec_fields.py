"""The field readers every spec parser shares (``sandbox.jobspec``): each refusal is a
``SpecError`` naming the field (``privacy.epsilon``) and the fix, and never echoes a value
beyond the number's own kind."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from foundation.errors import SpecError

_T = TypeVar("_T")


def unknown(where: str, got: Mapping[str, Any], known: set[str]) -> None:
    extra = sorted(set(got) - known)
    if extra:
        prefix = f"{where}." if where else ""
        raise SpecError(
            f"{prefix}{extra[0]}",
            "is not a known field",
            f"known fields: {', '.join(sorted(known))}",
        )


def name(d: Mapping[str, Any], key: str) -> str:
    if key not in d:
        raise SpecError(key, "is required", f'add {key} = "..."')
    v = d[key]
    if not isinstance(v, str) or not v.strip():
        raise SpecError(key, "must be a non-empty string", f'e.g. {key} = "name"')
    return v


def number(
    d: Mapping[str, Any],
    section: str,
    key: str,
    *,
    default: float | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    integer: bool = False,
) -> Any:
    field = f"{section}.{key}"
    if key not in d:
        if default is None:
            raise SpecError(field, "is required", f"add {key} = ... under [{section}]")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(field, "must be a number", f"write {key} = <number>")
    if integer and not isinstance(v, int):
        raise SpecError(field, "must be a whole number", f"e.g. {key} = {int(v)}")
    if not math.isfinite(v):
        raise SpecError(field, "must be finite", "use a finite number")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise SpecError(field, f"must be {'>' if lo_open else '>='} {lo}", "raise it")
    if hi is not None and v > hi:
        raise SpecError(field, f"must be <= {hi}", "lower it")
    return v


def flag(d: Mapping[str, Any], section: str, key: str, *, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise SpecError(f"{section}.{key}", "must be true or false", f"write {key} = false")
    return v


#: what a spec writes for a hyperparameter the zone is to choose (``docs/tuning.md``)
AUTO = "auto"
#: the hyperparameters a DP-SGD spec may leave out or write as ``"auto"``; the zone chooses
#: them by a search on free data before the job is planned (``sandbox.tuning``)
AUTO_FIELDS = ("training.lr", "training.epochs", "training.batch_size", "privacy.max_grad_norm")


def auto_number(
    d: Mapping[str, Any],
    section: str,
    key: str,
    *,
    missing_is_auto: bool,
    default: float | None = None,
    **bounds: Any,
) -> Any:
    """``number``, or None for a value the zone is to choose: ``"auto"``, or a field left
    out where ``missing_is_auto`` (a DP-SGD spec the user writes). ``default`` applies to a
    missing field otherwise (a stored spec; a federated one)."""
    v = d.get(key)
    if v == AUTO or (key not in d and missing_is_auto):
        return None
    if isinstance(v, str):
        raise SpecError(
            f"{section}.{key}", f'must be a number or "{AUTO}"', f'write {key} = <number> or "auto"'
        )
    return number(d, section, key, default=default, **bounds)


def resolved(value: _T | None, field: str) -> _T:
    """``value`` of a spec that must be resolved here (planned, trained, carded); an
    ``"auto"`` field still unresolved is refused, never guessed."""
    if value is None:
        raise SpecError(
            field,
            'is "auto" and was not resolved before the job was planned',
            "submit the spec (admission resolves it) or write the value `sandbox tune` chose",
        )
    return value


def hyperparameters(
    p: Mapping[str, Any],
    t: Mapping[str, Any],
    *,
    auto: bool,
    federated: bool,
    lr_default: float,
) -> dict[str, Any]:
    """``[privacy] max_grad_norm`` and ``[training] epochs, batch_size, lr``, each a number
    or None (``"auto"``; left out where ``auto``: a DP-SGD spec the user writes). A stored
    spec (``auto`` false) gets the old defaults for a missing one; a federated spec may not
    say ``"auto"`` (the search covers DP-SGD jobs)."""
    if federated:
        for field in AUTO_FIELDS:
            section, key = field.split(".")
            if (p if section == "privacy" else t).get(key) == AUTO:
                raise SpecError(field, f'"{AUTO}" covers DP-SGD jobs', "write a value here")

    def read(d: Mapping[str, Any], section: str, key: str, **kw: Any) -> Any:
        return auto_number(d, section, key, missing_is_auto=auto, **kw)

    c = read(p, "privacy", "max_grad_norm", default=1.0, lo=0, lo_open=True, hi=1e4)
    epochs = read(
        t, "training", "epochs", default=1 if federated else None, lo=1, hi=1000, integer=True
    )
    batch = read(t, "training", "batch_size", lo=1, hi=1_000_000, integer=True)
    lr = read(t, "training", "lr", default=lr_default, lo=0, lo_open=True, hi=100)
    return {
        "max_grad_norm": None if c is None else float(c),
        "epochs": None if epochs is None else int(epochs),
        "batch_size": None if batch is None else int(batch),
        "lr": None if lr is None else float(lr),
    }
