"""The store's access requests and grants: file a request, approve or deny it, revoke a grant.

A new request must pass ``decisions.decide_access_request``; a request moves only along
``decisions.REQUEST_TRANSITIONS`` (checked inside the transaction, so two stewards cannot both
decide it); nobody approves their own request; an approval must fit its dataset's zone-wide cap
(``policies.store_caps``), checked in the transaction that writes the grant.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from foundation.errors import NotFoundError, PolicyDenied, SpecError
from foundation.sql import lock_key
from policies.caps import CapDecision
from policies.db import access_requests, grants
from policies.decisions import (
    STEWARD,
    GrantView,
    Mechanism,
    NewAccessRequest,
    RequestState,
    check_budget,
    check_request_transition,
    decide_access_request,
    parse_mechanisms,
)
from policies.roles import Role
from policies.store_base import StoreBase, check_aware, check_text
from policies.store_caps import cap_decision_in, cap_lock
from policies.store_datasets import dataset_row, version_row
from policies.store_projects import load_project
from policies.store_records import (
    AccessRequestRecord,
    GrantRecord,
    contract_columns,
    grant_from_row,
    json_dumps,
    request_from_row,
)
from policies.store_users import active_user

_REQUEST_WITH_GRANT = select(access_requests, grants.c.id.label("grant_id")).outerjoin(
    grants, grants.c.request_id == access_requests.c.id
)


def load_request(conn: Connection, request_id: str) -> AccessRequestRecord:
    row = conn.execute(_REQUEST_WITH_GRANT.where(access_requests.c.id == request_id)).first()
    if row is None:
        raise NotFoundError(
            f"unknown access request {request_id!r}; list requests with `sandbox access list`"
        )
    return request_from_row(row, row.grant_id)


def load_grant(conn: Connection, grant_id: str) -> GrantRecord:
    row = conn.execute(select(grants).where(grants.c.id == grant_id)).first()
    if row is None:
        raise NotFoundError(f"unknown grant {grant_id!r}; list grants with `sandbox access list`")
    return grant_from_row(row)


class AccessMixin(StoreBase):
    """``StateStore``'s access request and grant methods (``access_requests``, ``grants``)."""

    def request_access(
        self,
        project: str,
        dataset: str,
        columns: Iterable[str],
        mechanisms: Iterable[Mechanism | str],
        epsilon: float,
        delta: float,
        by: str,
        quote: Mapping[str, Any] | None = None,
        dataset_version: int | None = None,
    ) -> AccessRequestRecord:
        """File a pending request; ``decide_access_request`` must allow it first.

        ``quote`` is an optional JSON-safe estimate attached for the steward (e.g. what the
        planned jobs would spend by the accountant). ``dataset_version`` pins the grant to
        one version of the dataset (its columns are checked against that version's
        contract); None follows the latest.
        """
        if isinstance(columns, str):
            raise SpecError("columns", "is a single string", "pass a list of column names")
        if isinstance(mechanisms, str):
            raise SpecError("mechanisms", "is a single string", "pass a list of mechanisms")
        cols = frozenset(columns)
        if not all(isinstance(c, str) for c in cols):
            raise SpecError("columns", "must be column names", "pass a list of strings")
        mechs = parse_mechanisms(mechanisms)
        quote_json = None
        if quote is not None:
            try:
                quote_json = json_dumps(dict(quote))
            except (TypeError, ValueError):
                raise SpecError(
                    "quote", "is not JSON-safe", "use strings, numbers and lists"
                ) from None
        with self.engine.begin() as conn:
            view = load_project(conn, project).view()
            contract_json = dataset_row(conn, dataset).contract_json
            if dataset_version is not None:
                contract_json = version_row(conn, dataset, dataset_version).contract_json
            known = contract_columns(json.loads(contract_json))
            requester = active_user(conn, by, "by")
            decision = decide_access_request(
                NewAccessRequest(
                    user=by,
                    role=Role(requester.role),
                    project=project,
                    dataset=dataset,
                    columns=cols,
                    mechanisms=mechs,
                    epsilon=epsilon,
                    delta=delta,
                ),
                view,
                known,
            )
            decision.raise_if_denied()
            request_id = self._new_id(conn, "req", access_requests.c.id)
            conn.execute(
                access_requests.insert().values(
                    id=request_id,
                    project=project,
                    dataset=dataset,
                    columns_json=json_dumps(sorted(cols)),
                    mechanisms_json=json_dumps(sorted(m.value for m in mechs)),
                    epsilon=float(epsilon),
                    delta=float(delta),
                    requested_by=by,
                    dataset_version=dataset_version,
                    state=RequestState.PENDING.value,
                    reason="",
                    decided_by=None,
                    decided_at=None,
                    quote_json=quote_json,
                    created_at=self._now(),
                )
            )
            return load_request(conn, request_id)

    def get_request(self, request_id: str) -> AccessRequestRecord:
        with self.engine.connect() as conn:
            return load_request(conn, request_id)

    def list_requests(
        self, pending_only: bool = False, project: str | None = None
    ) -> list[AccessRequestRecord]:
        """Requests, oldest first; only pending ones, or one project's, if asked."""
        query = _REQUEST_WITH_GRANT.order_by(access_requests.c.created_at, access_requests.c.id)
        if pending_only:
            query = query.where(access_requests.c.state == RequestState.PENDING.value)
        if project is not None:
            query = query.where(access_requests.c.project == project)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [request_from_row(r, r.grant_id) for r in rows]

    def _decide(
        self, conn: Connection, request_id: str, target: RequestState, by: str, reason: str
    ) -> None:
        """Move a request to ``target`` (checked against the transition table, race-safe)."""
        current = load_request(conn, request_id)
        check_request_transition(request_id, current.state, target)
        done = conn.execute(
            access_requests.update()
            .where(access_requests.c.id == request_id)
            .where(access_requests.c.state == current.state.value)
            .values(state=target.value, decided_by=by, decided_at=self._now(), reason=reason)
        )
        if done.rowcount != 1:  # someone else decided it between our read and our write
            check_request_transition(request_id, load_request(conn, request_id).state, target)
            raise PolicyDenied(
                f"access request {request_id} changed while being decided; look again"
            )

    def approve(
        self,
        request_id: str,
        by: str,
        epsilon: float | None = None,
        delta: float | None = None,
        expires_at: datetime | None = None,
    ) -> GrantRecord:
        """Approve a pending request and create its grant.

        ``epsilon`` and ``delta`` default to what was requested; a different figure is what
        the grant gets, and the request's ``reason`` records both. ``expires_at`` (aware) ends
        the grant; ``None`` never expires (a past ``expires_at`` is stored as given: such a
        grant is never live; the service refuses it against its own clock). Nobody approves
        their own request. The grant must fit its dataset's zone-wide cap
        (``decide_dataset_cap`` over every grant on the dataset and the ledger's budgets on
        it, read in the transaction that writes the grant, so two approvals on one dataset
        cannot both squeeze under it): ``PolicyDenied`` otherwise.
        """
        expires = check_aware("expires_at", expires_at)
        with self.engine.begin() as conn:
            active_user(conn, by, "by")
            req = load_request(conn, request_id)
            check_request_transition(request_id, req.state, RequestState.APPROVED)
            if by == req.requested_by:
                raise PolicyDenied(
                    f"{by} filed access request {request_id} and cannot also approve it",
                    missing=("approval by another data steward",),
                    grantor=STEWARD,
                )
            eps = req.epsilon if epsilon is None else epsilon
            dlt = req.delta if delta is None else delta
            problems = check_budget(eps, dlt)
            if problems:
                raise problems[0].to_error()
            changed = [
                f"{name} {got:g} (requested {asked:g})"
                for name, got, asked in (("epsilon", eps, req.epsilon), ("delta", dlt, req.delta))
                if float(got) != asked
            ]
            reason = "approved with " + ", ".join(changed) if changed else "approved as requested"
            # the dataset's zone-wide cap, checked in the transaction that writes the grant
            lock_key(conn, cap_lock(req.dataset))
            cap_decision_in(conn, req, eps, dlt, self._now()).raise_if_denied()
            self._decide(conn, request_id, RequestState.APPROVED, by, reason)
            grant_id = self._new_id(conn, "grant", grants.c.id)
            conn.execute(
                grants.insert().values(
                    id=grant_id,
                    request_id=request_id,
                    project=req.project,
                    dataset=req.dataset,
                    columns_json=json_dumps(sorted(req.columns)),
                    mechanisms_json=json_dumps(sorted(m.value for m in req.mechanisms)),
                    epsilon=float(eps),
                    delta=float(dlt),
                    expires_at=expires,
                    granted_by=by,
                    created_at=self._now(),
                    revoked_at=None,
                    dataset_version=req.dataset_version,
                )
            )
            return load_grant(conn, grant_id)

    def deny(self, request_id: str, by: str, reason: str) -> AccessRequestRecord:
        """Deny a pending request; ``reason`` tells the researcher what would be approved."""
        reason = check_text("reason", reason, "say why, so the researcher can fix the request")
        with self.engine.begin() as conn:
            active_user(conn, by, "by")
            self._decide(conn, request_id, RequestState.DENIED, by, reason)
            return load_request(conn, request_id)

    def get_grant(self, grant_id: str) -> GrantRecord:
        with self.engine.connect() as conn:
            return load_grant(conn, grant_id)

    def list_grants(
        self, project: str | None = None, dataset: str | None = None
    ) -> list[GrantRecord]:
        query = select(grants).order_by(grants.c.created_at, grants.c.id)
        if project is not None:
            query = query.where(grants.c.project == project)
        if dataset is not None:
            query = query.where(grants.c.dataset == dataset)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [grant_from_row(r) for r in rows]

    def revoke_grant(self, grant_id: str, by: str) -> GrantRecord:
        """Revoke a grant now (idempotent: revoking twice keeps the first time)."""
        with self.engine.begin() as conn:
            active_user(conn, by, "by")
            rec = load_grant(conn, grant_id)
            if rec.revoked_at is None:
                conn.execute(
                    grants.update().where(grants.c.id == grant_id).values(revoked_at=self._now())
                )
            return load_grant(conn, grant_id)

    def grants_for(self, project: str, dataset: str) -> list[GrantView]:
        """Every grant for ``project`` on ``dataset`` (expired and revoked ones included: the
        decision says which are live at its ``now``)."""
        return [g.view() for g in self.list_grants(project, dataset)]

    def dataset_grants(self, dataset: str) -> list[GrantView]:
        """Every grant on ``dataset`` in every project (expired and revoked ones included:
        ``worst_case.person_worst_case`` says which are live at its ``now``)."""
        return [g.view() for g in self.list_grants(dataset=dataset)]

    def cap_decision(
        self,
        request_id: str,
        epsilon: float | None = None,
        delta: float | None = None,
        now: datetime | None = None,
    ) -> CapDecision:
        """Would approving ``request_id`` (with these overrides, as ``approve`` takes them) fit
        its dataset's cap at ``now`` (default: the store's clock)? Reads only; ``approve``
        checks again in its own transaction. A request that is not pending, or overrides that
        are no budget, raise as ``approve`` would."""
        checked = check_aware("now", now)
        when = self._now() if checked is None else checked
        with self.engine.connect() as conn:
            req = load_request(conn, request_id)
            check_request_transition(request_id, req.state, RequestState.APPROVED)
            eps = req.epsilon if epsilon is None else epsilon
            dlt = req.delta if delta is None else delta
            problems = check_budget(eps, dlt)
            if problems:
                raise problems[0].to_error()
            return cap_decision_in(conn, req, eps, dlt, when)
