"""The policy state store: users, datasets, projects, access requests and grants.

``StateStore(engine)`` persists the zone's governance state in the tables of ``policies.db``
(SQLite by default, PostgreSQL by URL; open the engine with ``foundation.sql.make_engine``).
Every call is one transaction; every record it returns is a frozen dataclass with a JSON-safe
``to_dict()`` (never a token hash, never a dataset's storage path).

The store keeps state consistent; it does not decide who may call it. The service checks the
caller's role (``policies.roles.require``) first; the store then enforces what the data
itself requires:

- names are unique (``SpecError`` naming ``name``); unknown names are ``NotFoundError``
  listing the known ones;
- people named as owners, members, requesters and deciders are active users;
- a new access request passes ``decisions.decide_access_request`` (the requester is a member
  of the active project, the columns are in the dataset's contract, the budget is sane);
- access requests move only along ``decisions.REQUEST_TRANSITIONS`` (pending -> approved or
  denied, once, checked inside the transaction, so two stewards cannot both decide);
- nobody approves their own request (separation of duties).

Auditing is the caller's: the service writes one audit event per call, allowed or not. A
caller that wants its change and its audit line in one transaction uses
``AuditLog.append_in``. Budgets live in the privacy ledger; a grant's epsilon and delta are
what the steward approved for it.

Time comes from ``clock`` (a callable returning an aware UTC datetime), so tests pass a
frozen one. Whether a grant has expired is decided by ``decide_job_access(now=...)``, not
here.

The store is split by table group, one mixin each, combined here: ``policies.store_users``,
``store_datasets``, ``store_projects``, ``store_access`` (requests and grants) and
``store_caps`` (zone-wide caps per dataset). Their shared engine, clock and argument checks
are in ``policies.store_base``; the records they return in ``policies.store_records``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine

from foundation.clock import utcnow
from policies.db import create_schema
from policies.store_access import AccessMixin
from policies.store_caps import CapsMixin
from policies.store_datasets import DatasetsMixin
from policies.store_projects import ProjectsMixin
from policies.store_users import UsersMixin


class StateStore(UsersMixin, DatasetsMixin, ProjectsMixin, AccessMixin, CapsMixin):
    """The policy state on ``engine``; creates its tables if they are missing."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._clock = clock
        create_schema(engine)

    def create_schema(self) -> None:
        """Create the policy tables (idempotent; the constructor already did)."""
        create_schema(self.engine)
