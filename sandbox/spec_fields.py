"""The field readers every spec parser shares (``sandbox.jobspec``): each refusal is a
``SpecError`` naming the field (``privacy.epsilon``) and the fix, and never echoes a value
beyond the number's own kind."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from foundation.errors import SpecError


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
