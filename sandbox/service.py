"""The one service layer. Every command (CLI today, HTTP later) is a call here.

Each call takes the authenticated user, asks ``policies`` (role x action, then the grant
decision for data access), has ``privacy`` charge the ledger, and has the backend schedule
the job. Every call, allowed or refused, leaves one audit event. Nothing outside this class
decides access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.errors import (
    IntegrityError,
    NotFoundError,
    PolicyDenied,
    SpecError,
    UserError,
    ZoneError,
)
from connectors.schema import SchemaContract
from policies.audit import AuditLog
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Action, Role, require
from policies.store import StateStore
from privacy.ledger import BudgetKey, Ledger
from privacy.sql import make_engine
from sandbox.backend import InProcessBackend, JobBackend, Resources
from sandbox.jobs import JobRecord, JobState, JobStore
from sandbox.jobspec import JobSpec, Mode
from sandbox.release import RELEASED_FILES, SYNTH_FILES, write_model_card, write_synth_card
from sandbox.service_synth import SyntheticDataCalls
from sandbox.zone import Zone

ProgressFn = Callable[[dict[str, Any]], None]


def _now() -> datetime:
    return datetime.now(UTC)


class Service(SyntheticDataCalls):
    def __init__(
        self,
        zone: Zone,
        backend: JobBackend | None = None,
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.zone = zone
        self.engine = make_engine(zone.db_url)
        self.store = StateStore(self.engine)
        self.ledger = Ledger(self.engine)
        self.audit = AuditLog(self.engine)
        self.jobs = JobStore(self.engine)
        self.backend = backend or InProcessBackend()
        self.clock = clock

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
        svc.audit_schema()
        svc.jobs.create_schema()
        user, token = svc.store.add_user("operator", Role.OPERATOR)
        svc.audit.append(user.name, "zone.init", "ok", str(zone.root))
        return svc, token

    def audit_schema(self) -> None:
        from policies.db import create_schema

        create_schema(self.engine)

    def close(self) -> None:
        self.backend.shutdown()
        self.engine.dispose()

    # -- identity ---------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Any:
        if not token:
            self.audit.append("anonymous", "auth", "denied", "", {"reason": "no token"})
            raise PolicyDenied(
                "no token given", missing=("SANDBOX_TOKEN or --token",), grantor="operator"
            )
        try:
            return self.store.authenticate(token)
        except ZoneError:
            self.audit.append(
                "anonymous", "auth", "denied", "", {"reason": "unknown or revoked token"}
            )
            raise

    @contextmanager
    def _act(
        self, user: Any, action: Action, target: str = "", details: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Check the role, run the body, write one audit event whatever happens."""
        extra: dict[str, Any] = dict(details or {})
        try:
            require(Role(user.role), action)
            yield extra
        except UserError as exc:
            extra["error"] = exc.kind
            self.audit.append(user.name, str(action), "denied", target, extra)
            raise
        except ZoneError as exc:
            extra["error"] = exc.kind
            self.audit.append(user.name, str(action), "error", target, extra)
            raise
        else:
            self.audit.append(user.name, str(action), "ok", target, extra)

    def add_user(self, actor: Any, name: str, role: str) -> tuple[Any, str]:
        with self._act(actor, Action.USER_ADD, name, {"role": role}):
            try:
                r = Role(role)
            except ValueError:
                raise SpecError(
                    "--role",
                    "is not a known role",
                    f"use one of: {', '.join(x.value for x in Role)}",
                ) from None
            return self.store.add_user(name, r)

    def revoke_user(self, actor: Any, name: str) -> None:
        with self._act(actor, Action.USER_REVOKE, name):
            self.store.revoke_user(name)

    def list_users(self, actor: Any) -> list[Any]:
        with self._act(actor, Action.USER_LIST):
            return self.store.list_users()

    # -- datasets ---------------------------------------------------------------------------

    def ingest_dataset(self, actor: Any, name: str, source: Path, contract: SchemaContract) -> Any:
        from connectors.ingest import ingest_file

        with self._act(actor, Action.DATASET_INGEST, name) as extra:
            self._check_new_dataset(name)
            report = ingest_file(source, contract, self.zone.dataset_dir(name), self.zone.secret())
            rec = self._register(actor, name, contract, report)
            extra.update(rows=report.rows, persons=report.persons)
            return rec

    def ingest_demo(
        self, actor: Any, name: str, patients: int, seed: int = 0, canaries: Any = None
    ) -> Any:
        from connectors.cohort import cohort_contract, generate_cohort
        from connectors.ingest import ingest_table

        with self._act(actor, Action.DATASET_INGEST, name, {"demo": True}) as extra:
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

    def _register(self, actor: Any, name: str, contract: SchemaContract, report: Any) -> Any:
        return self.store.register_dataset(
            name,
            contract.to_dict(),
            str(report.path),
            report.rows,
            report.persons,
            dict(report.sites),
            actor.name,
        )

    def list_datasets(self, actor: Any) -> list[Any]:
        with self._act(actor, Action.DATASET_LIST):
            return self.store.list_datasets()

    def show_dataset(self, actor: Any, name: str) -> Any:
        with self._act(actor, Action.DATASET_SHOW, name):
            return self.store.get_dataset(name)

    # -- projects and access ------------------------------------------------------------------

    def create_project(self, actor: Any, name: str, purpose: str) -> Any:
        with self._act(actor, Action.PROJECT_CREATE, name):
            return self.store.create_project(name, purpose, actor.name)

    def list_projects(self, actor: Any) -> list[Any]:
        with self._act(actor, Action.PROJECT_LIST):
            mine = None if Role(actor.role) in (Role.STEWARD, Role.OPERATOR) else actor.name
            return self.store.list_projects(mine)

    def request_access(
        self,
        actor: Any,
        project: str,
        dataset: str,
        columns: list[str],
        mechanisms: list[str],
        epsilon: float,
        delta: float,
        quote: dict[str, Any] | None = None,
    ) -> Any:
        with self._act(
            actor, Action.ACCESS_REQUEST, project, {"dataset": dataset, "epsilon": epsilon}
        ):
            pv = self.store.project_view(project)
            if actor.name not in pv.members:
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

    def list_requests(self, actor: Any, pending_only: bool = False) -> list[Any]:
        with self._act(actor, Action.ACCESS_LIST):
            if Role(actor.role) in (Role.STEWARD, Role.OPERATOR):
                return self.store.list_requests(pending_only=pending_only)
            mine = {p.name for p in self.store.list_projects(actor.name)}
            return [
                r for r in self.store.list_requests(pending_only=pending_only) if r.project in mine
            ]

    def approve(
        self,
        actor: Any,
        request_id: str,
        epsilon: float | None = None,
        delta: float | None = None,
        expires_at: datetime | None = None,
    ) -> Any:
        with self._act(actor, Action.ACCESS_APPROVE, request_id) as extra:
            if expires_at is not None and expires_at <= self.clock():
                raise SpecError("--expires", "is in the past", "give a future date (YYYY-MM-DD)")
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
                    (BudgetKey(grant.project, grant.dataset, s), f"{grant.id}@{s}") for s in sites
                ]
            for key, gid in keys:
                self.ledger.grant(key, grant.epsilon, grant.delta, actor=actor.name, grant_id=gid)
            extra.update(grant=grant.id, epsilon=grant.epsilon)
            return grant

    def deny(self, actor: Any, request_id: str, reason: str) -> Any:
        with self._act(actor, Action.ACCESS_DENY, request_id):
            if not reason.strip():
                raise SpecError(
                    "--reason", "is required", "say why, so the researcher can fix the request"
                )
            return self.store.deny(request_id, actor.name, reason)

    # -- jobs -------------------------------------------------------------------------------

    def submit(
        self, actor: Any, spec: JobSpec, *, on_progress: ProgressFn | None = None
    ) -> JobRecord:
        """Decide, reserve, schedule, wait, charge. Returns the finished job record."""
        from sandbox import federated_run
        from sandbox.jobs import new_job_id
        from sandbox.worker import run_dpsgd_job

        federated = spec.mode is Mode.FEDERATED
        mechanism = Mechanism.FEDERATED if federated else Mechanism.DP_SGD
        job_id = new_job_id()
        details = {"dataset": spec.dataset, "epsilon": spec.privacy.epsilon, "mode": str(spec.mode)}
        with self._act(actor, Action.JOB_SUBMIT, spec.project, details) as extra:
            dataset = self.store.get_dataset(spec.dataset)
            contract = SchemaContract.from_dict(dataset.contract)
            self._check_columns(spec, contract)
            # chokepoint 1: the access decision, before anything is reserved or opened
            decision = decide_job_access(
                JobAccessRequest(
                    user=actor.name,
                    role=Role(actor.role),
                    project=spec.project,
                    dataset=spec.dataset,
                    columns=spec.columns,
                    mechanism=mechanism,
                    epsilon=spec.privacy.epsilon,
                    delta=spec.privacy.delta,
                ),
                self.store.project_view(spec.project),
                self.store.grants_for(spec.project, spec.dataset),
                self.clock(),
            )
            if not decision.allowed:
                raise PolicyDenied(
                    decision.reason, missing=decision.missing, grantor=decision.grantor
                )
            resources = Resources(cpus=spec.resources.cpus, gpus=spec.resources.gpus)
            self.backend.check_resources(resources)
            # chokepoint 2: the ledger reserves before the job may run
            if federated:
                sites = federated_run.resolve_sites(spec, dict(dataset.sites))
                reservations = federated_run.reserve_sites(self, actor, spec, sites, job_id)
                reservation = None
            else:
                reservation = self.ledger.reserve(
                    BudgetKey(spec.project, spec.dataset),
                    spec.privacy.epsilon,
                    spec.privacy.delta,
                    job_id=job_id,
                    actor=actor.name,
                )
            self.jobs.create(
                project=spec.project,
                dataset=spec.dataset,
                user=actor.name,
                spec=spec.to_dict(),
                spec_hash=spec.spec_hash(),
                reservation_id=reservation,
                job_id=job_id,
            )
            extra.update(job=job_id, grant=decision.grant_id or "", backend=self.backend.name)
        if federated:
            payload_path = federated_run.build_payload(
                self, spec, contract.to_dict(), dataset.path, sites, job_id
            )
            return federated_run.run_federated(
                self, actor, job_id, spec, payload_path, reservations, on_progress
            )
        payload = {
            "zone_root": str(self.zone.root),
            "db_url": self.zone.db_url,
            "job_id": job_id,
            "spec": spec.to_dict(),
            "contract": contract.to_dict(),
            "dataset_path": dataset.path,
        }
        return self._run(actor, job_id, payload, resources, on_progress, run_dpsgd_job)

    def _check_columns(self, spec: JobSpec, contract: SchemaContract) -> None:
        known = {c.name for c in contract.columns}
        for field, cols in (("features", spec.features), ("label", (spec.label,))):
            for c in cols:
                if c not in known:
                    raise SpecError(
                        field,
                        f"column {c!r} is not in dataset {spec.dataset!r}",
                        f"known columns: {', '.join(sorted(known))}",
                    )
        if spec.label not in contract.label_names():
            raise SpecError(
                "label",
                f"column {spec.label!r} is not a label in the schema contract",
                f"labels: {', '.join(contract.label_names())}",
            )

    def _run(
        self,
        actor: Any,
        job_id: str,
        payload: dict[str, Any],
        resources: Resources,
        on_progress: ProgressFn | None,
        fn: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> JobRecord:
        last: dict[str, Any] = {}

        def poll() -> None:
            if on_progress is None:
                return
            rec = self.jobs.get(job_id)
            if rec.progress and rec.progress != last:
                last.clear()
                last.update(rec.progress)
                on_progress(dict(rec.progress))

        try:
            handle = self.backend.submit(fn, payload, resources)
            result = self.backend.wait(handle, poll=poll)
        except ZoneError as exc:
            self._fail(actor, job_id, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - translate, never show a raw message
            err = IntegrityError(f"the job failed in the service ({type(exc).__name__})")
            self._fail(actor, job_id, err)
            raise err from None
        return self._finish(actor, job_id, result)

    def _fail(self, actor: Any, job_id: str, exc: ZoneError) -> None:
        rec = self.jobs.get(job_id)
        rid = rec.reservation_id
        if rid is not None:
            r = self.ledger.reservation(rid)
            if rec.data_opened:
                # it touched real rows: keep the whole reservation as spent (we cannot prove less)
                self.ledger.commit(rid, r.epsilon, r.delta, actor=actor.name)
                charge = "committed"
            else:
                self.ledger.release(
                    rid, actor=actor.name, reason=f"failed before data ({exc.kind})"
                )
                charge = "released"
        else:
            charge = "none"
        if rec.state not in (JobState.SUCCEEDED, JobState.FAILED):
            self.jobs.move(job_id, JobState.FAILED, error=str(exc))
        self.audit.append(
            actor.name,
            "job.fail",
            "error",
            job_id,
            {"error": exc.kind, "ledger": charge, "data_opened": rec.data_opened},
        )

    def _finish(self, actor: Any, job_id: str, result: dict[str, Any]) -> JobRecord:
        rec = self.jobs.get(job_id)
        if rec.reservation_id is None:
            # a dry run (dummy or already-released synthetic data) or a steward's non-DP
            # synthesizer: nothing was charged; the latter's output is held for a steward
            self.audit.append(
                actor.name,
                "job.uncharged",
                "ok",
                job_id,
                {
                    "dry_run": bool(result.get("dry_run")),
                    "kind": str(result.get("kind", "dp-sgd")),
                },
            )
            return self.jobs.move(job_id, JobState.SUCCEEDED, result=result)
        # chokepoint 3: commit the accountant's figure before anything can be released
        event = self.ledger.commit(
            rec.reservation_id, float(result["epsilon"]), float(result["delta"]), actor=actor.name
        )
        audit = self.audit.append(
            actor.name,
            "job.charge",
            "ok",
            job_id,
            {
                "epsilon": float(result["epsilon"]),
                "delta": float(result["delta"]),
                "ledger_event": event.event_id,
            },
        )
        result = dict(result)
        result["ledger_event"] = event.event_id
        result["audit_seq"] = audit.seq
        result["audit_hash"] = audit.hash
        if result.get("kind") == "synthetic":
            write_synth_card(self.zone.job_dir(job_id), rec, result)
        else:
            dataset = self.store.get_dataset(rec.dataset)
            write_model_card(
                self.zone.job_dir(job_id), rec, dataset, result, backend=self.backend.name
            )
        return self.jobs.move(job_id, JobState.SUCCEEDED, result=result)

    def list_jobs(self, actor: Any) -> list[JobRecord]:
        with self._act(actor, Action.JOB_LIST):
            if Role(actor.role) in (Role.STEWARD, Role.OPERATOR):
                return self.jobs.list()
            return self.jobs.list(user=actor.name)

    def job_status(self, actor: Any, job_id: str) -> JobRecord:
        with self._act(actor, Action.JOB_STATUS, job_id):
            rec = self.jobs.get(job_id)
            self._check_member(actor, rec.project)
            return rec

    def job_result(self, actor: Any, job_id: str, out: Path) -> dict[str, Any]:
        """The release gate: only a succeeded job whose spend is committed leaves the zone."""
        from sandbox.release import release_artefacts

        with self._act(actor, Action.JOB_RESULT, job_id) as extra:
            rec = self.jobs.get(job_id)
            self._check_member(actor, rec.project)
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
            elif not result.get("dry_run") and not self._charged(rec):
                raise IntegrityError(
                    f"job {job_id} has no committed ledger charge; nothing is released"
                )
            names = SYNTH_FILES if result.get("kind") == "synthetic" else RELEASED_FILES
            files = release_artefacts(self.zone.job_dir(job_id), out, names)
            extra.update(files=len(files))
            return {"job": job_id, "out": str(out), "files": [str(f) for f in files]}

    def _charged(self, rec: JobRecord) -> bool:
        """Every reservation of the job is closed and at least one was committed."""
        if rec.reservation_id is not None:
            return self.ledger.reservation(rec.reservation_id).state.value == "committed"
        if any(r.job_id == rec.id for r in self.ledger.open_reservations()):
            return False
        return any(e.kind.value == "commit" and e.job_id == rec.id for e in self.ledger.events())

    def _check_member(self, actor: Any, project: str) -> None:
        if Role(actor.role) in (Role.STEWARD, Role.OPERATOR):
            return
        if actor.name not in self.store.project_view(project).members:
            raise PolicyDenied(
                f"{actor.name} is not a member of project {project}",
                missing=("project membership",),
                grantor="project owner",
            )

    # -- budget and audit --------------------------------------------------------------------

    def budget(self, actor: Any, project: str) -> list[Any]:
        with self._act(actor, Action.BUDGET_SHOW, project):
            self.store.get_project(project)
            self._check_member(actor, project)
            return self.ledger.balances(project)

    def audit_list(self, actor: Any, limit: int = 100) -> list[Any]:
        with self._act(actor, Action.AUDIT_LIST):
            return self.audit.list(limit=limit)

    def audit_verify(self, actor: Any) -> Any:
        with self._act(actor, Action.AUDIT_VERIFY):
            return self.audit.verify()
