"""The ``sandbox`` command: a thin layer over ``sandbox.service.Service``.

One error handler for every command: a user error prints one line (or a JSON object with
``--json``) and exits 2; a backend error says whether a retry can help and exits 3. Nothing
here decides access.
"""

from __future__ import annotations

import importlib
import json
import sys
from functools import cache

import click
import typer
import typer.main
from typer.core import TyperGroup

from foundation.errors import BackendError, ZoneError
from sandbox.cli import common

#: Every top-level command, in the order ``sandbox --help`` lists them: its name -> (its
#: module in ``sandbox.cli``, how it joins the root: ``"app"``, the module's Typer group, or the
#: name of the module's function that registers it on a Typer). A call imports and builds only
#: the command it runs (typer would otherwise convert all of them, ~50 commands' signatures,
#: on every call: ~40 ms of each ~0.4 s call); ``--help`` builds them all.
#: ``tests/sandbox/test_cli_commands.py`` checks this table against every module's commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("zone_cmds", "register"),
    "upgrade": ("zone_cmds", "register"),
    "serve": ("serve", "register"),
    "submit": ("jobs", "register"),
    "quote": ("jobs", "register_quote"),
    "tune": ("tune", "register"),
    "budget": ("budget", "register"),
    "demo": ("demo", "register"),
    "notebook": ("notebook", "register"),
    "user": ("users", "app"),
    "dataset": ("datasets", "app"),
    "project": ("projects", "app"),
    "access": ("access", "app"),
    "jobs": ("jobs", "app"),
    "model": ("models", "app"),
    "audit": ("audit", "app"),
    "synth": ("synth", "app"),
    "query": ("query", "app"),
    "kernel": ("notebook", "register"),
}


@cache
def command(name: str) -> click.Command:
    """The click command ``name`` (a key of ``COMMANDS``), built from its module alone."""
    module_name, joins = COMMANDS[name]
    module = importlib.import_module(f"sandbox.cli.{module_name}")
    scratch = typer.Typer()
    if joins == "app":
        scratch.add_typer(module.app, name=name)
    else:
        getattr(module, joins)(scratch)
    return typer.main.get_group(scratch).commands[name]


class _LazyRoot(TyperGroup):
    """The root group: lists ``COMMANDS`` and builds one of them when it is called."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return command(cmd_name) if cmd_name in COMMANDS else None


app = typer.Typer(
    name="sandbox",
    help="The safe zone: train on sensitive data without seeing a row of it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_LazyRoot,
)


@app.callback()
def _root(
    server: str | None = typer.Option(
        None, "--server", help="a served zone's URL (else $SANDBOX_SERVER; else embedded)"
    ),
    ca: str | None = typer.Option(
        None, "--ca", help="CA certificate (PEM) the zone's HTTPS must chain to (else $SANDBOX_CA)"
    ),
    otp: str | None = typer.Option(
        None, "--otp", help="your one-time code, if you have a second factor (else $SANDBOX_OTP)"
    ),
) -> None:
    common.SERVER_OPTION.update(server=server, ca=ca, otp=otp)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    try:
        # With standalone_mode=False, Click *returns* the code of a `raise typer.Exit(n)`
        # (and a command's own return value) instead of raising it: pass that code on.
        rv = app(args=args, standalone_mode=False)
    except ZoneError as exc:
        code = 3 if isinstance(exc, BackendError) else 2
        if as_json:
            out: dict[str, object] = {"error": exc.kind, "message": str(exc)}
            if isinstance(exc, BackendError):
                out["retryable"] = exc.retryable
            typer.echo(json.dumps(out))
        else:
            hint = ""
            if isinstance(exc, BackendError):
                hint = " (a retry may help)" if exc.retryable else " (a retry will not help)"
            typer.echo(f"error: {exc}{hint}", err=True)
        return code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        return 1
    except Exception as exc:  # click usage errors and the like
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        raise
    # an int is an exit code (typer.Exit); anything else a command returned means success
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
