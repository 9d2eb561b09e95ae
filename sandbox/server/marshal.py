"""Arguments off the wire into the service's types, and results back onto it.

Uploads land in a private folder inside the zone (``inbox/``) for the length of the call;
output folders are private folders inside the zone (``outbox/``) whose files go back in the
response, bounded by ``MAX_TRANSFER_BYTES``. Paths inside the zone never reach the client:
the output folder's path in a result is replaced by ``OUT_MARK``, which the client swaps for
its own folder.
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from foundation.errors import SpecError
from sandbox.api.calls import (
    CONTRACT,
    DATE,
    MAX_TRANSFER_BYTES,
    OUT_MARK,
    OUTDIR,
    SPEC,
    UPLOAD,
    Call,
)
from sandbox.api.wire import to_jsonable


def _number(call: Call, name: str, value: Any) -> Any:
    """Query strings arrive as text: numbers and flags by their look, names stay text."""
    if not isinstance(value, str) or call.verb != "GET":
        return value
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value)
    except ValueError:
        return value


def call_service(service: Any, call: Call, actor: Any, body: dict[str, Any]) -> Any:
    known = {a.name for a in call.args}
    unknown = sorted(set(body) - known)
    if unknown:
        raise SpecError(unknown[0], f"is not an argument of {call.name}", f"use {sorted(known)}")
    kwargs: dict[str, Any] = {}
    scratch: list[Path] = []
    outdirs: dict[str, Path] = {}
    try:
        for arg in call.args:
            if arg.name not in body or body[arg.name] is None:
                if arg.required and arg.kind != OUTDIR:
                    raise SpecError(arg.name, "is required", f"give {arg.name}")
                if arg.kind != OUTDIR:
                    continue
            value = body.get(arg.name)
            if arg.kind == SPEC:
                from sandbox.jobspec import parse_job_spec

                if not isinstance(value, dict):
                    raise SpecError("spec", "must be a job spec object", "send the spec's dict")
                kwargs[arg.name] = parse_job_spec(value)
            elif arg.kind == CONTRACT:
                from connectors.schema import SchemaContract

                if not isinstance(value, dict):
                    raise SpecError("contract", "must be a schema contract object")
                kwargs[arg.name] = SchemaContract.from_dict(value)
            elif arg.kind == UPLOAD:
                kwargs[arg.name] = _receive(service, value, scratch)
            elif arg.kind == OUTDIR:
                folder = _private_dir(service, "outbox")
                scratch.append(folder)
                outdirs[arg.name] = folder
                kwargs[arg.name] = folder / "out"
            elif arg.kind == DATE:
                try:
                    kwargs[arg.name] = datetime.fromisoformat(str(value))
                except ValueError:
                    raise SpecError(arg.name, "is not an ISO date", "e.g. 2027-01-31") from None
            else:
                kwargs[arg.name] = _number(call, arg.name, value)
        if call.background:
            kwargs["wait"] = False
        result = to_jsonable(getattr(service, call.name)(actor, **kwargs))
        if outdirs:
            return _with_files(result, {k: v / "out" for k, v in outdirs.items()})
        return result
    finally:
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)


def _private_dir(service: Any, kind: str) -> Path:
    base = Path(service.zone.root) / kind
    base.mkdir(mode=0o700, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base))


def _receive(service: Any, value: Any, scratch: list[Path]) -> Path:
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise SpecError("source", "must be an uploaded file", "the client sends the file's bytes")
    name = Path(str(value.get("name") or "upload")).name or "upload"
    data = base64.b64decode(value["data"], validate=True)
    if len(data) > MAX_TRANSFER_BYTES:
        raise SpecError("source", "is larger than the API takes", "ask the operator to ingest it")
    folder = _private_dir(service, "inbox")
    scratch.append(folder)
    path = folder / name
    path.write_bytes(data)
    return path


def _with_files(result: Any, outdirs: dict[str, Path]) -> dict[str, Any]:
    files: dict[str, str] = {}
    total = 0
    for folder in outdirs.values():
        if folder.is_file():  # the call wrote one file (``synth dummy --out x.parquet``)
            data = folder.read_bytes()
            total += len(data)
            files["."] = base64.b64encode(data).decode()
            continue
        if not folder.exists():
            continue
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                total += len(data)
                if total > MAX_TRANSFER_BYTES:
                    raise SpecError("out", "the files are larger than the API returns")
                files[str(f.relative_to(folder))] = base64.b64encode(data).decode()
    if total > MAX_TRANSFER_BYTES:
        raise SpecError("out", "the files are larger than the API returns")
    marked = _mark(result, [str(p) for p in outdirs.values()])
    return {"result": marked, "files": files}


def _mark(value: Any, folders: list[str]) -> Any:
    if isinstance(value, str):
        for folder in folders:
            value = value.replace(folder, OUT_MARK)
        return value
    if isinstance(value, list):
        return [_mark(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: _mark(v, folders) for k, v in value.items()}
    return value
