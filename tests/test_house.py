"""The shape of the house (docs/contracts.md): no import circle anywhere in the product, and
no module so large that its name can no longer say what it holds."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("foundation", "connectors", "privacy", "policies", "training", "sandbox")
#: the size a module may reach before it is split ("~500 lines" with a little slack)
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports, counting imports inside functions too."""
    mods = _modules()

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_no_import_circle_in_the_product() -> None:
    assert cycles(import_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_no_module_outgrows_its_name() -> None:
    big = {
        str(path.relative_to(ROOT)): n
        for path in _modules().values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert big == {}


def _probe(code: str, env: dict[str, str] | None = None) -> str:
    """What ``code`` prints, run by a fresh interpreter from the repository's root."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout


def test_importing_ray_compiles_no_url_grammar() -> None:
    """Every CLI submit, job worker and Ray agent imports Ray; with jsonschema 4.24+ and
    ``rfc3987-syntax`` installed that import compiled 39 grammars (a second of CPU per process,
    docs/engines.md "Ray 2.55"). constraints.txt holds jsonschema below it: a bump that brings
    the grammar back fails here."""
    probe = (
        "import sys, ray; print(sorted(m for m in ('rfc3987_syntax', 'lark') if m in sys.modules))"
    )
    out = _probe(probe)
    assert out.strip() == "[]", out


def test_paths_that_need_no_torch_import_none() -> None:
    """Torch costs ~1.5 s of CPU per process. The CLI's every command, the DP queries and
    synthesis's table reads (``connectors.tables``), and scoring a released model
    (``training.predict``: the network runs in NumPy) never import it; only training does."""
    probe = (
        "import sys\n"
        "import sandbox.cli.main, sandbox.service, connectors.tables, privacy.dpquery.engine\n"
        "import sandbox.synth_worker, training.predict\n"
        "print('torch' in sys.modules)"
    )
    out = _probe(probe)
    assert out.strip() == "False", out


def test_commands_that_only_read_state_import_no_numpy_nor_arrow(tmp_path: Path) -> None:
    """NumPy and Arrow were ~0.2 s of a read command's ~0.6 s of CPU. Reading the zone's
    state (jobs, audit chain, users, datasets, projects, grants) needs neither: the data plane
    loads where a call first needs it (``sandbox.service``'s docstring)."""
    sandbox = Path(sys.executable).parent / "sandbox"
    env = {k: v for k, v in os.environ.items() if k not in ("SANDBOX_TOKEN", "RAY_ADDRESS")}
    env["SANDBOX_ZONE"] = str(tmp_path / "zone")
    made = subprocess.run(
        [str(sandbox), "init", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    env["SANDBOX_TOKEN"] = json.loads(made.stdout)["token"]
    probe = (
        "import contextlib, io, json, sys\n"
        "from sandbox.cli.main import main\n"
        "codes = []\n"
        "for argv in (['jobs', 'list'], ['audit', 'verify'], ['user', 'list'],\n"
        "             ['dataset', 'list'], ['project', 'list'], ['access', 'list']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        codes.append(main([*argv, '--json']))\n"
        "loaded = [m for m in ('numpy', 'pyarrow', 'torch') if m in sys.modules]\n"
        "cli = sorted(m for m in sys.modules if m.startswith('sandbox.cli.'))\n"
        "print(json.dumps({'codes': codes, 'loaded': loaded, 'cli': cli}))\n"
    )
    out = _probe(probe, env)
    # and each call built only its own command: the six commands' modules and what every
    # command shares, none of the other command modules (``sandbox.cli.main.COMMANDS``)
    cli = ["access", "audit", "common", "datasets", "jobs", "main", "projects", "users"]
    assert json.loads(out) == {
        "codes": [0] * 6,
        "loaded": [],
        "cli": [f"sandbox.cli.{m}" for m in cli],
    }, out
