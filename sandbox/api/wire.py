"""What crosses the wire: JSON-able values out of the service, records back in the client.

``to_jsonable`` turns whatever a service call returns (frozen dataclasses with ``to_dict``,
enums, datetimes, paths, sets) into plain JSON values; the server sends that, and embedded
mode passes its results through the same function, so ``--json`` prints the same object
whichever way the CLI reached the zone. ``Record`` gives the CLI's renderers attribute access
(``rec.id``, ``rec.state``) over such a value.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, set | frozenset):
        return sorted(to_jsonable(o) for o in obj)
    if isinstance(obj, list | tuple):
        return [to_jsonable(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Record(dict[str, Any]):
    """A JSON object with attribute access; nested objects are ``Record`` too.

    A field named like a dict method (``items``, ``keys``) is read with ``rec["items"]``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return to_record(self[name])
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


def to_record(value: Any) -> Any:
    """JSON values as the CLI reads them: objects become ``Record``, lists stay lists."""
    if isinstance(value, dict) and not isinstance(value, Record):
        return Record({k: to_record(v) for k, v in value.items()})
    if isinstance(value, list):
        return [to_record(v) for v in value]
    return value


def from_service(value: Any) -> Any:
    """A service call's return value as the client sees it (embedded or served alike)."""
    return to_record(to_jsonable(value))
