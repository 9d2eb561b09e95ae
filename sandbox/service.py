"""The one service layer. Every command (CLI today, HTTP later) is a call here.

Each call takes the authenticated ``Actor``, asks ``policies`` (role x action, then the
grant decision for data access), has ``privacy`` charge the ledger, and hands jobs to the
one job runner (``sandbox.runner``), which drives every mechanism (``sandbox.mechanisms``)
through the same persisted lifecycle. Every call, allowed or refused, leaves one audit
event. Nothing outside the service, its runner and its mechanisms decides access.

Importing this module loads the control plane only (the state store, the ledger, the audit
log, the access decisions). The data plane (ingest and deletion of files, the mechanisms,
synthetic data, dry runs, quotes) is imported where a call first needs it
(``sandbox.mechanisms.mechanism``, ``Service.synth``, the dataset calls): most CLI commands
only read the zone's state, and numpy and Arrow were ~0.2 s of a read command's ~0.6 s.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from connectors.schema import SchemaContract
from foundation.clock import utcnow
from foundation.errors import (
    NEEDS_TOKEN,
    IntegrityError,
    PolicyDenied,
    SpecError,
    ZoneError,
)
from foundation.sql import make_engine
from policies.audit import AuditLog
from policies.db import create_schema
from policies.roles import Action, Actor, Role
from policies.store import StateStore
from policies.store_logins import LoginStore
from privacy.budget_events import fold_balance
from privacy.ledger import Ledger
from sandbox.backend import InProcessBackend, JobBackend
from sandbox.budget_view import BudgetView, spent_by_mechanism
from sandbox.context import ProgressFn, ZoneContext
from sandbox.db_roles import grant_service_role, service_role_of
from sandbox.disclosure import dataset_view, sees_everything
from sandbox.jobs import JobRecord, JobState, JobStore
from sandbox.jobspec import JobSpec, Mode
from sandbox.login_policy import LoginPolicy
from sandbox.mechanisms.base import close_reservations, is_charged
from sandbox.query_releases import QueryReleases
from sandbox.release import RELEASED_FILES, SYNTH_FILES, release_artefacts
from sandbox.runner import JobRunner
from sandbox.schema_version import check_current
from sandbox.service_access import AccessCalls
from sandbox.service_login import Logins
from sandbox.service_query import QueryCalls
from sandbox.zone import DEFAULT_DB_URL, Zone

if TYPE_CHECKING:
    from sandbox.service_synth import SynthCalls


class Service(AccessCalls):
    def __init__(
        self,
        zone: Zone,
        backend: JobBackend | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        executor: Executor | None = None,
        check_schema: bool = True,
    ) -> None:
        """``executor``: where served mode runs jobs in the background (None: embedded, a
        job runs inside the call that submits it). ``check_schema=False`` only for
        ``init_zone``, which is making the schema."""
        self.engine = make_engine(zone.db_url)
        try:
            # a zone opens only its own database: the zone ids in zone.toml and in it agree
            self.zone = zone.check_database(self.engine)
            # a zone made by an older version opens only after `sandbox upgrade`
            if check_schema:
                check_current(self.engine)
            # the audit key lives outside the database (policies.audit): no key, no zone
            self.audit = AuditLog(self.engine, key=zone.audit_key(), head_path=zone.audit_head_path)
        except BaseException:
            self.engine.dispose()
            raise
        self.store = StateStore(self.engine)
        self.ledger = Ledger(self.engine)
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
        self.runner = JobRunner(self.ctx, executor)
        # analysts' DP queries, answered in this process (``sandbox.service_query``)
        self.queries = QueryCalls(self.ctx, QueryReleases(self.engine))
        # token expiry and second factors (zone.toml [login])
        self.logins = Logins(self.ctx, LoginStore(self.engine), LoginPolicy.of_zone(zone.root))

    # -- set-up ---------------------------------------------------------------------------

    @classmethod
    def init_zone(
        cls,
        root: Path,
        backend: JobBackend | None = None,
        db_url: str | None = None,
        service_db_url: str | None = None,
    ) -> tuple[Service, str]:
        """Create a zone and its operator; returns the service and the operator's token.

        With ``service_db_url`` (PostgreSQL) ``db_url`` is the schema owner's: the schema is
        made as the owner, the service's role gets only its rights (``sandbox.db_roles``) and
        the zone is written to run as the service's role from then on."""
        role = None
        if service_db_url is not None:
            role = service_role_of(service_db_url)
            if role == make_url(db_url or DEFAULT_DB_URL).username:
                raise SpecError(
                    "--service-db-url",
                    "logs in as the schema's owner, so it could rewrite history",
                    "give the service its own database role",
                )
        zone = Zone.create(root, db_url)
        svc = cls(zone, backend, check_schema=False)
        svc.store.create_schema()
        svc.ledger.create_schema()
        create_schema(svc.engine)
        svc.jobs.create_schema()
        svc.queries.releases.create_schema()
        # the whole schema, made at once, is the newest revision (Alembic is imported here,
        # not with the service: every other command only checks the revision)
        from sandbox.schema_upgrade import stamp_head

        stamp_head(svc.engine)
        user, token = svc.store.add_user("operator", Role.OPERATOR)
        svc.logins.store.set_expiry(user.name, svc.logins.expiry(None))
        svc.audit.append(user.name, "zone.init", "ok", str(zone.root))
        if role is None or service_db_url is None:
            return svc, token
        grant_service_role(svc.engine, role)
        svc.audit.append(user.name, "zone.db_role", "ok", role, {"rights": "least privilege"})
        svc.close()
        return cls(zone.use_db_url(service_db_url), backend), token

    def close(self) -> None:
        self.backend.shutdown()
        self.engine.dispose()

    # -- identity ---------------------------------------------------------------------------

    def authenticate(self, token: str | None, otp: str | None = None, **kw: Any) -> Actor:
        return self.login(token, otp, **kw)[0]

    def login(
        self,
        token: str | None,
        otp: str | None = None,
        *,
        session: str | None = None,
        enrolling: bool = False,
    ) -> tuple[Actor, str | None]:
        """The caller, and a new login session when a one-time code was used
        (``sandbox.service_login``); ``enrolling``: a call that sets up a second factor."""
        if not token:
            self.audit.append("anonymous", "auth", "denied", "", {"reason": "no token"})
            raise PolicyDenied("no token given", missing=(NEEDS_TOKEN,), grantor="operator")
        try:
            user = self.store.authenticate(token)
        except ZoneError:
            self.audit.append(
                "anonymous", "auth", "denied", "", {"reason": "unknown or revoked token"}
            )
            raise
        opened = self.logins.check(user, token, otp, session, enrolling=enrolling)
        return Actor(user.name, user.role), opened

    def add_user(
        self, actor: Actor, name: str, role: str, expires_in: int | None = None
    ) -> tuple[Any, str]:
        """``expires_in``: days the token lives (else the zone's ``[login] token_days``)."""
        with self.ctx.act(actor, Action.USER_ADD, name, {"role": role}):
            expires = self.logins.expiry(expires_in)
            try:
                r = Role(role)
            except ValueError:
                raise SpecError(
                    "--role",
                    "is not a known role",
                    f"use one of: {', '.join(x.value for x in Role)}",
                ) from None
            user, token = self.store.add_user(name, r)
            self.logins.store.set_expiry(name, expires)
            return user, token

    def revoke_user(self, actor: Actor, name: str) -> None:
        with self.ctx.act(actor, Action.USER_REVOKE, name):
            self.store.revoke_user(name)

    def totp_enrol(self, actor: Actor) -> dict[str, Any]:
        """A second factor for the caller: its secret, shown once, until confirmed."""
        return self.logins.enrol(actor)

    def totp_confirm(self, actor: Actor, code: str) -> dict[str, Any]:
        return self.logins.confirm(actor, code)

    def list_users(self, actor: Actor) -> list[Any]:
        with self.ctx.act(actor, Action.USER_LIST):
            return self.store.list_users()

    # -- datasets ---------------------------------------------------------------------------

    def ingest_dataset(
        self, actor: Actor, name: str, source: Path, contract: SchemaContract
    ) -> dict[str, Any]:
        """A new dataset, or the next version of a live one (``sandbox.dataset_ingest``)."""
        from sandbox import dataset_ingest  # the data plane, on first use (module docstring)

        return dataset_ingest.ingest_dataset(self.ctx, actor, name, source, contract)

    def ingest_demo(
        self, actor: Actor, name: str, patients: int, seed: int = 0, canaries: Any = None
    ) -> Any:
        from sandbox import dataset_ingest  # the data plane, on first use (module docstring)

        return dataset_ingest.ingest_demo(self.ctx, actor, name, patients, seed, canaries)

    def list_datasets(self, actor: Actor) -> list[dict[str, Any]]:
        """Dataset cards as the actor may see them (``sandbox.disclosure.dataset_view``)."""
        with self.ctx.act(actor, Action.DATASET_LIST):
            return [dataset_view(d, role=actor.role) for d in self.store.list_datasets()]

    def delete_dataset(self, actor: Actor, name: str, version: int | None = None) -> dict[str, Any]:
        """Delete a dataset: its files and data key go, its history stays (stewards)."""
        from sandbox.dataset_delete import delete_dataset  # the data plane, on first use

        return delete_dataset(self.ctx, actor, name, version)

    def show_dataset(self, actor: Actor, name: str, version: int | None = None) -> dict[str, Any]:
        """The latest version's card, or the ``version`` named, with the list of versions."""
        with self.ctx.act(actor, Action.DATASET_SHOW, name):
            view = dataset_view(self.store.get_dataset(name, version=version), role=actor.role)
            view["versions"] = self.store.list_dataset_versions(name)
            return view

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self,
        actor: Actor,
        spec: JobSpec,
        *,
        on_progress: ProgressFn | None = None,
        wait: bool = True,
    ) -> JobRecord:
        """Decide, plan, reserve, run and charge a DP-SGD or federated job; its final record
        (with ``wait=False`` in served mode: its QUEUED record, the job runs in the service)."""
        kind = "federated" if spec.mode is Mode.FEDERATED else "dp-sgd"
        details = {"dataset": spec.dataset, "epsilon": spec.privacy.epsilon, "mode": str(spec.mode)}
        job = self.runner.submit(
            kind,
            actor,
            spec,
            target=spec.project,
            details=details,
            on_progress=on_progress,
            wait=wait,
        )
        return self.ctx.job_view(actor, job)

    def cancel_job(self, actor: Actor, job_id: str) -> JobRecord:
        """Cancel a job. A queued one ends at once and its reservations are released (no row
        was read). A running one (served mode; DP-SGD, synthesis and dry runs) has its worker
        stopped and then fails like any failure: its reservation is committed if the worker
        had opened its rows. The record returned is the job's state after the request."""

        with self.ctx.act(actor, Action.JOB_CANCEL, job_id) as extra:
            rec = self.jobs.get(job_id)
            self.ctx.check_member(actor, rec.project)
            if rec.submitted_by != actor.name:
                raise PolicyDenied(
                    f"job {job_id} was submitted by someone else",
                    missing=("being the job's submitter",),
                    grantor="the job's submitter",
                )
            # the job leaves QUEUED first (one conditional update): a runner about to start
            # it then finds it FAILED and never hands it to compute, so no row is read
            moved = self.jobs.move_if(
                job_id, JobState.QUEUED, JobState.FAILED, error="cancelled by its submitter"
            )
            if moved is not None:
                error = SpecError("JOB", "cancelled by its submitter")
                ledger = close_reservations(self.ctx, actor, moved, opened=False, error=error)
                extra.update(ledger=ledger)
                return self.ctx.job_view(actor, moved)
            rec = self.jobs.get(job_id)
            if rec.state is JobState.RUNNING and self.runner.request_stop(job_id):
                extra.update(stop="requested")
                return self.ctx.job_view(actor, rec)
            if rec.state is JobState.RUNNING:
                how = (
                    "a federated job runs to its end"
                    if rec.spec.get("mode") == "federated"
                    else "it runs in the process that submitted it (embedded mode): stop it "
                    "there with Ctrl-C"
                )
                raise SpecError("JOB", f"job {job_id} is running and cannot be stopped here", how)
            raise SpecError(
                "JOB", f"job {job_id} is {rec.state}; it has ended", "nothing to cancel"
            )

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
            # the gate checks what each file holds, against what the job's spec and the
            # dataset's contract say it must hold (a bad worker could write rows under a
            # released name); a refusal raises IntegrityError, audited as an error by act()
            from sandbox.release_check import expected_release

            contract = self.ctx.job_dataset(rec, include_deleted=True).contract
            expected = expected_release(job_id, rec.spec, result, contract)
            files = release_artefacts(self.zone.job_dir(job_id), out, names, expected=expected)
            extra.update(files=len(files))
            return {"job": job_id, "out": str(out), "files": [str(f) for f in files]}

    # -- synthetic data, dry runs, quotes (``SynthCalls``) -------------------------------------

    @cached_property
    def synth(self) -> SynthCalls:
        """Synthetic data, dry runs, quotes and tuning (``sandbox.service_synth``), built on
        first use: they bring the planners and the synthesizers (module docstring)."""
        from sandbox.service_synth import SynthCalls

        return SynthCalls(self.ctx, self.runner)

    def synth_dummy(
        self, actor: Actor, dataset: str, rows: int, out: Path, seed: int = 0
    ) -> dict[str, Any]:
        return self.synth.synth_dummy(actor, dataset, rows, out, seed)

    def synth_fit(self, actor: Actor, project: str, dataset: str, **kw: Any) -> JobRecord:
        return self.synth.synth_fit(actor, project, dataset, **kw)

    def whoami(self, actor: Actor) -> Actor:
        """The caller as the zone knows them (any authenticated user)."""
        return actor

    def synth_report(self, actor: Actor, job_id: str) -> dict[str, Any]:
        return self.synth.synth_report(actor, job_id)

    def synth_release(self, actor: Actor, job_id: str, *, rows: bool = False) -> JobRecord:
        return self.synth.synth_release(actor, job_id, rows=rows)

    def dry_run(
        self, actor: Actor, spec: JobSpec, on: str, *, on_progress: ProgressFn | None = None
    ) -> JobRecord:
        return self.synth.dry_run(actor, spec, on, on_progress=on_progress)

    def quote(self, actor: Actor, spec: JobSpec, for_request: bool = False) -> dict[str, Any]:
        return self.synth.quote(actor, spec, for_request)

    def quote_curve(self, actor: Actor, spec: JobSpec, on: str, out_dir: Path, **kw: Any) -> Any:
        return self.synth.quote_curve(actor, spec, on, out_dir, **kw)

    def tune(self, actor: Actor, spec: JobSpec, on: str | None = None) -> dict[str, Any]:
        """The search that chooses a spec's "auto" hyperparameters on free rows (no charge)."""
        return self.synth.tune(actor, spec, on)

    # -- budget and audit --------------------------------------------------------------------

    def budget(self, actor: Actor, project: str) -> list[Any]:
        """Each budget key's balance, with what each mechanism spent of it (``spent_by``:
        training, federated, synthetic data and DP queries side by side)."""
        with self.ctx.act(actor, Action.BUDGET_SHOW, project):
            self.store.get_project(project)
            self.ctx.check_member(actor, project)
            # one read of the project's events: each key's balance and its split are folded
            # from it (``fold_balance`` filters by key)
            events = self.ledger.project_events(project)
            return [
                BudgetView.of(
                    fold_balance(key, events),
                    spent_by_mechanism([e for e in events if e.key == key], self.jobs),
                )
                for key in sorted({e.key for e in events})
            ]

    # -- DP queries (``sandbox.service_query``) ----------------------------------------------

    def run_query(
        self, actor: Actor, project: str, query: Any, dry: bool = False
    ) -> dict[str, Any]:
        return self.queries.run_query(actor, project, query, dry)

    def list_queries(self, actor: Actor, project: str) -> list[dict[str, Any]]:
        return self.queries.list_queries(actor, project)

    def audit_list(self, actor: Actor, limit: int = 100) -> list[Any]:
        with self.ctx.act(actor, Action.AUDIT_LIST):
            return self.audit.list(limit=limit)

    def audit_verify(self, actor: Actor) -> Any:
        with self.ctx.act(actor, Action.AUDIT_VERIFY) as extra:
            report = self.audit.verify()
            # the action ran ("ok"); whether the chain held is part of the record
            extra.update(chain_ok=bool(report.ok))
            return report

    def reissue_token(
        self, actor: Actor, name: str, expires_in: int | None = None
    ) -> dict[str, Any]:
        """A new token for ``name`` (an operator's call), shown once: the old one stops
        working. A revoked user is active again (``reactivated``). Their second factor is
        cleared (a lost phone is why one asks): they enrol again."""
        with self.ctx.act(actor, Action.USER_REISSUE, name) as extra:
            expires = self.logins.expiry(expires_in)
            was_active = self.store.get_user(name).active
            user, token = self.store.reissue_token(name)
            self.logins.store.set_expiry(name, expires)
            self.logins.store.clear_totp(name)
            extra.update(reactivated=not was_active)
            return {
                "user": user,
                "token": token,
                "reactivated": not was_active,
                "expires_at": expires.isoformat(),
            }
