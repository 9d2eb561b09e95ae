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

    def authenticate(self, token: str | None) -> Any:
        return self.service.authenticate(token)

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

    def __init__(self, server: str, token: str | None, *, timeout: float = 600.0) -> None:
        import httpx

        self.server = server.rstrip("/")
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

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
        except httpx.TimeoutException:
            raise ComputeError(
                f"the zone at {self.server} did not answer in time", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise BackendError(
                f"cannot reach the zone at {self.server} ({type(exc).__name__}); is "
                "`sandbox serve` running there? (SANDBOX_SERVER / --server)",
                retryable=True,
            ) from None
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
