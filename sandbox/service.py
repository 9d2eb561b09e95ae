"""The one service layer. Every command (CLI today, HTTP later) is a call here.

Each call takes the authenticated user, asks ``policies`` (role x action, then the grant
decision for data access), has ``privacy`` charge the ledger, and has the backend schedule
the job. Every call, allowed or refused, leaves one audit event. Nothing outside this class
decides access.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.errors import (
    ComputeError,
    IntegrityError,
    NotFoundError,
    PolicyDenied,
    SpecError,
    UserError,
    ZoneError,
)
from connectors.schema import SchemaContract
from policies.audit import AuditLog
from policies.decisions import (
    JobAccessRequest,
    Mechanism,
    decide_job_access,
    ledger_grant_id,
)
from policies.roles import Action, Role, require
from policies.store import StateStore
from privacy.ledger import BudgetKey, Ledger
from privacy.sql import make_engine
from sandbox.backend import InProcessBackend, JobBackend, Resources
from sandbox.disclosure import dataset_view, job_view, redact_counts, sees_everything
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
            cross_site_persons=report.cross_site_persons,
        )

    def list_datasets(self, actor: Any) -> list[dict[str, Any]]:
        """Dataset cards as the actor may see them (``sandbox.disclosure.dataset_view``)."""
        with self._act(actor, Action.DATASET_LIST):
            return [dataset_view(d, role=actor.role) for d in self.store.list_datasets()]

    def show_dataset(self, actor: Any, name: str) -> dict[str, Any]:
        with self._act(actor, Action.DATASET_SHOW, name):
            return dataset_view(self.store.get_dataset(name), role=actor.role)

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
        self, actor: Any, dataset: str, epsilon: float, delta: float | None = None
    ) -> dict[str, Any]:
        """Cap what one person of ``dataset`` may be charged across every project (a steward's
        call). Returns the cap, one person's current worst case (``store.worst_case``: live
        grants in full, expired and revoked ones by what the ledger shows they spent or
        reserved), the ``epsilon_left`` under the cap and ``over_cap``: true when that already
        goes over the new cap (the grants stay, and every new grant on the dataset is refused
        until the worst case is back under it)."""
        from policies.decisions import within_cap

        details = {"epsilon": epsilon, "delta": delta}
        with self._act(actor, Action.DATASET_CAP, dataset, details) as extra:
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
        """Decide, plan, reserve, schedule, wait, charge. Returns the finished job record.

        Everything up to the hand-over to compute runs inside one guard: a failure after the
        ledger reserved (a payload that cannot be built, a job row that cannot be written)
        releases every reservation and fails the job, so nothing stays reserved or queued.
        """
        from sandbox import federated_run
        from sandbox.jobs import new_job_id
        from sandbox.worker import run_dpsgd_job

        federated = spec.mode is Mode.FEDERATED
        mechanism = Mechanism.FEDERATED if federated else Mechanism.DP_SGD
        job_id = new_job_id()
        details = {"dataset": spec.dataset, "epsilon": spec.privacy.epsilon, "mode": str(spec.mode)}
        reservations: dict[str, str] = {}
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
            # plan before reserving: a spec the planner refuses never holds budget
            fed_plan = federated_run.plan_sites(spec, dataset) if federated else None
            if fed_plan is None:
                self._check_batch_size(spec, dataset)
            resources = Resources(cpus=spec.resources.cpus, gpus=spec.resources.gpus)
            self.backend.check_resources(resources)
            try:
                # chokepoint 2: the ledger reserves before the job may run
                if fed_plan is not None:
                    reservations = federated_run.reserve_sites(
                        self, actor, spec, fed_plan.sites, job_id
                    )
                else:
                    reservations = {
                        "": self.ledger.reserve(
                            BudgetKey(spec.project, spec.dataset),
                            spec.privacy.epsilon,
                            spec.privacy.delta,
                            job_id=job_id,
                            actor=actor.name,
                        )
                    }
                self.jobs.create(
                    project=spec.project,
                    dataset=spec.dataset,
                    user=actor.name,
                    spec=spec.to_dict(),
                    spec_hash=spec.spec_hash(),
                    reservation_id=None if fed_plan is not None else reservations[""],
                    job_id=job_id,
                )
                if fed_plan is not None:
                    payload_path = federated_run.build_payload(
                        self, spec, contract.to_dict(), dataset.path, fed_plan, job_id
                    )
            except Exception as exc:
                self._abandon(actor, job_id, reservations, exc)
                if isinstance(exc, ZoneError):
                    raise
                raise ComputeError(
                    f"the job could not be prepared ({type(exc).__name__}); nothing was charged",
                    retryable=True,
                ) from None
            extra.update(job=job_id, grant=decision.grant_id or "", backend=self.backend.name)
        if fed_plan is not None:
            done = federated_run.run_federated(
                self, actor, job_id, spec, payload_path, reservations, on_progress
            )
            return self._job_view(actor, done)
        payload = {
            "zone_root": str(self.zone.root),
            "db_url": self.zone.db_url,
            "job_id": job_id,
            "spec": spec.to_dict(),
            "contract": contract.to_dict(),
            "dataset_path": dataset.path,
        }
        return self._run(actor, job_id, payload, resources, on_progress, run_dpsgd_job)

    def _check_batch_size(self, spec: JobSpec, dataset: Any) -> None:
        """Refuse a batch larger than the training split before anything is reserved, when
        the counts are public (with private counts this check would be a free oracle on the
        exact size: the worker checks after reading instead, and the job is charged)."""
        from sandbox.service_synth import TRAIN_FRACTION

        if not dataset.counts_public:
            return
        n_train = int(dataset.persons * TRAIN_FRACTION)
        if spec.training.batch_size > n_train:
            raise SpecError(
                "training.batch_size",
                f"is larger than the training split ({n_train} persons)",
                f"set batch_size <= {n_train}",
            )

    def _abandon(
        self, actor: Any, job_id: str, reservations: Mapping[str, str], exc: BaseException
    ) -> None:
        """Undo a submit that failed before compute got the job: no row was read."""
        kind = exc.kind if isinstance(exc, ZoneError) else type(exc).__name__
        for rid in reservations.values():
            self.ledger.release(rid, actor=actor.name, reason=f"submit failed ({kind})")
        try:
            rec = self.jobs.get(job_id)
        except NotFoundError:
            return
        if rec.state not in (JobState.SUCCEEDED, JobState.FAILED):
            message = str(exc) if isinstance(exc, ZoneError) else f"submit failed ({kind})"
            self.jobs.move(job_id, JobState.FAILED, error=message)
        self.audit.append(
            actor.name, "job.fail", "error", job_id, {"error": kind, "ledger": "released"}
        )

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

        from sandbox.worker import NOISE_SECRET_KEY, new_noise_secret

        # every run draws its noise from a secret of its own (chokepoint 9)
        payload = {**payload, NOISE_SECRET_KEY: new_noise_secret()}
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
        return self._job_view(actor, self._finish(actor, job_id, result))

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
        result = dict(result)
        if not self.store.get_dataset(rec.dataset).counts_public:
            # the accountant's figure is a function of the exact training size: with private
            # counts the job is charged (and shows) what was reserved, an upper bound
            result["epsilon"] = self.ledger.reservation(rec.reservation_id).epsilon
        # chokepoint 3: commit the charge before anything can be released
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
        result["ledger_event"] = event.event_id
        result["audit_seq"] = audit.seq
        result["audit_hash"] = audit.hash
        dataset = self.store.get_dataset(rec.dataset)
        if result.get("kind") == "synthetic":
            card = write_synth_card(self.zone.job_dir(job_id), rec, result)
        else:
            card = write_model_card(
                self.zone.job_dir(job_id), rec, dataset, result, backend=self.backend.name
            )
        if not dataset.counts_public:
            # the card leaves the zone: no figure that gives the exact size back
            card.write_text(json.dumps(redact_counts(json.loads(card.read_text())), indent=2))
        return self.jobs.move(job_id, JobState.SUCCEEDED, result=result)

    def list_jobs(self, actor: Any) -> list[JobRecord]:
        with self._act(actor, Action.JOB_LIST):
            if sees_everything(actor.role):
                return self.jobs.list()
            return [self._job_view(actor, j) for j in self.jobs.list(user=actor.name)]

    def job_status(self, actor: Any, job_id: str) -> JobRecord:
        with self._act(actor, Action.JOB_STATUS, job_id):
            rec = self.jobs.get(job_id)
            self._check_member(actor, rec.project)
            return self._job_view(actor, rec)

    def _job_view(self, actor: Any, rec: JobRecord) -> JobRecord:
        counts_public = self.store.get_dataset(rec.dataset).counts_public
        return job_view(rec, role=actor.role, counts_public=counts_public)

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
        with self._act(actor, Action.AUDIT_VERIFY) as extra:
            report = self.audit.verify()
            # the action ran ("ok"); whether the chain held is part of the record
            extra.update(chain_ok=bool(report.ok))
            return report
