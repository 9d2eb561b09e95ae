"""The HTTP API: one route per ``sandbox.api.calls.Call``, each a thin call into ``Service``.

The route layer authenticates the bearer token (``Service.authenticate``), turns the wire
form of the arguments into the service's types (``sandbox.server.marshal``), calls the
service in a worker thread and sends the result as JSON. It decides nothing: every role,
membership, grant and budget decision, and every audit event, happens in the service, the
same code the embedded CLI calls.

Errors: a ``ZoneError`` becomes its wire form (``foundation.errors.error_to_wire``) with a
status that says which kind it is; anything else is a 500 with no message of its own (a raw
exception text could hold a value), logged by the service.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from foundation.errors import (
    NEEDS_TOKEN,
    AuthError,
    BackendError,
    BudgetExceeded,
    NotFoundError,
    PolicyDenied,
    ZoneError,
    error_to_wire,
)
from sandbox.api.calls import CALLS, Call
from sandbox.api.wire import to_jsonable
from sandbox.server.marshal import call_service

log = logging.getLogger(__name__)

API_VERSION = "1"


def status_of(exc: ZoneError) -> int:
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, PolicyDenied):
        return 401 if NEEDS_TOKEN in exc.missing else 403
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, BudgetExceeded):
        return 409
    if isinstance(exc, BackendError):
        return 503 if exc.retryable else 500
    return 422


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


#: a one-time code (TOTP) from the caller's authenticator, for a user with a second factor
OTP_HEADER = "x-sandbox-otp"
#: the login session a good code opened (``sandbox.service_login``): sent back instead of a code
SESSION_HEADER = "x-sandbox-session"


def _login(service: Any, request: Request, *, enrolling: bool) -> tuple[Any, str | None]:
    return service.login(
        _token(request),
        request.headers.get(OTP_HEADER) or None,
        session=request.headers.get(SESSION_HEADER) or None,
        enrolling=enrolling,
    )


def _with_session(body: Any, opened: str | None) -> JSONResponse:
    headers = {SESSION_HEADER: opened} if opened else None
    return JSONResponse(body, headers=headers)


def create_app(service: Any) -> FastAPI:
    """The API over ``service`` (a ``sandbox.service.Service`` opened by ``sandbox serve``)."""
    app = FastAPI(
        title="The safe zone",
        version=API_VERSION,
        description=(
            "Train on sensitive healthcare data without seeing a row of it. Every call takes "
            "`Authorization: Bearer <token>` (and `X-Sandbox-OTP: <code>` for a user with a "
            "second factor); every call is decided and audited by the zone's "
            "service. Errors are `{error, message, retryable, fields}`."
        ),
    )

    @app.exception_handler(ZoneError)
    async def _zone_error(request: Request, exc: ZoneError) -> JSONResponse:
        return JSONResponse(error_to_wire(exc), status_code=status_of(exc))

    @app.exception_handler(Exception)
    async def _other(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        body = {"error": "backend_error", "message": "internal error in the zone service"}
        return JSONResponse({**body, "retryable": False, "fields": {}}, status_code=500)

    @app.get("/v1/health", tags=["zone"], summary="Is the service up (no token needed)")
    async def health() -> dict[str, Any]:
        return {"ok": True, "zone": service.zone.zone_id, "api": API_VERSION}

    @app.get("/v1/whoami", tags=["zone"], summary="The caller as the zone knows them")
    async def whoami(request: Request) -> JSONResponse:
        # says only who the token is (its holder knows that): allowed before a required
        # second factor is enrolled, so that `sandbox user totp-enrol` can start
        def run() -> tuple[Any, str | None]:
            return _login(service, request, enrolling=True)

        actor, opened = await run_in_threadpool(run)
        return _with_session(dict(to_jsonable(actor)), opened)

    for call in CALLS:
        app.add_api_route(
            call.path,
            _endpoint(service, call),
            methods=[call.verb],
            name=call.name,
            summary=f"{call.name} (action {call.action})",
            tags=[call.path.split("/")[2]],
            openapi_extra=_openapi(call),
        )
    return app


def _endpoint(service: Any, call: Call) -> Any:
    async def endpoint(request: Request) -> JSONResponse:
        body: dict[str, Any] = {}
        if call.verb == "POST":
            raw = await request.body()
            if raw:
                import json

                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    from foundation.errors import SpecError

                    raise SpecError("body", "is not a JSON object", "send the call's arguments")
                body = parsed
        else:
            body = dict(request.query_params)
        body.update(request.path_params)

        def run() -> tuple[Any, str | None]:
            actor, opened = _login(service, request, enrolling=call.login)
            return call_service(service, call, actor, body), opened

        result, opened = await run_in_threadpool(run)
        return _with_session(result, opened)

    endpoint.__name__ = call.name
    return endpoint


def _openapi(call: Call) -> dict[str, Any]:
    params = [a for a in call.args if a.name not in call.path_params]
    extra: dict[str, Any] = {
        "parameters": [
            {"name": a, "in": "path", "required": True, "schema": {"type": "string"}}
            for a in call.path_params
        ]
    }
    if call.verb == "GET":
        extra["parameters"] += [
            {"name": a.name, "in": "query", "required": a.required, "schema": {}} for a in params
        ]
    elif params:
        extra["requestBody"] = {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {a.name: {"description": a.kind} for a in params},
                        "required": [a.name for a in params if a.required],
                    }
                }
            }
        }
    return extra
