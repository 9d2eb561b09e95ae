"""The one service layer. Every command (CLI today, HTTP later) is a call here.

Each call takes the authenticated ``Actor``, asks ``policies`` (role x action, then the
grant decision for data access), has ``privacy`` charge the ledger, and hands jobs to the
one job runner (``sandbox.runner``), which drives every mechanism (``sandbox.mechanisms``)
through the same persisted lifecycle. Every call, allowed or refused, leaves one audit
event. Nothing outside the service, its runner and its mechanisms decides access.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from connectors.cohort import cohort_contract, generate_cohort
from connectors.ingest import ingest_file, ingest_table
from connectors.schema import SchemaContract
from foundation.clock import utcnow
from foundation.errors import (
    IntegrityError,
    NotFoundError,
    PolicyDenied,
    SpecError,
    ZoneError,
)
from foundation.sql import make_engine
from policies.audit import AuditLog
from policies.caps import within_cap
from policies.db import create_schema
from policies.decisions import Mechanism
from policies.roles import ROLE_GRANTOR, Action, Actor, Role
from policies.store import StateStore
from policies.store_records import AccessRequestRecord, GrantRecord, ProjectRecord
from policies.worst_case import ledger_grant_id
from privacy.budget_events import BudgetKey
from privacy.ledger import Ledger
from sandbox.backend import InProcessBackend, JobBackend
from sandbox.context import ProgressFn, ZoneContext
from sandbox.disclosure import dataset_view, sees_everything
from sandbox.jobs import JobRecord, JobState, JobStore
from sandbox.jobspec import JobSpec, Mode
from sandbox.mechanisms.base import close_reservations, is_charged
from sandbox.release import RELEASED_FILES, SYNTH_FILES, release_artefacts
from sandbox.runner import JobRunner
from sandbox.service_synth import SynthCalls
from sandbox.zone import Zone


class Service:
    def __init__(
        self,
        zone: Zone,
        backend: JobBackend | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = make_engine(zone.db_url)
        try:
            # a zone opens only its own database: the zone ids in zone.toml and in it agree
            self.zone = zone.check_database(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self.store = StateStore(self.engine)
        self.ledger = Ledger(self.engine)
        self.audit = AuditLog(self.engine)
        self.jobs = JobStore(self.engine)
        self.backend = backend or InProcessBackend()
        self.clock = clock
        self.ctx = ZoneContext(
            zone=self.zone,
            store=self.store,
            ledger=self.ledger,
            audit=self.audit,
            jobs=self.jobs,
            backend=self.backend,
            # read through the service, so a clock set later (tests freeze time) holds
            clock=lambda: self.clock(),
        )
        self.runner = JobRunner(self.ctx)
        self.synth = SynthCalls(self.ctx, self.runner)

    # -- set-up ---------------------------------------------------------------------------

    @classmethod
    def init_zone(
        cls, root: Path, backend: JobBackend | None = None, db_url: str | None = None
    ) -> tuple[Service, str]:
        """Create a zone and its operator; returns the service and the operator's token."""

        zone = Zone.create(root, db_url)
        svc = cls(zone, backend)
        svc.store.create_schema()
        svc.ledger.create_schema()
        create_schema(svc.engine)
        svc.jobs.create_schema()
        user, token = svc.store.add_user("operator", Role.OPERATOR)
        svc.audit.append(user.name, "zone.init", "ok", str(zone.root))
        return svc, token

    def close(self) -> None:
        self.backend.shutdown()
        self.engine.dispose()

    # -- identity ---------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Actor:
        if not token:
            self.audit.append("anonymous", "auth", "denied", "", {"reason": "no token"})
            raise PolicyDenied(
                "no token given", missing=("SANDBOX_TOKEN or --token",), grantor="operator"
            )
        try:
            user = self.store.authenticate(token)
        except ZoneError:
            self.audit.append(
                "anonymous", "auth", "denied", "", {"reason": "unknown or revoked token"}
            )
            raise
        return Actor(user.name, user.role)

    def add_user(self, actor: Actor, name: str, role: str) -> tuple[Any, str]:
        with self.ctx.act(actor, Action.USER_ADD, name, {"role": role}):
            try:
                r = Role(role)
            except ValueError:
                raise SpecError(
                    "--role",
                    "is not a known role",
                    f"use one of: {', '.join(x.value for x in Role)}",
                ) from None
            return self.store.add_user(name, r)

    def revoke_user(self, actor: Actor, name: str) -> None:
        with self.ctx.act(actor, Action.USER_REVOKE, name):
            self.store.revoke_user(name)

    def list_users(self, actor: Actor) -> list[Any]:
        with self.ctx.act(actor, Action.USER_LIST):
            return self.store.list_users()

    # -- datasets ---------------------------------------------------------------------------

    def ingest_dataset(
        self, actor: Actor, name: str, source: Path, contract: SchemaContract
    ) -> Any:

        with self.ctx.act(actor, Action.DATASET_INGEST, name) as extra:
            self._check_new_dataset(name)
            report = ingest_file(source, contract, self.zone.dataset_dir(name), self.zone.secret())
            rec = self._register(actor, name, contract, report)
            extra.update(rows=report.rows, persons=report.persons)
            return rec

    def ingest_demo(
        self, actor: Actor, name: str, patients: int, seed: int = 0, canaries: Any = None
    ) -> Any:

        with self.ctx.act(actor, Action.DATASET_INGEST, name, {"demo": True}) as extra:
            if patients < 100:
                raise SpecError("--patients", "must be at least 100", "ask for more patients")
            self._check_new_dataset(name)
            contract = cohort_contract()
            table = generate_cohort(patients, seed=seed, canaries=canaries)
            report = ingest_table(table, contract, self.zone.dataset_dir(name), self.zone.secret())
            rec = self._register(actor, name, contract, report)
            extra.update(rows=report.rows, persons=report.persons)
            return rec

    def _check_new_dataset(self, name: str) -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise SpecError("NAME", "must be letters, digits, '-' or '_'", "e.g. cohort-2026")
        try:
            self.store.get_dataset(name)
        except NotFoundError:
            return
        raise SpecError("NAME", f"dataset {name!r} already exists", "pick another name")

    def _register(self, actor: Actor, name: str, contract: SchemaContract, report: Any) -> Any:
        return self.store.register_dataset(
            name,
            contract.to_dict(),
            str(report.path),
            report.rows,
            report.persons,
            dict(report.sites),
            actor.name,
            cross_site_persons=report.cross_site_persons,
        )

    def list_datasets(self, actor: Actor) -> list[dict[str, Any]]:
        """Dataset cards as the actor may see them (``sandbox.disclosure.dataset_view``)."""
        with self.ctx.act(actor, Action.DATASET_LIST):
            return [dataset_view(d, role=actor.role) for d in self.store.list_datasets()]

    def show_dataset(self, actor: Actor, name: str) -> dict[str, Any]:
        with self.ctx.act(actor, Action.DATASET_SHOW, name):
            return dataset_view(self.store.get_dataset(name), role=actor.role)

    # -- projects and access ------------------------------------------------------------------

    def create_project(self, actor: Actor, name: str, purpose: str) -> Any:
        with self.ctx.act(actor, Action.PROJECT_CREATE, name):
            return self.store.create_project(name, purpose, actor.name)

    def list_projects(self, actor: Actor) -> list[Any]:
        with self.ctx.act(actor, Action.PROJECT_LIST):
            mine = None if sees_everything(actor.role) else actor.name
            return self.store.list_projects(mine)

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
    ) -> Any:
        with self.ctx.act(
            actor, Action.ACCESS_REQUEST, project, {"dataset": dataset, "epsilon": epsilon}
        ):
            # a steward's or operator's view does not make them a member who may ask
            if actor.name not in self.store.project_view(project).members:
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
            return self.store.request_access(
                project, dataset, columns, mechs, epsilon, delta, actor.name, quote
            )

    def list_requests(self, actor: Actor, pending_only: bool = False) -> list[Any]:
        with self.ctx.act(actor, Action.ACCESS_LIST):
            if sees_everything(actor.role):
                return self.store.list_requests(pending_only=pending_only)
            mine = {p.name for p in self.store.list_projects(actor.name)}
            return [
                r for r in self.store.list_requests(pending_only=pending_only) if r.project in mine
            ]

    def approve(
        self,
        actor: Actor,
        request_id: str,
        epsilon: float | None = None,
        delta: float | None = None,
        expires_at: datetime | None = None,
    ) -> Any:
        with self.ctx.act(actor, Action.ACCESS_APPROVE, request_id) as extra:
            if expires_at is not None and expires_at <= self.clock():
                raise SpecError("--expires", "is in the past", "give a future date (YYYY-MM-DD)")
            # the dataset's zone-wide cap (every grant ever made on it, and what the ledger
            # shows spent under expired and revoked ones), decided before anything is written
            # (store.approve decides again in the transaction that writes the grant, against a
            # racing approval)
            cap = self.store.cap_decision(request_id, epsilon, delta, now=self.clock())
            extra.update(
                dataset=cap.dataset,
                worst_case_epsilon=cap.after.epsilon,
                **({} if cap.cap is None else {"cap_epsilon": cap.cap.epsilon}),
            )
            cap.raise_if_denied()
            grant = self.store.approve(
                request_id, actor.name, epsilon=epsilon, delta=delta, expires_at=expires_at
            )
            # the budget lives in the ledger; the grant row says what it covers. Federated
            # training spends per hospital (disjoint patients): one budget per site.
            keys = []
            if grant.mechanisms - {Mechanism.FEDERATED}:
                keys.append((BudgetKey(grant.project, grant.dataset), grant.id))
            if Mechanism.FEDERATED in grant.mechanisms:
                sites = sorted(self.store.get_dataset(grant.dataset).sites)
                keys += [
                    (BudgetKey(grant.project, grant.dataset, s), ledger_grant_id(grant.id, s))
                    for s in sites
                ]
            for key, gid in keys:
                self.ledger.grant(key, grant.epsilon, grant.delta, actor=actor.name, grant_id=gid)
            extra.update(grant=grant.id, epsilon=grant.epsilon)
            return grant

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
                cap = self.store.set_dataset_cap(dataset, epsilon, delta, by=actor.name)
            except SpecError as exc:  # name the CLI option, not the store's field
                raise SpecError(f"--{exc.field}", exc.problem, exc.fix) from None
            worst = self.store.worst_case(dataset, self.clock())
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
            return self.store.deny(request_id, actor.name, reason)

    def revoke_grant(self, actor: Actor, grant_id: str) -> Any:
        """A steward ends a grant now: no job, quote or synthesis may use it from here on
        (the access decision ignores revoked grants). What it already spent stays spent, and
        it counts against the dataset's cap (``policies.caps``)."""
        with self.ctx.act(actor, Action.ACCESS_REVOKE, grant_id) as extra:
            grant = self.store.revoke_grant(grant_id, actor.name)
            extra.update(project=grant.project, dataset=grant.dataset)
            return grant

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self, actor: Actor, spec: JobSpec, *, on_progress: ProgressFn | None = None
    ) -> JobRecord:
        """Decide, plan, reserve, run and charge a DP-SGD or federated job; its final record."""
        kind = "federated" if spec.mode is Mode.FEDERATED else "dp-sgd"
        details = {"dataset": spec.dataset, "epsilon": spec.privacy.epsilon, "mode": str(spec.mode)}
        job = self.runner.submit(
            kind, actor, spec, target=spec.project, details=details, on_progress=on_progress
        )
        return self.ctx.job_view(actor, job)

    def cancel_job(self, actor: Actor, job_id: str) -> JobRecord:
        """Cancel a job that has not started: its reservations are released (no row was
        read). A running job is refused: embedded mode runs it inside the submitting
        process, which alone can stop it (Ctrl-C there fails it and settles its charge)."""

        with self.ctx.act(actor, Action.JOB_CANCEL, job_id) as extra:
            rec = self.jobs.get(job_id)
            self.ctx.check_member(actor, rec.project)
            if rec.submitted_by != actor.name:
                raise PolicyDenied(
                    f"job {job_id} was submitted by someone else",
                    missing=("being the job's submitter",),
                    grantor="the job's submitter",
                )
            if rec.state is not JobState.QUEUED:
                raise SpecError(
                    "JOB",
                    f"job {job_id} is {rec.state}; only a queued job can be cancelled",
                    "a running job is stopped from the process that submitted it",
                )
            error = SpecError("JOB", "cancelled by its submitter")
            ledger = close_reservations(self.ctx, actor, rec, opened=False, error=error)
            extra.update(ledger=ledger)
            return self.jobs.move(job_id, JobState.FAILED, error="cancelled by its submitter")

    def list_jobs(self, actor: Actor) -> list[JobRecord]:
        with self.ctx.act(actor, Action.JOB_LIST):
            if sees_everything(actor.role):
                return self.jobs.list()
            return [self.ctx.job_view(actor, j) for j in self.jobs.list(user=actor.name)]

    def job_status(self, actor: Actor, job_id: str) -> JobRecord:
        with self.ctx.act(actor, Action.JOB_STATUS, job_id):
            rec = self.jobs.get(job_id)
            self.ctx.check_member(actor, rec.project)
            return self.ctx.job_view(actor, rec)

    def job_result(self, actor: Actor, job_id: str, out: Path) -> dict[str, Any]:
        """The release gate: only a succeeded job whose spend is committed leaves the zone."""

        with self.ctx.act(actor, Action.JOB_RESULT, job_id) as extra:
            rec = self.jobs.get(job_id)
            self.ctx.check_member(actor, rec.project)
            if rec.state is not JobState.SUCCEEDED:
                raise SpecError(
                    "JOB",
                    f"job {job_id} is {rec.state}, not succeeded",
                    "only succeeded jobs have a release",
                )
            result = rec.result or {}
            if result.get("kind") == "synthetic" and not result.get("dp"):
                if not result.get("steward_release"):
                    raise PolicyDenied(
                        f"job {job_id} made non-DP synthetic data; it leaves only with a steward's release",
                        missing=("steward release",),
                        grantor="data steward",
                    )
            elif not result.get("dry_run") and not is_charged(self.ctx, rec):
                raise IntegrityError(
                    f"job {job_id} has no committed ledger charge; nothing is released"
                )
            names = SYNTH_FILES if result.get("kind") == "synthetic" else RELEASED_FILES
            files = release_artefacts(self.zone.job_dir(job_id), out, names)
            extra.update(files=len(files))
            return {"job": job_id, "out": str(out), "files": [str(f) for f in files]}

    # -- synthetic data, dry runs, quotes (``SynthCalls``) -------------------------------------

    def synth_dummy(
        self, actor: Actor, dataset: str, rows: int, out: Path, seed: int = 0
    ) -> dict[str, Any]:
        return self.synth.synth_dummy(actor, dataset, rows, out, seed)

    def synth_fit(self, actor: Actor, project: str, dataset: str, **kw: Any) -> JobRecord:
        return self.synth.synth_fit(actor, project, dataset, **kw)

    def synth_report(self, actor: Actor, job_id: str) -> dict[str, Any]:
        return self.synth.synth_report(actor, job_id)

    def synth_release(self, actor: Actor, job_id: str, *, rows: bool = False) -> JobRecord:
        return self.synth.synth_release(actor, job_id, rows=rows)

    def dry_run(
        self, actor: Actor, spec: JobSpec, on: str, *, on_progress: ProgressFn | None = None
    ) -> JobRecord:
        return self.synth.dry_run(actor, spec, on, on_progress=on_progress)

    def quote(self, actor: Actor, spec: JobSpec) -> dict[str, Any]:
        return self.synth.quote(actor, spec)

    def quote_curve(self, actor: Actor, spec: JobSpec, on: str, out_dir: Path, **kw: Any) -> Any:
        return self.synth.quote_curve(actor, spec, on, out_dir, **kw)

    # -- budget and audit --------------------------------------------------------------------

    def budget(self, actor: Actor, project: str) -> list[Any]:
        with self.ctx.act(actor, Action.BUDGET_SHOW, project):
            self.store.get_project(project)
            self.ctx.check_member(actor, project)
            return self.ledger.balances(project)

    def audit_list(self, actor: Actor, limit: int = 100) -> list[Any]:
        with self.ctx.act(actor, Action.AUDIT_LIST):
            return self.audit.list(limit=limit)

    def audit_verify(self, actor: Actor) -> Any:
        with self.ctx.act(actor, Action.AUDIT_VERIFY) as extra:
            report = self.audit.verify()
            # the action ran ("ok"); whether the chain held is part of the record
            extra.update(chain_ok=bool(report.ok))
            return report

    # -- project show, members and closing; a request, the grants; token reissue; caps ------

    def show_project(self, actor: Actor, name: str) -> dict[str, Any]:
        """A project's purpose, owner, status and members, and every grant it was given
        (revoked and expired ones too, each marked ``revoked`` and ``live`` at the service's
        clock): for its members, stewards and operators."""
        with self.ctx.act(actor, Action.PROJECT_SHOW, name):
            rec = self.store.get_project(name)
            self.ctx.check_member(actor, name)
            now = self.clock()
            grants = [self._grant_row(g, now) for g in self.store.list_grants(project=name)]
            return {**rec.to_dict(), "grants": grants}

    def add_project_member(self, actor: Actor, project: str, user: str) -> ProjectRecord:
        """The project's owner adds a researcher or an analyst (an active user) to an active
        project; adding a member twice changes nothing. Stewards and operators are never
        members: they see every project already, and their role may not spend."""
        with self.ctx.act(actor, Action.PROJECT_MEMBER_ADD, project, {"member": user}):
            self._check_owner(actor, self.store.get_project(project), "add members")
            try:
                role = self.store.get_user(user).role
            except NotFoundError:
                raise NotFoundError(f"unknown user {user!r}; an operator adds users") from None
            if role not in (Role.RESEARCHER, Role.ANALYST):
                raise PolicyDenied(
                    f"{user} is a {role.value}; project members are researchers and analysts",
                    missing=(f"role researcher or analyst for {user}",),
                    grantor=ROLE_GRANTOR,
                )
            # the store checks the user is active and the project still active
            return self.store.add_member(project, user, actor.name)

    def close_project(self, actor: Actor, name: str) -> ProjectRecord:
        """The project's owner closes it: it keeps its history, takes no new members, files
        no access request and runs no job (``decide_job_access`` refuses a closed project);
        its grants are not revoked (a steward's call) and still count against their
        datasets' caps."""
        with self.ctx.act(actor, Action.PROJECT_CLOSE, name):
            self._check_owner(actor, self.store.get_project(name), "close it")
            return self.store.close_project(name)

    def show_request(self, actor: Actor, request_id: str) -> AccessRequestRecord:
        """One access request whole (its columns, mechanisms, budget, state, who decided it
        when and why, the quote attached, its grant): for the project's members, stewards
        and operators."""
        with self.ctx.act(actor, Action.ACCESS_LIST, request_id) as extra:
            req = self.store.get_request(request_id)
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
                self.store.get_project(project)
                self.ctx.check_member(actor, project)
            if dataset is not None:
                self.store.get_dataset(dataset)
            grants = self.store.list_grants(project, dataset)
            if not sees_everything(actor.role):
                mine = {p.name for p in self.store.list_projects(actor.name)}
                grants = [g for g in grants if g.project in mine]
            now = self.clock()
            return [self._grant_row(g, now) for g in grants]

    def reissue_token(self, actor: Actor, name: str) -> dict[str, Any]:
        """A new token for ``name`` (an operator's call), shown once: the old one stops
        working. A revoked user is active again (``reactivated``)."""
        with self.ctx.act(actor, Action.USER_REISSUE, name) as extra:
            was_active = self.store.get_user(name).active
            user, token = self.store.reissue_token(name)
            extra.update(reactivated=not was_active)
            return {"user": user, "token": token, "reactivated": not was_active}

    def dataset_caps(self, actor: Actor, dataset: str) -> dict[str, Any]:
        """``dataset``'s zone-wide cap now (``None`` if never set), every cap set on it
        (oldest first), one person's worst case at the service's clock, the ``epsilon_left``
        under the cap and ``over_cap``; sets nothing (stewards and operators)."""
        with self.ctx.act(actor, Action.DATASET_CAP_SHOW, dataset):
            cap = self.store.dataset_cap(dataset)
            history = self.store.dataset_cap_history(dataset)
            worst = self.store.worst_case(dataset, self.clock())
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
