"""Which engine runs each synthesis method, looked up by name.

In the shape of Opacus' accountant registry (``opacus.accountants.registry``: a mapping from
a mechanism's name to its implementation): :data:`REGISTRY` maps every
:class:`~privacy.synth.codec.SynthMethod` to an :class:`Engine`, which says whether the method
is differentially private and where its implementation lives, as ``"module:function"``.

The implementation is imported only when the method runs (:func:`load`, through
:mod:`importlib`), so SDV, behind the baselines, is imported only when a baseline runs. The
imports form no cycle: :mod:`privacy.synth.base` imports this module and the codec, this module
imports only the codec (and the engines lazily), and the engines import only the codec.

An engine has one of two shapes, by its entry's ``is_dp``:

* DP: ``fit(codes, codec, *, epsilon, delta, rng) -> DPFit`` on the codec's codes (one row
  per person); :func:`~privacy.synth.base.fit_and_sample` checks the charged steps against
  the requested epsilon, then samples and decodes.
* not DP: ``fit_and_sample(method, table, contract, *, rows, seed) -> SynthResult`` on the
  governed table; the result carries no epsilon, delta or steps.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from privacy.synth.codec import SynthMethod, parse_method

#: Engines live in this package; an entry pointing elsewhere is refused.
PACKAGE = "privacy.synth"


@dataclass(frozen=True)
class Engine:
    """One registry entry: whether the method is DP, and its implementation's
    ``"module:function"`` (a module of :data:`PACKAGE`), imported on first use."""

    is_dp: bool
    target: str

    def __post_init__(self) -> None:
        module, sep, function = self.target.partition(":")
        if (
            not sep
            or not module.startswith(PACKAGE + ".")
            or not function.isidentifier()
            or not all(part.isidentifier() for part in module.split("."))
        ):
            raise ValueError(f"engine target {self.target!r} is not '{PACKAGE}.<module>:<name>'")

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def function(self) -> str:
        return self.target.partition(":")[2]

    def load(self) -> Callable[..., Any]:
        """The implementation (imports its module on first use)."""
        return getattr(importlib.import_module(self.module), self.function)


#: Every synthesis method and its engine.
REGISTRY: Mapping[SynthMethod, Engine] = MappingProxyType(
    {
        SynthMethod.MST: Engine(True, "privacy.synth.marginals:fit_mst"),
        SynthMethod.DP_COPULA: Engine(True, "privacy.synth.copula:fit_dp_copula"),
        SynthMethod.GAUSSIAN_COPULA: Engine(False, "privacy.synth.baselines:fit_and_sample_sdv"),
        SynthMethod.CTGAN: Engine(False, "privacy.synth.baselines:fit_and_sample_sdv"),
        SynthMethod.TVAE: Engine(False, "privacy.synth.baselines:fit_and_sample_sdv"),
    }
)


def engine(method: SynthMethod | str) -> Engine:
    """``method``'s registry entry; ``SpecError`` listing the known methods otherwise."""
    return REGISTRY[parse_method(method)]


def is_dp(method: SynthMethod | str) -> bool:
    """Whether ``method`` is differentially private (its output may be released once charged)."""
    return engine(method).is_dp


def load(method: SynthMethod | str) -> Callable[..., Any]:
    """``method``'s implementation, imported now if it was not yet."""
    return engine(method).load()
