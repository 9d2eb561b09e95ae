"""The safe zone's Jupyter kernel: IPython with ``zone`` preloaded, and no other way to data.

``python -m sandbox.kernel -f CONNECTION_FILE`` (what the kernelspec "Safe zone (Python)" runs)
starts an IPython kernel whose namespace holds ``zone`` (a ``sandbox.notebook_zone.Zone`` on
``$SANDBOX_SERVER`` with ``$SANDBOX_TOKEN``), pandas as ``pd``, pyplot as ``plt``, and
matplotlib's inline backend.

The boundary is the OS account (``docs/served-zone.md``): the kernel runs as the analyst, who
cannot open the zone folder. Inside the kernel, as defence in depth, an import guard refuses
the modules that read rows, keys or the ledger: every module of the zone's own packages but the
thin client (the same set the CLI's thin client must not load, ``tests/sandbox/test_served.py``),
and the engines behind them (Ray, torch, Opacus, Flower, SDV, SQLAlchemy, OpenDP,
cryptography). A guard in the same process is no wall (a cell can load a file by its path);
what it buys is that the easy and the accidental ways in fail with a message that says where
data is: in ``zone``.

``install_kernelspec`` registers the kernelspec (``sandbox kernel install``). Its kernel.json
carries no secret: the token comes from the environment the notebook server was started in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KERNEL_NAME = "safe-zone"
DISPLAY_NAME = "Safe zone (Python)"
REFUSAL = (
    "the safe zone's kernel reaches data only through `zone` (DP queries, synthetic data, jobs)"
)

#: the zone's own packages: of these, only the thin client may be imported in the kernel
OWN_PACKAGES = ("sandbox", "connectors", "privacy", "training", "policies", "foundation")
#: the thin client and what it stands on (``sandbox.client``'s imports)
THIN_CLIENT = frozenset(
    {
        "sandbox",
        "sandbox.client",
        "sandbox.api",
        "sandbox.api.calls",
        "sandbox.api.wire",
        "sandbox.notebook_zone",
        "sandbox.notebook_frames",
        "sandbox.kernel",
        "policies",
        "policies.roles",
        "foundation",
        "foundation.errors",
    }
)
#: engines that read rows, keys or the ledger for the zone (whole packages)
ENGINES = (
    "ray",
    "torch",
    "opacus",
    "flwr",
    "sdv",
    "rdt",
    "sdmetrics",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "psycopg2",
    "opendp",
    "cryptography",
)


def refused(name: str) -> bool:
    """Whether the kernel refuses to import module ``name``."""
    top = name.partition(".")[0]
    if top in OWN_PACKAGES:
        return name not in THIN_CLIENT
    return top in ENGINES


class ZoneImportRefused(ImportError):
    """A module the safe zone's kernel does not load. An ``ImportError`` (a library probing
    for an optional engine takes it as absent) but not a ``ModuleNotFoundError``: Python's
    ``from sandbox import service`` swallows that one and says only "cannot import name"."""


class ImportGuard(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path``: refuses the modules of ``refused``, finds nothing else."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if refused(fullname):
            raise ZoneImportRefused(f"{fullname} is not available here: {REFUSAL}", name=fullname)
        return None


def install_guard() -> ImportGuard:
    """Put the guard first on ``sys.meta_path``. A refused module that is loaded already
    would bypass it (imports of loaded modules skip the finders), so that is an error."""
    loaded = sorted(m for m in sys.modules if refused(m))
    if loaded:
        raise RuntimeError(f"refused modules were loaded before the guard: {', '.join(loaded)}")
    for finder in sys.meta_path:
        if isinstance(finder, ImportGuard):
            return finder
    guard = ImportGuard()
    sys.meta_path.insert(0, guard)
    return guard


class NoZone:
    """What ``zone`` is when the kernel has no zone to talk to: every use says how to fix it."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        from foundation.errors import SpecError

        raise SpecError("zone", self._reason, HOW_TO_CONNECT)

    def __repr__(self) -> str:
        return f"<no safe zone: {self._reason}. {HOW_TO_CONNECT}>"


HOW_TO_CONNECT = (
    "export SANDBOX_SERVER=https://<zone>:8750 and SANDBOX_TOKEN=<your token> (and "
    "SANDBOX_PROJECT=<project>) in the shell that starts the notebook server, then restart "
    "the kernel; or in a cell: from sandbox.notebook_zone import Zone; "
    "zone = Zone(server=..., token=...)"
)


def make_zone(env: dict[str, str]) -> Any:
    """The kernel's ``zone``: a ``Zone`` from the environment, or a ``NoZone`` saying why not."""
    from foundation.errors import ZoneError

    if not env.get("SANDBOX_SERVER"):
        return NoZone("SANDBOX_SERVER is not set")
    try:
        from sandbox.notebook_zone import Zone

        return Zone()
    except ZoneError as exc:
        return NoZone(str(exc))
    except ImportError as exc:
        # the thin client grew an import the guard refuses: say so, keep the kernel up
        return NoZone(f"the zone's client could not be loaded here ({exc})")


def startup_namespace(env: dict[str, str]) -> dict[str, Any]:
    """What a new kernel's namespace holds."""
    import matplotlib.pyplot as plt
    import pandas as pd

    return {"zone": make_zone(env), "pd": pd, "plt": plt}


def main(argv: list[str] | None = None) -> None:
    import os

    install_guard()  # before IPython and everything it imports
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(argv)
    shell = app.shell
    assert shell is not None  # initialize() made it
    # the inline backend first, so that figures made by zone.plot show under their cell
    shell.enable_matplotlib("inline")
    shell.push(startup_namespace(dict(os.environ)))
    app.start()


# -- the kernelspec --------------------------------------------------------------------------


def only_kernel_manager_class() -> type:
    """A ``KernelSpecManager`` that lists *and starts* only its allowed kernelspecs (for
    ``sandbox notebook``). jupyter_client's ``allowed_kernelspecs`` filters the list alone:
    a client asking for ``python3`` by name would still get the native kernel, unguarded."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    class OnlyAllowedKernelSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> Any:
            if kernel_name not in self.allowed_kernelspecs:
                raise NoSuchKernel(kernel_name)
            return super().get_kernel_spec(kernel_name)

    OnlyAllowedKernelSpecs.__module__ = __name__
    OnlyAllowedKernelSpecs.__qualname__ = "OnlyAllowedKernelSpecs"
    return OnlyAllowedKernelSpecs


def __getattr__(name: str) -> Any:
    # the class is made on first use, so that the kernel itself need not import jupyter_client
    # for it: ``--ServerApp.kernel_spec_manager_class=sandbox.kernel.OnlyAllowedKernelSpecs``
    if name == "OnlyAllowedKernelSpecs":
        cls = only_kernel_manager_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def kernel_json(python: str | None = None) -> dict[str, Any]:
    """The kernelspec: this interpreter runs ``sandbox.kernel``; no environment of its own
    (the token and the URL come from the notebook server's environment, never a file)."""
    return {
        "argv": [python or sys.executable, "-m", "sandbox.kernel", "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": False},
    }


def install_kernelspec(
    *, user: bool = False, prefix: str | Path | None = None, name: str = KERNEL_NAME
) -> str:
    """Install the kernelspec for the current user, under ``prefix`` (``PREFIX/share/jupyter/
    kernels/NAME``), or by default in this environment's own prefix; its folder."""
    from jupyter_client.kernelspec import KernelSpecManager

    if not user and prefix is None:
        prefix = sys.prefix  # the environment's own Jupyter, which needs no root
    with tempfile.TemporaryDirectory(prefix="sz-kernelspec-") as tmp:
        # the spec is copied with its folder's mode: a temp folder's 0700 would hide it from
        # every other account (a kernelspec holds nothing secret)
        Path(tmp).chmod(0o755)
        spec = Path(tmp) / "kernel.json"
        spec.write_text(json.dumps(kernel_json(), indent=1) + "\n")
        spec.chmod(0o644)
        return str(
            KernelSpecManager().install_kernel_spec(
                tmp, name, user=user, prefix=None if prefix is None else str(prefix)
            )
        )


if __name__ == "__main__":
    main()
