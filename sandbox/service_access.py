"""The service's projects-and-access calls: projects and their members, access requests,
approvals against the dataset's cap, denials, grants and their revocation.

``Service`` inherits them; they depend on nothing but the zone's context (``self.ctx``),
declared below, so they can be read and tested on their own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from foundation.errors import (
    NotFoundError,
    PolicyDenied,
    SpecError,
)
from policies.caps import within_cap
from policies.decisions import Mechanism
from policies.roles import ROLE_GRANTOR, Action, Actor, Role
from policies.store_records import AccessRequestRecord, GrantRecord, ProjectRecord
from policies.worst_case import ledger_grant_id
from privacy.budget_events import BudgetKey
from sandbox.approval import Approval, BudgetChange, pooled_grants
from sandbox.context import ZoneContext
from sandbox.disclosure import sees_everything


class AccessCalls:
    """Projects, requests, grants and caps (every call: a role check and one audit event)."""

    ctx: ZoneContext

    # -- projects and access ------------------------------------------------------------------

    def create_project(self, actor: Actor, name: str, purpose: str) -> Any:
        with self.ctx.act(actor, Action.PROJECT_CREATE, name):
            return self.ctx.store.create_project(name, purpose, actor.name)

    def list_projects(self, actor: Actor) -> list[Any]:
        with self.ctx.act(actor, Action.PROJECT_LIST):
            mine = None if sees_everything(actor.role) else actor.name
            return self.ctx.store.list_projects(mine)

    def request_access(
        self,
        actor: Actor,
        project: str,
        dataset: str,
        columns: list[str],
        mechanisms: list[str],
        epsilon: float,
        delta: float,
        quote: dict[str, Any] | None = None,
        dataset_version: int | None = None,
    ) -> Any:
        """File a request; ``dataset_version`` pins it to one version (None: the latest)."""
        with self.ctx.act(
            actor, Action.ACCESS_REQUEST, project, {"dataset": dataset, "epsilon": epsilon}
        ):
            # a steward's or operator's view does not make them a member who may ask
            if actor.name not in self.ctx.store.project_view(project).members:
                raise PolicyDenied(
                    f"{actor.name} is not a member of project {project}",
                    missing=("project membership",),
                    grantor="project owner",
                )
            try:
                mechs = [Mechanism(m) for m in mechanisms]
            except ValueError:
                raise SpecError(
                    "--mechanism",
                    "is not a known mechanism",
                    f"use one of: {', '.join(m.value for m in Mechanism)}",
                ) from None
            return self.ctx.store.request_access(
                project,
                dataset,
                columns,
                mechs,
                epsilon,
                delta,
                actor.name,
                quote,
                dataset_version=dataset_version,
            )

    def list_requests(self, actor: Actor, pending_only: bool = False) -> list[Any]:
        with self.ctx.act(actor, Action.ACCESS_LIST):
            if sees_everything(actor.role):
                return self.ctx.store.list_requests(pending_only=pending_only)
            mine = {p.name for p in self.ctx.store.list_projects(actor.name)}
            return [
                r
                for r in self.ctx.store.list_requests(pending_only=pending_only)
                if r.project in mine
            ]

    def approve(
        self,
        actor: Actor,
        request_id: str,
        epsilon: float | None = None,
        delta: float | None = None,
        expires_at: datetime | None = None,
    ) -> Any:
        """Grant the request (a steward's call): the grant row, then one ledger budget per key
        it feeds. A key that already had a budget (an earlier grant of the project on the
        dataset) gets this grant *added* to it: the ledger pools a key's grants. The
        ``Approval`` returned says which grants it was added to, each key's totals before and
        after, and one person's worst case on the dataset before and after."""
        with self.ctx.act(actor, Action.ACCESS_APPROVE, request_id) as extra:
            if expires_at is not None and expires_at <= self.ctx.clock():
                raise SpecError("--expires", "is in the past", "give a future date (YYYY-MM-DD)")
            # the dataset's zone-wide cap (every grant ever made on it, and what the ledger
            # shows spent under expired and revoked ones), decided before anything is written
            # (store.approve decides again in the transaction that writes the grant, against a
            # racing approval)
            cap = self.ctx.store.cap_decision(request_id, epsilon, delta, now=self.ctx.clock())
            extra.update(
                dataset=cap.dataset,
                worst_case_epsilon=cap.after.epsilon,
                **({} if cap.cap is None else {"cap_epsilon": cap.cap.epsilon}),
            )
            cap.raise_if_denied()
            grant = self.ctx.store.approve(
                request_id, actor.name, epsilon=epsilon, delta=delta, expires_at=expires_at
            )
            # the budget lives in the ledger; the grant row says what it covers. Federated
            # training spends per hospital (disjoint patients): one budget per site.
            keys = []
            if grant.mechanisms - {Mechanism.FEDERATED}:
                keys.append((BudgetKey(grant.project, grant.dataset), grant.id))
            if Mechanism.FEDERATED in grant.mechanisms:
                sites = sorted(self.ctx.store.get_dataset(grant.dataset).sites)
                keys += [
                    (BudgetKey(grant.project, grant.dataset, s), ledger_grant_id(grant.id, s))
                    for s in sites
                ]
            before = {key: self.ctx.ledger.balance(key) for key, _ in keys}
            for key, gid in keys:
                self.ctx.ledger.grant(
                    key, grant.epsilon, grant.delta, actor=actor.name, grant_id=gid
                )
            # the ledger pools a key's grants: a key that had a budget now holds both (said
            # plainly, with the totals, so that no approval changes a budget silently)
            budgets = tuple(
                BudgetChange(key, before[key], self.ctx.ledger.balance(key)) for key, _ in keys
            )
            adds_to = pooled_grants(self.ctx.ledger.project_events(grant.project), before, grant.id)
            worst = self.ctx.store.worst_case(grant.dataset, self.ctx.clock())
            cap_epsilon = None if cap.cap is None else cap.cap.epsilon
            extra.update(grant=grant.id, epsilon=grant.epsilon, adds_to=",".join(adds_to))
            return Approval.of(grant, budgets, adds_to, (cap.before, worst), cap_epsilon)

    def set_dataset_cap(
        self, actor: Actor, dataset: str, epsilon: float, delta: float | None = None
    ) -> dict[str, Any]:
        """Cap what one person of ``dataset`` may be charged across every project (a steward's
        call). Returns the cap, one person's current worst case (``store.worst_case``: live
        grants in full, expired and revoked ones by what the ledger shows they spent or
        reserved), the ``epsilon_left`` under the cap and ``over_cap``: true when that already
        goes over the new cap (the grants stay, and every new grant on the dataset is refused
        until the worst case is back under it)."""

        details = {"epsilon": epsilon, "delta": delta}
        with self.ctx.act(actor, Action.DATASET_CAP, dataset, details) as extra:
            try:
                cap = self.ctx.store.set_dataset_cap(dataset, epsilon, delta, by=actor.name)
            except SpecError as exc:  # name the CLI option, not the store's field
                raise SpecError(f"--{exc.field}", exc.problem, exc.fix) from None
            worst = self.ctx.store.worst_case(dataset, self.ctx.clock())
            over = not within_cap(worst.epsilon, cap.epsilon) or (
                cap.delta is not None and not within_cap(worst.delta, cap.delta)
            )
            extra.update(worst_case_epsilon=worst.epsilon, over_cap=over)
            left = max(cap.epsilon - worst.epsilon, 0.0)
            return {"cap": cap, "worst_case": worst, "over_cap": over, "epsilon_left": left}

    def deny(self, actor: Actor, request_id: str, reason: str) -> Any:
        with self.ctx.act(actor, Action.ACCESS_DENY, request_id):
            if not reason.strip():
                raise SpecError(
                    "--reason", "is required", "say why, so the researcher can fix the request"
                )
            return self.ctx.store.deny(request_id, actor.name, reason)

    def revoke_grant(self, actor: Actor, grant_id: str) -> Any:
        """A steward ends a grant now: no job, quote or synthesis may use it from here on
        (the access decision ignores revoked grants). What it already spent stays spent, and
        it counts against the dataset's cap (``policies.caps``)."""
        with self.ctx.act(actor, Action.ACCESS_REVOKE, grant_id) as extra:
            grant = self.ctx.store.revoke_grant(grant_id, actor.name)
            extra.update(project=grant.project, dataset=grant.dataset)
            return grant

    # -- project show, members and closing; a request, the grants; token reissue; caps ------

    def show_project(self, actor: Actor, name: str) -> dict[str, Any]:
        """A project's purpose, owner, status and members, and every grant it was given
        (revoked and expired ones too, each marked ``revoked`` and ``live`` at the service's
        clock): for its members, stewards and operators."""
        with self.ctx.act(actor, Action.PROJECT_SHOW, name):
            rec = self.ctx.store.get_project(name)
            self.ctx.check_member(actor, name)
            now = self.ctx.clock()
            grants = [self._grant_row(g, now) for g in self.ctx.store.list_grants(project=name)]
            quota = self.ctx.quotas.get(name)
            return {**rec.to_dict(), "grants": grants, "gpu_quota": quota}

    def set_gpu_quota(self, actor: Actor, project: str, gpus: float | None) -> dict[str, Any]:
        """A steward caps the GPUs ``project``'s running jobs hold at once (None lifts it);
        jobs over it wait in the queue (``sandbox.gpu_quotas``)."""
        with self.ctx.act(actor, Action.PROJECT_GPU_QUOTA, project, {"gpus": gpus}):
            self.ctx.store.get_project(project)
            if gpus is not None and (gpus != gpus or gpus < 0 or gpus > 4096):
                raise SpecError("--gpus", "must be a number of GPUs >= 0", "e.g. --gpus 2")
            self.ctx.quotas.set(project, gpus, by=actor.name)
            return {"project": project, "gpu_quota": gpus}

    def add_project_member(self, actor: Actor, project: str, user: str) -> ProjectRecord:
        """The project's owner adds a researcher or an analyst (an active user) to an active
        project; adding a member twice changes nothing. Stewards and operators are never
        members: they see every project already, and their role may not spend."""
        with self.ctx.act(actor, Action.PROJECT_MEMBER_ADD, project, {"member": user}):
            self._check_owner(actor, self.ctx.store.get_project(project), "add members")
            try:
                role = self.ctx.store.get_user(user).role
            except NotFoundError:
                raise NotFoundError(f"unknown user {user!r}; an operator adds users") from None
            if role not in (Role.RESEARCHER, Role.ANALYST):
                raise PolicyDenied(
                    f"{user} is a {role.value}; project members are researchers and analysts",
                    missing=(f"role researcher or analyst for {user}",),
                    grantor=ROLE_GRANTOR,
                )
            # the store checks the user is active and the project still active
            return self.ctx.store.add_member(project, user, actor.name)

    def close_project(self, actor: Actor, name: str) -> ProjectRecord:
        """The project's owner closes it: it keeps its history, takes no new members, files
        no access request and runs no job (``decide_job_access`` refuses a closed project);
        its grants are not revoked (a steward's call) and still count against their
        datasets' caps."""
        with self.ctx.act(actor, Action.PROJECT_CLOSE, name):
            self._check_owner(actor, self.ctx.store.get_project(name), "close it")
            return self.ctx.store.close_project(name)

    def show_request(self, actor: Actor, request_id: str) -> AccessRequestRecord:
        """One access request whole (its columns, mechanisms, budget, state, who decided it
        when and why, the quote attached, its grant): for the project's members, stewards
        and operators."""
        with self.ctx.act(actor, Action.ACCESS_LIST, request_id) as extra:
            req = self.ctx.store.get_request(request_id)
            extra.update(project=req.project)
            self.ctx.check_member(actor, req.project)
            return req

    def list_grants(
        self, actor: Actor, project: str | None = None, dataset: str | None = None
    ) -> list[dict[str, Any]]:
        """Grants, oldest first, each marked ``revoked`` and ``live`` at the service's clock:
        every grant for stewards and operators, those of the actor's projects for everyone
        else (naming a project the actor is not a member of is refused)."""
        details: dict[str, Any] = {"grants": True}
        details.update({k: v for k, v in (("project", project), ("dataset", dataset)) if v})
        with self.ctx.act(actor, Action.ACCESS_LIST, project or "", details):
            if project is not None:
                self.ctx.store.get_project(project)
                self.ctx.check_member(actor, project)
            if dataset is not None:
                self.ctx.store.get_dataset(dataset)
            grants = self.ctx.store.list_grants(project, dataset)
            if not sees_everything(actor.role):
                mine = {p.name for p in self.ctx.store.list_projects(actor.name)}
                grants = [g for g in grants if g.project in mine]
            now = self.ctx.clock()
            return [self._grant_row(g, now) for g in grants]

    def dataset_caps(self, actor: Actor, dataset: str) -> dict[str, Any]:
        """``dataset``'s zone-wide cap now (``None`` if never set), every cap set on it
        (oldest first), one person's worst case at the service's clock, the ``epsilon_left``
        under the cap and ``over_cap``; sets nothing (stewards and operators)."""
        with self.ctx.act(actor, Action.DATASET_CAP_SHOW, dataset):
            cap = self.ctx.store.dataset_cap(dataset)
            history = self.ctx.store.dataset_cap_history(dataset)
            worst = self.ctx.store.worst_case(dataset, self.ctx.clock())
            left = None if cap is None else max(cap.epsilon - worst.epsilon, 0.0)
            over = cap is not None and (
                not within_cap(worst.epsilon, cap.epsilon)
                or (cap.delta is not None and not within_cap(worst.delta, cap.delta))
            )
            return {
                "dataset": dataset,
                "cap": cap,
                "history": history,
                "worst_case": worst,
                "epsilon_left": left,
                "over_cap": over,
            }

    @staticmethod
    def _check_owner(actor: Actor, project: ProjectRecord, what: str) -> None:
        if actor.name != project.owner:
            raise PolicyDenied(
                f"{actor.name} is not the owner of project {project.name}; only the project"
                f" owner may {what}",
                missing=(f"ownership of project {project.name}",),
                grantor="project owner",
            )

    @staticmethod
    def _grant_row(grant: GrantRecord, now: datetime) -> dict[str, Any]:
        return {
            **grant.to_dict(),
            "revoked": grant.revoked_at is not None,
            "live": grant.view().live_at(now),
        }
