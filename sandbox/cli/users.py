"""``sandbox user``: identities and their tokens (operator)."""

from __future__ import annotations

from typing import Annotated

import typer

from sandbox.cli.common import JsonOpt, TokenOpt, ZoneOpt, console, emit, session, show_table

app = typer.Typer(help="Users and tokens.", no_args_is_help=True)

ExpiresOpt = Annotated[
    int | None,
    typer.Option("--expires-in", help="days the token lives (else the zone's [login] token_days)"),
]


@app.command("add")
def add(
    name: str,
    role: Annotated[str, typer.Option("--role", help="steward | researcher | analyst | operator")],
    expires_in: ExpiresOpt = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a user; prints their token once (only a hash is stored)."""
    with session(zone, token) as s:
        user, new_token = s.service.add_user(s.user, name, role, expires_in=expires_in)
    out = {"user": user.to_dict(), "token": new_token}
    emit(
        out,
        as_json,
        lambda o: console.print(
            f"user {name} ({role}) added; token (shown once): [bold]{new_token}[/bold]"
        ),
    )


@app.command("list")
def list_(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List users (never their tokens)."""
    with session(zone, token) as s:
        users = s.service.list_users(s.user)
    emit(
        {"users": users},
        as_json,
        lambda o: show_table(
            [u.to_dict() for u in users], ["name", "role", "created_at", "revoked_at"]
        ),
    )


@app.command("revoke")
def revoke(
    name: str, zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Revoke a user's token."""
    with session(zone, token) as s:
        s.service.revoke_user(s.user, name)
    emit({"revoked": name}, as_json, lambda o: console.print(f"user {name} revoked"))


@app.command("reissue")
def reissue(
    name: str,
    expires_in: ExpiresOpt = None,
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a user a new token (operators); prints it once. The old token stops working, a
    revoked user is active again, and their second factor is cleared (they enrol again)."""
    with session(zone, token) as s:
        out = s.service.reissue_token(s.user, name, expires_in=expires_in)
    again = " (reactivated: the user was revoked)" if out["reactivated"] else ""
    emit(
        out,
        as_json,
        lambda o: console.print(
            f"user {name}: new token (shown once): [bold]{o['token']}[/bold];"
            f" the old one no longer works{again}"
        ),
    )


@app.command("totp-enrol")
def totp_enrol(zone: ZoneOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Give yourself a second factor: prints its secret and otpauth:// URI once (add it to an
    authenticator app), then confirm with `sandbox user totp-confirm CODE`."""
    with session(zone, token, enrolling=True) as s:
        out = s.service.totp_enrol(s.user)
    emit(
        out,
        as_json,
        lambda o: console.print(
            f"secret (shown once): [bold]{o['secret']}[/bold]\nURI: {o['uri']}\n"
            "add it to your authenticator app, then run `sandbox user totp-confirm CODE` "
            "with the code it shows"
        ),
    )


@app.command("totp-confirm")
def totp_confirm(
    code: Annotated[str, typer.Argument(help="the 6 digits your authenticator shows now")],
    zone: ZoneOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Confirm your second factor with its first code; from then on every call needs a code
    (SANDBOX_OTP or --otp)."""
    with session(zone, token, enrolling=True) as s:
        out = s.service.totp_confirm(s.user, code)
    emit(
        out,
        as_json,
        lambda o: console.print(
            "second factor confirmed: give a fresh code with SANDBOX_OTP or --otp from now on"
        ),
    )
