"""The ``sandbox`` command: a thin layer over ``sandbox.service.Service``.

One error handler for every command: a user error prints one line (or a JSON object with
``--json``) and exits 2; a backend error says whether a retry can help and exits 3. Nothing
here decides access.
"""

from __future__ import annotations

import json
import sys

import typer

from foundation.errors import BackendError, ZoneError
from sandbox.cli import (
    access,
    audit,
    budget,
    common,
    datasets,
    demo,
    jobs,
    models,
    notebook,
    projects,
    query,
    serve,
    synth,
    tune,
    users,
    zone_cmds,
)

app = typer.Typer(
    name="sandbox",
    help="The safe zone: train on sensitive data without seeing a row of it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
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


zone_cmds.register(app)
serve.register(app)
app.add_typer(users.app, name="user")
app.add_typer(datasets.app, name="dataset")
app.add_typer(projects.app, name="project")
app.add_typer(access.app, name="access")
jobs.register(app)
jobs.register_quote(app)
tune.register(app)
app.add_typer(jobs.app, name="jobs")
app.add_typer(models.app, name="model")
budget.register(app)
app.add_typer(audit.app, name="audit")
app.add_typer(synth.app, name="synth")
app.add_typer(query.app, name="query")
demo.register(app)
notebook.register(app)


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
        import click

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
