"""Keep the engines (Ray, Flower, SDV) off the network, inside the zone, and out of reach of
the caller's shell.

It lives in ``foundation`` (the bottom of the import graph) because every package starts an
engine: privacy (SDV), training (Flower, Ray) and sandbox (Ray).

``configure_engine_env`` is called by every code path that starts an engine (the service,
the Ray worker, the demo, the tests), not only by the Makefile, so no entry point can forget
it. Values already set by the operator win (``setdefault``), except the ones that would open
the zone to the network.

``engine_environ`` / ``sanitise_environ``: the environment of the processes that run jobs.
A worker must not run code the caller's shell put in its way: ``PYTHONPATH`` (a
``sitecustomize.py`` on it is imported by every Python that starts), ``PYTHONSTARTUP``,
``PYTHONHOME``, ``PYTHONUSERBASE`` (and the user site, off with ``PYTHONNOUSERSITE``),
``PYTHONPYCACHEPREFIX`` (bytecode read from elsewhere), ``PYTHONWARNINGS`` and
``PYTHONBREAKPOINT`` (both import a module named in them), ``LD_PRELOAD`` and the rest of the
dynamic loader's variables, and Ray's own hooks and address. Ray's
``runtime_env={"env_vars": ...}`` only *adds* variables, and the processes of a local Ray
inherit the environment of the process that starts it; so the service cleans its own
environment before it starts Ray (``sandbox.ray_backend``), and the federated child gets a
clean one (``training.federated.simulation``). ``PYTHONPATH`` is then exactly the product's
own import roots (:func:`product_import_roots`). In served mode the service is the only
process that starts Ray.

``ray_temp_dir``: Ray's session folder (its sockets, logs and spilled objects) is private:
inside the zone (``<zone>/ray``, mode 0700) when that path is short enough for Ray's unix
sockets, else a fresh ``mkdtemp`` folder (random name, mode 0700) recorded in the zone so
every process of the zone finds the same one.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

# forced: a user's environment must not switch these back on
_FORCED = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # without it Ray listens on every address and on a non-loopback node IP
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # keep accelerator visibility as the operator set it (and silence Ray's FutureWarning)
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}

#: variables a job's processes never inherit: each makes Python (or the loader, or Ray) run
#: code or read bytecode from a place the caller chose
UNSAFE_ENV = frozenset(
    {
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONHOME",
        "PYTHONUSERBASE",
        "PYTHONPYCACHEPREFIX",
        "PYTHONWARNINGS",
        "PYTHONBREAKPOINT",
        "PYTHONINSPECT",
        "PYTHONEXECUTABLE",
        "PYTHONPLATLIBDIR",
        "PYTHONCASEOK",
        # Ray: a module path it imports and calls, and the cluster to join (the service's
        # settings choose the cluster, never the caller's shell)
        "RAY_RUNTIME_ENV_HOOK",
        "RAY_START_HOOK",
        "RAY_JOB_SUBMIT_HOOK",
        "RAY_ADDRESS",
    }
)
#: every variable of the dynamic loader (LD_PRELOAD, LD_AUDIT, LD_LIBRARY_PATH, ...)
UNSAFE_PREFIXES = ("LD_", "DYLD_")

#: the product's packages: their folders (and the interpreter's site-packages) are the only
#: import roots a job's process gets
PRODUCT_PACKAGES = ("sandbox", "training", "privacy", "policies", "connectors", "foundation")

#: Ray's sockets live at ``<temp>/session_<date>_<micro>_<pid>/sockets/<name>`` and a unix
#: socket path holds at most 107 bytes; the part after the temp folder takes up to ~68
MAX_RAY_TEMP_LEN = 38
#: where a zone records the private temp folder its Ray uses when ``<zone>/ray`` is too long
RAY_TEMP_RECORD = Path("engines") / "ray-temp-dir"
#: the folder Ray is given inside the private one (Ray opens its own temp folder to all)
RAY_TEMP_LEAF = "r"


def product_import_roots(extra: Iterable[str | Path] = ()) -> tuple[str, ...]:
    """The folders that hold the product's packages, the interpreter's site-packages, then
    ``extra`` (e.g. the folder of a test's ClientApp factory, named at a boundary)."""
    roots: list[str] = []
    for name in PRODUCT_PACKAGES:
        # find_spec of a top-level name locates the package without importing it
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            roots.append(str(Path(spec.origin).resolve().parent.parent))
        else:
            roots.extend(
                str(Path(p).resolve().parent) for p in spec.submodule_search_locations or ()
            )
    paths = sysconfig.get_paths()
    roots.extend(paths[k] for k in ("purelib", "platlib") if paths.get(k))
    roots.extend(str(Path(p).resolve()) for p in extra)
    return tuple(dict.fromkeys(roots))


def is_unsafe(name: str) -> bool:
    return name in UNSAFE_ENV or name.startswith(UNSAFE_PREFIXES)


def engine_environ(
    environ: Mapping[str, str], *, extra_roots: Iterable[str | Path] = ()
) -> dict[str, str]:
    """A copy of ``environ`` fit for a job's processes: no unsafe variable (see the module
    docstring), ``PYTHONPATH`` = the product's import roots (+ ``extra_roots``), no user
    site-packages."""
    env = {k: v for k, v in environ.items() if not is_unsafe(k)}
    env["PYTHONPATH"] = os.pathsep.join(product_import_roots(extra_roots))
    env["PYTHONNOUSERSITE"] = "1"
    return env


def sanitise_environ(environ: MutableMapping[str, str] | None = None) -> None:
    """Make ``environ`` (default ``os.environ``) :func:`engine_environ`'s, in place: what a
    process must do before it starts engines whose processes inherit its environment."""
    target = os.environ if environ is None else environ
    clean = engine_environ(target)
    for key in [k for k in target if k not in clean]:
        del target[key]
    target.update(clean)


def _ours_without(path: Path, forbidden: int) -> bool:
    """``path`` is a real folder (not a link) of ours whose mode has none of ``forbidden``."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & forbidden


def _private(path: Path) -> bool:
    """Ours, and nobody else may enter or write it."""
    return _ours_without(path, stat.S_IRWXG | stat.S_IRWXO)


def _owned(path: Path) -> bool:
    """Ours, and no one else may write into it."""
    return _ours_without(path, stat.S_IWGRP | stat.S_IWOTH)


def ray_temp_dir(zone_dir: Path) -> Path:
    """The zone's private Ray temp folder (see the module docstring); made if missing.

    Ray makes its temp folder world-writable (mode 0777) when it starts, so the folder it is
    given is ``<private>/r``: the private parent (mode 0700, ours) keeps everyone else out."""
    zone = Path(zone_dir).resolve()
    zone.mkdir(parents=True, exist_ok=True)
    inside = zone / "ray"
    if len(str(inside / RAY_TEMP_LEAF)) <= MAX_RAY_TEMP_LEN and _owned(zone):
        inside.mkdir(mode=0o700, exist_ok=True)
        if _owned(inside):
            inside.chmod(0o700)
            return inside / RAY_TEMP_LEAF
    record = zone / RAY_TEMP_RECORD
    try:
        recorded = Path(record.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and recorded.is_absolute() and _private(recorded):
        return recorded / RAY_TEMP_LEAF
    made = Path(tempfile.mkdtemp(prefix="sz-ray-"))  # random name, mode 0700
    record.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=".ray-temp-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(str(made))
    os.replace(tmp, record)
    return made / RAY_TEMP_LEAF


def configure_engine_env(zone_dir: Path) -> None:
    """Set the engine environment for a process working on ``zone_dir``."""
    for key, value in _FORCED.items():
        os.environ[key] = value
    engines = zone_dir / "engines"
    os.environ.setdefault("FLWR_HOME", str(engines / "flwr"))
    # SDV writes a usage log under XDG_DATA_HOME/sdv
    os.environ.setdefault("XDG_DATA_HOME", str(engines / "xdg"))
    if "RAY_TMPDIR" not in os.environ:
        os.environ["RAY_TMPDIR"] = str(ray_temp_dir(zone_dir))
