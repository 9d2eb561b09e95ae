"""privacy.synth has no import cycle, and every method is found through the registry.

The import graph is read from the source with ``ast`` (every ``import`` and ``from ... import``,
function-local ones included) plus the registry's lazy ``"module:function"`` targets, so a
cycle hidden behind a lazy import or an ``importlib`` lookup is caught too."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

import privacy.synth
from connectors.schema import SchemaContract
from foundation.errors import IntegrityError, SpecError
from privacy.accountant import GaussianStep
from privacy.synth import base, registry
from privacy.synth.codec import DPFit, SynthMethod, SynthResult

PACKAGE = "privacy.synth"
SYNTH_DIR = Path(privacy.synth.__file__).parent
CODEC = f"{PACKAGE}.codec"
ENGINES = {f"{PACKAGE}.marginals", f"{PACKAGE}.copula", f"{PACKAGE}.baselines"}


# -- the import graph -------------------------------------------------------------------------
def _module_name(path: Path, package: str) -> str:
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def _imports(path: Path, package: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere (module level, inside functions,
    under ``if``), resolving relative imports and ``from package import submodule``."""
    name = _module_name(path, package)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # ``import a.b.c`` binds the longest known module it names
                for end in range(len(parts), 0, -1):
                    if ".".join(parts[:end]) in known:
                        out.add(".".join(parts[:end]))
                        break
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:  # from package import submodule
                    out.add(f"{source}.{alias.name}")
                elif source in known:
                    out.add(source)
    out.discard(name)
    return out


def import_graph(directory: Path, package: str) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` for every ``*.py`` in ``directory``."""
    files = sorted(directory.glob("*.py"))
    known = {_module_name(f, package) for f in files}
    return {_module_name(f, package): _imports(f, package, known) for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        return list(exc.args[1])
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(SYNTH_DIR, PACKAGE)


def test_the_checker_sees_a_cycle_behind_a_function_local_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    found = import_graph(pkg, "pkg")
    assert found == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert set(_cycle(found) or ()) == {"pkg.a", "pkg.b"}


def test_privacy_synth_has_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert {CODEC, f"{PACKAGE}.registry", f"{PACKAGE}.base", *ENGINES} <= set(graph)
    # the registry reaches its engines lazily (importlib): those are edges too
    lazy = {m: set(edges) for m, edges in graph.items()}
    lazy[f"{PACKAGE}.registry"] |= {e.module for e in registry.REGISTRY.values()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or ())}"
    assert _cycle(lazy) is None, f"import cycle via the registry: {' -> '.join(_cycle(lazy) or ())}"


def test_engines_import_only_the_codec(graph: dict[str, set[str]]) -> None:
    assert {e.module for e in registry.REGISTRY.values()} == ENGINES
    for module in sorted(ENGINES):
        assert graph[module] == {CODEC}, f"{module} imports {sorted(graph[module])}"
    assert graph[CODEC] == set(), "the codec imports nothing else of privacy.synth"
    assert graph[f"{PACKAGE}.registry"] == {CODEC}


def test_only_the_registry_reaches_an_engine(graph: dict[str, set[str]]) -> None:
    # base.fit_and_sample looks the method up; no module imports an engine by name
    importers = {m for m, edges in graph.items() if edges & ENGINES}
    assert importers == set(), f"{sorted(importers)} import an engine directly"


def test_importing_privacy_synth_does_not_import_sdv_or_an_engine() -> None:
    code = (
        "import sys, privacy.synth\n"
        "from privacy.synth import is_dp\n"
        "assert is_dp('mst') and not is_dp('ctgan')\n"
        "loaded = sorted(m for m in sys.modules if m == 'sdv' or m.startswith('sdv.')\n"
        f"    or m in {sorted(ENGINES)!r})\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# -- the registry -----------------------------------------------------------------------------
#: Which methods are DP. Written out here, not read from the registry, so that a registry edit
#: that flips a method's DP-ness (and with it whether its output is charged) fails a test.
EXPECTED_DP = {
    SynthMethod.MST: True,
    SynthMethod.DP_COPULA: True,
    SynthMethod.GAUSSIAN_COPULA: False,
    SynthMethod.CTGAN: False,
    SynthMethod.TVAE: False,
}


def test_every_method_has_an_entry_and_every_entry_a_method() -> None:
    assert set(registry.REGISTRY) == set(SynthMethod) == set(EXPECTED_DP)
    assert all(type(key) is SynthMethod for key in registry.REGISTRY)
    for method, dp in EXPECTED_DP.items():
        assert registry.is_dp(method) is dp and registry.is_dp(method.value) is dp
        assert privacy.synth.is_dp(method) is dp


@pytest.mark.parametrize("method", list(SynthMethod))
def test_every_entry_loads_a_function_of_its_module(method: SynthMethod) -> None:
    entry = registry.engine(method)
    fn = registry.load(method)
    assert callable(fn) and fn.__module__ == entry.module and fn.__name__ == entry.function


def test_an_unknown_method_is_refused_by_name() -> None:
    for call in (registry.engine, registry.is_dp, registry.load):
        with pytest.raises(SpecError) as info:
            call("dp-gan")
        assert info.value.field == "method"


@pytest.mark.parametrize(
    "target", ["os:system", "privacy.synth.marginals", "privacy.synthx.m:f", "privacy.synth.m:1f"]
)
def test_an_entry_outside_the_package_is_refused(target: str) -> None:
    with pytest.raises(ValueError):
        registry.Engine(True, target)


# -- fit_and_sample holds the engines to their entries ----------------------------------------
CONTRACT = """
[columns.pid]
type = "string"
role = "identifier"

[columns.kind]
type = "string"
role = "feature"
categories = ["a", "b"]
"""


STEP = GaussianStep(1.0, 1.0, 1)


def _table() -> pa.Table:
    return pa.table({"pid": ["p1", "p2", "p3"], "kind": ["a", "b", "a"]})


def _fake(is_dp: bool, fn: object) -> SimpleNamespace:
    return SimpleNamespace(is_dp=is_dp, load=lambda: fn)


def test_a_dp_engine_that_charges_nothing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fit(codes: np.ndarray, codec: object, **_: object) -> DPFit:
        return DPFit((), (), lambda rows, rng: np.zeros((rows, 1), dtype=np.int64))

    monkeypatch.setattr(base, "engine", lambda method: _fake(True, fit))
    with pytest.raises(IntegrityError):
        base.fit_and_sample(
            "mst",
            _table(),
            SchemaContract.from_toml_text(CONTRACT),
            epsilon=1.0,
            delta=1e-6,
            rows=5,
            seed=0,
            noise_seed=0,
        )


@pytest.mark.parametrize("returned", ["mst", "ctgan"])
def test_a_baseline_must_return_its_own_non_dp_result(
    returned: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(method: SynthMethod, table: pa.Table, contract: object, **_: object) -> SynthResult:
        # a DP-looking result, or a non-DP one labelled with another method
        dp = returned == "mst"
        return SynthResult(
            table=table,
            method=returned,
            epsilon=1.0 if dp else None,
            delta=1e-6 if dp else None,
            steps=(STEP,) if dp else (),
            fit_seconds=0.0,
            sample_seconds=0.0,
        )

    monkeypatch.setattr(base, "engine", lambda method: _fake(False, run))
    with pytest.raises(IntegrityError):
        base.fit_and_sample(
            "gaussian-copula",
            _table(),
            SchemaContract.from_toml_text(CONTRACT),
            epsilon=None,
            delta=None,
            rows=5,
            seed=0,
            noise_seed=None,
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"epsilon": 1.0, "delta": None, "steps": ()},
        {"epsilon": None, "delta": None, "steps": (STEP,)},
        {"epsilon": 1.0, "delta": 1e-6, "steps": ()},
        {"epsilon": None, "delta": 1e-6, "steps": (STEP,)},
    ],
)
def test_a_result_is_dp_or_not_never_half(fields: dict) -> None:
    with pytest.raises(SpecError):
        SynthResult(table=_table(), method="mst", fit_seconds=0.0, sample_seconds=0.0, **fields)
