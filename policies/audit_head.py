"""The audit log's head file: the last line's ``seq`` and MAC, kept outside the database.

A database writer without the audit key cannot forge a line, but can still cut lines off the
end of the log: what is left is a valid chain. The head file, in the zone folder rather than
in the database, records how far the log reached::

    {"seq": 12, "mac": "<line 12's MAC>", "head_mac": "<HMAC-SHA256 of the two, under the key>"}

``head_mac`` is HMAC-SHA256 under the audit key over ``audit-head\\0`` followed by the
canonical JSON of ``{"mac": ..., "seq": ...}`` (the prefix keeps it from ever equalling a
line's MAC), so the file cannot be edited or rewritten without the key either.

The file is written whole (a temporary file, fsync, ``os.replace``; mode 0600), so a reader
sees the old head or the new one, never half of one. Writers (threads and processes alike)
take an exclusive ``flock`` on ``<head>.lock`` around read-the-log-then-write, so a slower
writer can never put back an older head over a newer one. POSIX only, as the zone is.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_HEAD_DOMAIN = b"audit-head\x00"
_FIELDS = {"seq", "mac", "head_mac"}


class HeadError(ValueError):
    """The head file exists but cannot be trusted (unreadable, malformed, or its MAC is wrong)."""


@dataclass(frozen=True)
class Head:
    seq: int
    mac: str


def _head_mac(key: bytes, head: Head) -> str:
    body = json.dumps({"mac": head.mac, "seq": head.seq}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, _HEAD_DOMAIN + body.encode("utf-8"), hashlib.sha256).hexdigest()


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def head_lock(path: Path) -> Iterator[None]:
    """Hold the head writers' lock. ``flock`` belongs to the open file, so each holder opens
    its own: threads of one process exclude each other as processes do."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_head(path: Path, key: bytes) -> Head | None:
    """The head recorded at ``path``; ``None`` when there is no file; ``HeadError`` when there
    is one that is not a head signed with ``key``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HeadError(f"the head file {path} cannot be read ({exc.strerror})") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise HeadError(f"the head file {path} is not JSON") from None
    if not isinstance(data, dict) or set(data) != _FIELDS:
        raise HeadError(f"the head file {path} does not hold seq, mac and head_mac")
    seq, mac, head_mac = data["seq"], data["mac"], data["head_mac"]
    if type(seq) is not int or seq < 1 or not isinstance(mac, str):
        raise HeadError(f"the head file {path} holds no line number and MAC")
    head = Head(seq, mac)
    if not isinstance(head_mac, str) or not hmac.compare_digest(head_mac, _head_mac(key, head)):
        raise HeadError(
            f"the head file {path} is not signed with the audit key (edited, or written by "
            "someone without the key)"
        )
    return head


def write_head(path: Path, key: bytes, head: Head) -> None:
    """Replace the head file atomically (see the module docstring)."""
    text = json.dumps(
        {"seq": head.seq, "mac": head.mac, "head_mac": _head_mac(key, head)}, sort_keys=True
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            # on disk before the rename: a crash must not leave an empty head behind
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
