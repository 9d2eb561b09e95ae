"""The zone's one exception tree.

It lives at the bottom of the import graph (``connectors`` imports nothing of ours) so
that every package raises from the same tree::

    ZoneError                      base of everything we raise on purpose
    ├── UserError                  the caller can fix it; the CLI prints one line, no traceback
    │   ├── SpecError              a job spec / request field is wrong (names the field + fix)
    │   ├── SchemaError            a schema contract or a data file breaks its contract
    │   │                          (names the column and the row number, never the value)
    │   ├── NotFoundError          an unknown dataset, project, request, job, user
    │   ├── AuthError              unknown or revoked token
    │   ├── PolicyDenied           a role, grant, column, mechanism or expiry says no
    │   │                          (carries what is missing and who can grant it)
    │   └── BudgetExceeded         the ledger would go over a granted budget
    └── BackendError               the zone's machinery failed; ``retryable`` says whether a
        │                          retry can help
        ├── ComputeError           Ray / the job runner failed (translated from Ray's errors)
        └── IntegrityError         the audit chain or ledger is inconsistent (never retry)

Messages must never contain a raw value from a sensitive dataset: name columns, fields and
row numbers only.

Every error pickles whole (``pickle.loads(pickle.dumps(e))`` has the same type, message and
attributes), so one raised in a Ray worker reaches the caller as itself. Pickle's default
for exceptions calls ``cls(*e.args)``, which breaks for classes whose ``__init__`` takes
other arguments (``SpecError(field, problem, fix)``, keyword-only ``retryable``); so
``ZoneError.__reduce__`` rebuilds the object without calling ``__init__`` at all: it restores
``args`` (the message) and the instance's attributes as they were. A subclass with any
``__init__`` signature therefore pickles correctly without code of its own.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[ZoneError], args: tuple[Any, ...], state: dict[str, Any]) -> ZoneError:
    """Unpickle a ``ZoneError`` (see the module docstring): no ``__init__`` call."""
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


class ZoneError(Exception):
    """Base of every error the zone raises on purpose."""

    #: short machine-readable kind for ``--json`` output
    kind = "zone_error"
    #: whether a retry can help; only a ``BackendError`` can say yes (a user error never)
    retryable = False

    def __reduce__(self) -> tuple[Any, ...]:
        # the traceback, __cause__ and __context__ are not pickled (as for any exception)
        return (_rebuild, (type(self), tuple(self.args), dict(self.__dict__)))


class UserError(ZoneError):
    kind = "user_error"


class SpecError(UserError):
    kind = "spec_error"

    def __init__(self, field: str, problem: str, fix: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class SchemaError(UserError):
    kind = "schema_error"

    def __init__(self, message: str, *, column: str | None = None, row: int | None = None) -> None:
        self.column = column
        self.row = row
        super().__init__(message)


class NotFoundError(UserError):
    kind = "not_found"


class AuthError(UserError):
    kind = "auth_error"


#: what a call without a token is missing (the served API answers it 401, not 403)
NEEDS_TOKEN = "SANDBOX_TOKEN or --token"


class PolicyDenied(UserError):
    kind = "policy_denied"

    def __init__(self, reason: str, *, missing: tuple[str, ...] = (), grantor: str = "") -> None:
        self.reason = reason
        self.missing = tuple(missing)
        self.grantor = grantor
        msg = reason
        if missing:
            msg += f"; missing: {', '.join(missing)}"
        if grantor:
            msg += f"; ask a {grantor}"
        super().__init__(msg)


class BudgetExceeded(UserError):
    kind = "budget_exceeded"


class BackendError(ZoneError):
    kind = "backend_error"
    retryable = False

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        self.retryable = retryable
        super().__init__(message)


class ComputeError(BackendError):
    kind = "compute_error"


class IntegrityError(BackendError):
    kind = "integrity_error"


#: every kind a client may meet, for rebuilding an error that crossed the wire
_KINDS: dict[str, type[ZoneError]] = {
    c.kind: c
    for c in (
        ZoneError,
        UserError,
        SpecError,
        SchemaError,
        NotFoundError,
        AuthError,
        PolicyDenied,
        BudgetExceeded,
        BackendError,
        ComputeError,
        IntegrityError,
    )
}


def error_to_wire(exc: ZoneError) -> dict[str, Any]:
    """An error as the server sends it: its kind, its one-line message, its fields."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(exc).items()}
    return {"error": exc.kind, "message": str(exc), "retryable": exc.retryable, "fields": fields}


def error_from_wire(data: dict[str, Any]) -> ZoneError:
    """The same error again on the client's side (the class its ``kind`` names)."""
    cls = _KINDS.get(str(data.get("error")), ZoneError)
    fields = dict(data.get("fields") or {})
    if "missing" in fields and isinstance(fields["missing"], list):
        fields["missing"] = tuple(fields["missing"])
    return _rebuild(cls, (str(data.get("message", "")),), fields)
