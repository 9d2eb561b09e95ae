"""The thin client: the zone's calls over HTTP, for a researcher who holds a URL and a token.

``RemoteZone`` has the same methods as ``sandbox.service.Service`` (the CLI calls either one
through ``sandbox.cli.common.session``) and builds each request from the route table
(``sandbox.api.calls``). It imports nothing that reads rows, keys or the ledger: what it can
do is exactly what the API lets it do (``tests/sandbox/test_served.py`` pins the imports).

``EmbeddedZone`` wraps an in-process ``Service`` (the one-person default) so that both return
the same JSON-shaped records: ``--json`` prints the same object either way.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from foundation.errors import AuthError, BackendError, ComputeError, error_from_wire
from sandbox.api.calls import BY_NAME, CONTRACT, DATE, OUT_MARK, OUTDIR, SPEC, UPLOAD, Call
from sandbox.api.wire import Record, from_service, to_jsonable, to_record


class EmbeddedZone:
    """An in-process ``Service`` whose results look like the served API's."""

    served = False

    def __init__(self, service: Any) -> None:
        self.service = service

    def authenticate(self, token: str | None, *args: Any, **kw: Any) -> Any:
        return self.service.authenticate(token, *args, **kw)

    def close(self) -> None:
        self.service.close()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.service, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("wait", None)  # embedded: a job always runs inside the call
            return from_service(method(*args, **kwargs))

        return call


class RemoteZone:
    """The zone's API at ``server`` with ``token``; every call raises the zone's own errors."""

    served = True

    def __init__(
        self,
        server: str,
        token: str | None,
        *,
        timeout: float = 600.0,
        ca: Path | None = None,
        otp: str | None = None,
    ) -> None:
        import httpx

        self.server = check_server_url(server).rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        if otp:
            headers[OTP_HEADER] = otp
        self._http = httpx.Client(
            base_url=self.server, headers=headers, timeout=timeout, verify=_verify(ca)
        )

    def close(self) -> None:
        self._http.close()

    def authenticate(self, token: str | None) -> Record:
        return to_record(self._request("GET", "/v1/whoami", {}))

    def __getattr__(self, name: str) -> Any:
        call = BY_NAME.get(name)
        if call is None:
            raise AttributeError(name)

        def invoke(actor: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("on_progress", None)  # served: the client follows the job's record
            kwargs.pop("wait", None)
            return self._call(call, args, kwargs)

        return invoke

    # -- one call ---------------------------------------------------------------------------

    def _call(self, call: Call, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        values = dict(zip([a.name for a in call.args], args, strict=False))
        values.update(kwargs)
        body: dict[str, Any] = {}
        outs: dict[str, Path] = {}
        for arg in call.args:
            if arg.name not in values:
                continue
            v = values[arg.name]
            if arg.kind == SPEC:
                body[arg.name] = v.to_dict() if hasattr(v, "to_dict") else v
            elif arg.kind == CONTRACT:
                body[arg.name] = v.to_dict() if hasattr(v, "to_dict") else v
            elif arg.kind == UPLOAD:
                path = Path(v)
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    from foundation.errors import SpecError

                    raise SpecError("--from", f"cannot read {path}: {exc.strerror}") from None
                body[arg.name] = {"name": path.name, "data": base64.b64encode(data).decode()}
            elif arg.kind == OUTDIR:
                outs[arg.name] = Path(v)
            elif arg.kind == DATE:
                body[arg.name] = None if v is None else v.isoformat()
            else:
                body[arg.name] = to_jsonable(v)
        url = call.path
        for p in call.path_params:
            url = url.replace("{" + p + "}", _segment(body.pop(p)))
        if call.verb == "GET":
            query = {k: _query(v) for k, v in body.items() if v is not None}
            out = self._request("GET", url, query)
        else:
            out = self._request("POST", url, body)
        if outs:
            return to_record(_unpack(out, outs))
        return to_record(out)

    def _request(self, verb: str, path: str, data: dict[str, Any]) -> Any:
        import httpx

        try:
            if verb == "GET":
                resp = self._http.get(path, params=data)
            else:
                resp = self._http.post(path, json=data)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise BackendError(
                    f"the zone at {self.server} shows a certificate this client does not "
                    "trust; give the CA that signed it with SANDBOX_CA or --ca",
                    retryable=False,
                ) from None
            raise self._unreachable(exc) from None
        except httpx.TimeoutException:
            raise ComputeError(
                f"the zone at {self.server} did not answer in time", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        opened = resp.headers.get(SESSION_HEADER)
        if opened:
            # a good one-time code opened a session: the code is spent, the session is sent
            self._http.headers[SESSION_HEADER] = opened
            self._http.headers.pop(OTP_HEADER, None)
        try:
            payload = resp.json()
        except ValueError:
            payload = None
        if resp.status_code >= 400:
            if isinstance(payload, dict) and "error" in payload:
                raise error_from_wire(payload)
            if resp.status_code == 401:
                raise AuthError("the zone refused the token")
            raise BackendError(f"the zone answered HTTP {resp.status_code}", retryable=False)
        return payload

    def _unreachable(self, exc: Exception) -> BackendError:
        return BackendError(
            f"cannot reach the zone at {self.server} ({type(exc).__name__}); is "
            "`sandbox serve` running there? (SANDBOX_SERVER / --server)",
            retryable=True,
        )


#: the headers of ``sandbox.server.app`` (the client imports no server code)
OTP_HEADER = "x-sandbox-otp"
SESSION_HEADER = "x-sandbox-session"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_server_url(server: str) -> str:
    """An https URL, or http to this machine only: a token must not cross a network in clear."""
    from urllib.parse import urlsplit

    from foundation.errors import SpecError

    try:
        url = urlsplit(server)
        host = url.hostname or ""
    except ValueError:
        url, host = None, ""
    if url is None or url.scheme not in ("http", "https") or not host:
        raise SpecError(
            "--server", f"{server!r} is not a zone's URL", "e.g. https://zone.example.org:8750"
        )
    if url.scheme == "http" and host not in LOOPBACK:
        raise SpecError(
            "--server",
            f"{server} is plain http to another machine: your token would cross the network "
            "in clear",
            "use https:// (the zone serves it with `sandbox serve --tls-cert/--tls-key`), or "
            "http only to 127.0.0.1, localhost or ::1",
        )
    return server


def _verify(ca: Path | None) -> Any:
    """What httpx checks the server's certificate with: the CA file given, else the system's."""
    if ca is None:
        return True
    import ssl

    from foundation.errors import SpecError

    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "not PEM"
        raise SpecError(
            "--ca", f"cannot read a CA certificate from {ca} ({reason})", "give a PEM file"
        ) from None


def _segment(value: Any) -> str:
    from urllib.parse import quote

    return quote(str(value), safe="")


def _query(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _unpack(out: dict[str, Any], outs: dict[str, Path]) -> Any:
    """Write the returned files into the caller's folder; its path goes into the result."""
    (target,) = outs.values()  # one output folder per call
    for rel, data in (out.get("files") or {}).items():
        raw = base64.b64decode(data)
        if rel == ".":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw)
            continue
        dest = (target / rel).resolve()
        if target.resolve() not in dest.parents:
            raise BackendError("the zone returned a file outside the output folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(raw)
    return _unmark(out.get("result"), str(target))


def _unmark(value: Any, folder: str) -> Any:
    if isinstance(value, str):
        return value.replace(OUT_MARK, folder)
    if isinstance(value, list):
        return [_unmark(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _unmark(v, folder) for k, v in value.items()}
    return value
