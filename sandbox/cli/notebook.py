"""``sandbox kernel install`` and ``sandbox notebook``: the analyst's notebook on a served zone.

``sandbox notebook`` starts JupyterLab on loopback with the safe-zone kernel as its only
kernel (``sandbox.kernel``: ``zone`` preloaded, the zone's row-reading code refused). The lab
gets a fresh random token, printed once in its URL, and no terminals (a terminal would be a
shell beside the kernel). It needs a served zone's URL and a token: the kernels it starts
inherit them from this process's environment, never from a file.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from foundation.errors import SpecError
from sandbox.cli.common import SERVER_OPTION, JsonOpt, console, emit

kernel_app = typer.Typer(help="The safe zone's Jupyter kernel.", no_args_is_help=True)


@kernel_app.command("install")
def install(
    user: Annotated[
        bool, typer.Option("--user", help="for your account only (~/.local/share/jupyter)")
    ] = False,
    prefix: Annotated[
        Path | None,
        typer.Option("--prefix", help="under PREFIX/share/jupyter (default: this environment)"),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="the kernelspec's name")] = "safe-zone",
    as_json: JsonOpt = False,
) -> None:
    """Register the kernelspec "Safe zone (Python)": IPython with `zone` preloaded."""
    from sandbox.kernel import DISPLAY_NAME, install_kernelspec

    if user and prefix is not None:
        raise SpecError("--prefix", "cannot be given with --user", "give one of them")
    where = install_kernelspec(user=user, prefix=prefix, name=name)
    emit(
        {"name": name, "display_name": DISPLAY_NAME, "path": where},
        as_json,
        lambda o: console.print(f'kernel "{o["display_name"]}" ({name}) installed in {where}'),
    )


def _zone_env() -> dict[str, str]:
    """The variables the lab's kernels need, checked before anything starts."""
    from sandbox.client import check_server_url

    server = SERVER_OPTION.get("server") or os.environ.get("SANDBOX_SERVER")
    if not server:
        raise SpecError(
            "SANDBOX_SERVER",
            "is not set: the notebook's kernel would not know where the zone is",
            "export SANDBOX_SERVER=https://<zone>:8750 and SANDBOX_TOKEN=<your token> "
            "(or sandbox --server URL notebook); the notebook never opens a zone folder",
        )
    check_server_url(server)
    token = os.environ.get("SANDBOX_TOKEN")
    if not token:
        raise SpecError(
            "SANDBOX_TOKEN",
            "is not set: the zone would not know who the notebook's kernel acts for",
            "export SANDBOX_TOKEN=<your token> (an operator gives it: sandbox user add)",
        )
    env = {"SANDBOX_SERVER": server, "SANDBOX_TOKEN": token}
    ca = SERVER_OPTION.get("ca") or os.environ.get("SANDBOX_CA")
    if ca:
        env["SANDBOX_CA"] = str(Path(ca).resolve())
    otp = SERVER_OPTION.get("otp") or os.environ.get("SANDBOX_OTP")
    if otp:
        env["SANDBOX_OTP"] = otp
    return env


def lab_argv(port: int, root_dir: Path, open_browser: bool, kernel: str) -> list[str]:
    """JupyterLab on loopback, one kernelspec allowed, no terminals, no native kernel. On the
    command line, which outranks every config file the user's Jupyter may hold."""
    return [
        sys.executable,
        "-m",
        "jupyterlab",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # another port would not be the URL printed
        f"--ServerApp.root_dir={root_dir}",
        f"--ServerApp.open_browser={open_browser}",
        "--ServerApp.terminals_enabled=False",
        # lists and starts this kernelspec only (sandbox.kernel says why the allow-list alone
        # is not enough)
        "--ServerApp.kernel_spec_manager_class=sandbox.kernel.OnlyAllowedKernelSpecs",
        f"--KernelSpecManager.allowed_kernelspecs={kernel}",
        "--KernelSpecManager.ensure_native_kernel=False",
        f"--MappingKernelManager.default_kernel_name={kernel}",
    ]


def register(app: typer.Typer) -> None:
    app.add_typer(kernel_app, name="kernel")

    @app.command("notebook")
    def notebook(
        port: Annotated[int, typer.Option("--port", help="loopback port of the lab")] = 8888,
        notebook_dir: Annotated[
            Path | None, typer.Option("--notebook-dir", help="the lab's folder (default: here)")
        ] = None,
        no_browser: Annotated[
            bool, typer.Option("--no-browser", help="print the URL, open no browser")
        ] = False,
        allow_root: Annotated[
            bool,
            typer.Option("--allow-root", help="run as root anyway (tests, containers)"),
        ] = False,
    ) -> None:
        """JupyterLab on 127.0.0.1 whose only kernel is the safe zone's (needs SANDBOX_SERVER).

        The kernel talks to the served zone at SANDBOX_SERVER with SANDBOX_TOKEN; the lab's URL,
        with a fresh token, is printed once."""
        from sandbox.kernel import KERNEL_NAME, install_kernelspec

        zone_env = _zone_env()
        if os.geteuid() == 0 and not allow_root:
            # root can open the zone folder: its kernel would stand on no OS boundary
            raise SpecError(
                "--allow-root",
                "sandbox notebook runs as root, whose kernel could read any zone folder on "
                "this machine",
                "run it as your own account (or give --allow-root where that is intended)",
            )
        root_dir = (notebook_dir or Path.cwd()).resolve()
        if not root_dir.is_dir():
            raise SpecError("--notebook-dir", f"{root_dir} is not a folder", "give a folder")
        # a private Jupyter data folder holds the only kernelspec the lab may start
        private = Path(tempfile.mkdtemp(prefix="sz-notebook-"))
        try:
            install_kernelspec(prefix=private)
            env: dict[str, Any] = {**os.environ, **zone_env}
            env["JUPYTER_PATH"] = str(private / "share" / "jupyter")
            # the lab's token in the environment, not in argv (other accounts can read argv)
            env["JUPYTER_TOKEN"] = lab_token = secrets.token_urlsafe(32)
            argv = lab_argv(port, root_dir, not no_browser, KERNEL_NAME)
            if allow_root:
                argv.append("--ServerApp.allow_root=True")
            # plain text: a URL is no rich markup ("[::1]"), and the token must print whole
            typer.echo(
                f"the safe-zone kernel talks to {zone_env['SANDBOX_SERVER']}; JupyterLab at\n"
                f"  http://127.0.0.1:{port}/lab?token={lab_token}"
            )
            proc = subprocess.Popen(argv, env=env)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                code = proc.wait()
        finally:
            shutil.rmtree(private, ignore_errors=True)
        raise typer.Exit(code)
