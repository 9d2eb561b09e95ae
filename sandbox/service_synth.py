"""The service's synthetic-data, dry-run and quote calls (mixed into ``Service``).

- ``synth_dummy``: free dummy rows from the schema contract alone (no row is read).
- ``synth_fit``: DP synthetic data fitted inside the zone on real rows, charged like a job
  (decision -> reservation -> Ray worker -> commit); a steward may also fit SDV's non-DP
  synthesizers, whose output is held until the steward releases it.
- ``synth_report``: the steward sees the full report; the researcher sees the aggregate
  scores only after a steward released them (``synth_release_report``).
- ``submit(..., on=...)`` dry runs a job on dummy or released synthetic data at no charge.
- ``quote``: what a job will spend (from the accountant, before anything runs), and with
  ``curve`` the utility of dry runs at several epsilons.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectors.errors import NotFoundError, PolicyDenied, SpecError
from connectors.schema import Role as ColumnRole
from connectors.schema import SchemaContract
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Action, Role
from privacy.ledger import BudgetKey
from sandbox.backend import Resources
from sandbox.jobs import JobRecord, JobState

if TYPE_CHECKING:
    from sandbox.jobspec import JobSpec

#: epsilons a quote's utility curve tries by default
CURVE_EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: the reader's person split (train part) is what DP-SGD trains on
TRAIN_FRACTION = 0.8
#: rows of a dummy dry run when the dataset's counts are private (a fixed, public size)
DUMMY_ROWS = 5000


def governed_contract(contract: SchemaContract) -> SchemaContract:
    """The contract of governed storage: direct identifiers are gone after ingest."""
    d = contract.to_dict()
    cols = d["columns"]
    drop = {c.name for c in contract.columns if c.role is ColumnRole.DIRECT_IDENTIFIER}
    if isinstance(cols, dict):
        d["columns"] = {k: v for k, v in cols.items() if k not in drop}
    else:
        d["columns"] = [c for c in cols if c["name"] not in drop]
    return SchemaContract.from_dict(d)


class SyntheticDataCalls:
    # provided by Service
    store: Any
    ledger: Any
    jobs: Any
    zone: Any
    backend: Any
    clock: Any
    _act: Any
    _run: Any
    _check_member: Any

    # -- dummy -------------------------------------------------------------------------------

    def synth_dummy(
        self, actor: Any, dataset: str, rows: int, out: Path, seed: int = 0
    ) -> dict[str, Any]:
        from connectors.dummy import dummy_table
        from connectors.external import write_table

        with self._act(actor, Action.SYNTH_DUMMY, dataset, {"rows": rows}):
            if not 1 <= rows <= 10_000_000:
                raise SpecError("--rows", "must be between 1 and 10,000,000", "ask for fewer rows")
            rec = self.store.get_dataset(dataset)
            contract = SchemaContract.from_dict(rec.contract)
            table = dummy_table(contract, rows, seed)
            write_table(out, table)
            return {
                "dataset": dataset,
                "rows": table.num_rows,
                "out": str(out),
                "charged_epsilon": 0.0,
            }

    # -- DP synthetic data -------------------------------------------------------------------

    def synth_fit(
        self,
        actor: Any,
        project: str,
        dataset: str,
        *,
        epsilon: float | None,
        delta: float = 1e-6,
        method: str = "mst",
        rows: int = 10_000,
        seed: int = 0,
        columns: list[str] | None = None,
        label: str | None = None,
    ) -> JobRecord:
        from privacy.synth.base import SynthMethod, is_dp
        from sandbox.jobs import new_job_id
        from sandbox.synth_worker import restricted_contract, run_synth_job

        job_id = new_job_id()
        with self._act(
            actor,
            Action.SYNTH_FIT,
            project,
            {"dataset": dataset, "method": method, "epsilon": epsilon},
        ) as extra:
            try:
                kind = SynthMethod(method)
            except ValueError:
                raise SpecError(
                    "--method",
                    "is not a known method",
                    f"use one of: {', '.join(m.value for m in SynthMethod)}",
                ) from None
            dp = is_dp(kind)
            if not 1 <= rows <= 5_000_000:
                raise SpecError("--rows", "must be between 1 and 5,000,000", "ask for fewer rows")
            rec = self.store.get_dataset(dataset)
            contract = governed_contract(SchemaContract.from_dict(rec.contract))
            cols = list(columns or [c.name for c in contract.columns])
            unknown = [c for c in cols if c not in {x.name for x in contract.columns}]
            if unknown:
                raise SpecError(
                    "--columns",
                    f"{unknown[0]!r} is not a governed column of {dataset!r}",
                    "see `sandbox dataset show`",
                )
            # the person column bounds each person's contribution (one row per person): the
            # synthesizer needs it whether or not the researcher named it; it is never
            # synthesised or released (pseudonyms are not data)
            if contract.identifier is not None and contract.identifier not in cols:
                cols.insert(0, contract.identifier)
            if dp:
                from privacy.synth.base import Codec

                # what the synthesizer will refuse (a column with no declared domain),
                # refused now, before anything is reserved
                Codec.from_contract(
                    SchemaContract.from_dict(restricted_contract(contract.to_dict(), cols))
                )
            reservation = None
            if dp:
                if epsilon is None or not (epsilon > 0 and math.isfinite(epsilon)):
                    raise SpecError(
                        "--epsilon", "must be a number > 0 for a DP method", "e.g. --epsilon 3"
                    )
                if Role(actor.role) is not Role.RESEARCHER:
                    raise PolicyDenied(
                        "DP synthetic releases are requested by researchers",
                        missing=("role researcher",),
                        grantor="zone operator",
                    )
                id_col = contract.identifier
                decision = decide_job_access(
                    JobAccessRequest(
                        user=actor.name,
                        role=Role(actor.role),
                        project=project,
                        dataset=dataset,
                        columns=frozenset(c for c in cols if c != id_col),
                        mechanism=Mechanism.SYNTHETIC,
                        epsilon=epsilon,
                        delta=delta,
                        action=Action.SYNTH_FIT,
                    ),
                    self.store.project_view(project),
                    self.store.grants_for(project, dataset),
                    self.clock(),
                )
                if not decision.allowed:
                    raise PolicyDenied(
                        decision.reason, missing=decision.missing, grantor=decision.grantor
                    )
                reservation = self.ledger.reserve(
                    BudgetKey(project, dataset), epsilon, delta, job_id=job_id, actor=actor.name
                )
            elif Role(actor.role) is not Role.STEWARD:
                raise PolicyDenied(
                    f"method {kind.value} is not differentially private: only a data steward may run it",
                    missing=("a DP method (mst, dp-copula)",),
                    grantor="data steward",
                )
            self.store.get_project(project)
            spec = {
                "method": kind.value,
                "epsilon": epsilon,
                "delta": delta,
                "rows": rows,
                "seed": seed,
                "columns": cols,
            }
            import hashlib

            spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
            self.jobs.create(
                project=project,
                dataset=dataset,
                user=actor.name,
                spec=spec,
                spec_hash=spec_hash,
                reservation_id=reservation,
                job_id=job_id,
            )
            extra.update(job=job_id, dp=dp)
        labels = [c for c in cols if c in contract.label_names()]
        features = [
            c.name for c in contract.columns if c.name in cols and c.role is ColumnRole.FEATURE
        ]
        payload = {
            "zone_root": str(self.zone.root),
            "db_url": self.zone.db_url,
            "job_id": job_id,
            "dataset": dataset,
            "dataset_path": rec.path,
            "contract": restricted_contract(contract.to_dict(), cols),
            "method": kind.value,
            "epsilon": epsilon,
            "delta": delta,
            "rows": rows,
            "seed": seed,
            "label": label or (labels[0] if labels else None),
            "features": features,
        }
        return self._run(actor, job_id, payload, Resources(cpus=1, gpus=0), None, run_synth_job)

    def _synth_job(self, job_id: str) -> JobRecord:
        rec = self.jobs.get(job_id)
        if (rec.result or {}).get("kind") != "synthetic":
            raise NotFoundError(
                f"{job_id} is not a synthetic-data job; `sandbox jobs list` shows them"
            )
        return rec

    def synth_report(self, actor: Any, job_id: str) -> dict[str, Any]:
        with self._act(actor, Action.SYNTH_REPORT, job_id):
            rec = self._synth_job(job_id)
            self._check_member(actor, rec.project)
            job_dir = self.zone.job_dir(job_id)
            if Role(actor.role) is Role.STEWARD:
                full = job_dir / "report_full.json"
                plots = sorted(str(p) for p in (job_dir / "plots").glob("*.png"))
                return {
                    "job": job_id,
                    "view": "steward",
                    "report": json.loads(full.read_text()) if full.exists() else None,
                    "plots": plots,
                    "released": bool((rec.result or {}).get("report_released")),
                }
            if not (rec.result or {}).get("report_released"):
                raise PolicyDenied(
                    f"the report of {job_id} is not released yet",
                    missing=("steward release of the report",),
                    grantor="data steward",
                )
            agg = job_dir / "report_aggregate.json"
            return {
                "job": job_id,
                "view": "aggregate",
                "release": (rec.result or {}).get("report_release"),
                "report": json.loads(agg.read_text()),
            }

    def synth_release(self, actor: Any, job_id: str, *, rows: bool = False) -> JobRecord:
        """A steward releases a synthetic job's aggregate report (and, with ``rows``, a non-DP
        baseline's rows, which otherwise never leave)."""
        with self._act(actor, Action.SYNTH_RELEASE, job_id, {"rows": rows, "release": "non-dp"}):
            rec = self._synth_job(job_id)
            if rec.state is not JobState.SUCCEEDED:
                raise SpecError(
                    "JOB", f"job {job_id} is {rec.state}", "only succeeded jobs can be released"
                )
            result = dict(rec.result or {})
            result["report_released"] = True
            # the report's scores are computed on real rows without noise: the release
            # record says so, and who let them out (chokepoint 8)
            result["report_release"] = {
                "dp": False,
                "kind": "steward release (not differentially private)",
                "what": "aggregate report scores computed on real rows without noise",
                "by": actor.name,
                "at": self.clock().isoformat(),
            }
            if rows:
                result["steward_release"] = True
            return self.jobs.update_result(job_id, result)

    # -- dry runs and quotes -------------------------------------------------------------------

    def dry_run(self, actor: Any, spec: JobSpec, on: str, *, on_progress: Any = None) -> JobRecord:
        """Run ``spec`` on dummy data (``on="dummy"``) or on a released DP synthetic table
        (``on="synthetic:JOB"``), charging nothing."""
        from connectors.dummy import dummy_table
        from connectors.ingest import ingest_table
        from sandbox.jobs import new_job_id
        from sandbox.synth_worker import restricted_contract
        from sandbox.worker import run_dpsgd_job

        if spec.federated is not None:
            raise SpecError("--on", "dry runs cover DP-SGD jobs", "drop --on for federated jobs")
        job_id = new_job_id()
        with self._act(
            actor, Action.JOB_SUBMIT, spec.project, {"dataset": spec.dataset, "dry_run": on}
        ) as extra:
            pv = self.store.project_view(spec.project)
            if actor.name not in pv.members:
                raise PolicyDenied(
                    f"{actor.name} is not a member of project {spec.project}",
                    missing=("project membership",),
                    grantor="project owner",
                )
            rec = self.store.get_dataset(spec.dataset)
            contract = governed_contract(SchemaContract.from_dict(rec.contract))
            if on == "dummy":
                # the dummy table is as large as the real one only when that size is public:
                # a dry run's plan (sample rate, steps) would otherwise give the size back
                size = max(2000, int(rec.persons)) if rec.counts_public else DUMMY_ROWS
                table = dummy_table(contract, size, spec.training.seed)
            elif on.startswith("synthetic:"):
                src = self._synth_job(on.split(":", 1)[1])
                if (
                    src.project != spec.project
                    or not (src.result or {}).get("dp")
                    or not self._charged(src)
                ):
                    raise PolicyDenied(
                        f"{on} is not a released DP synthetic table of project {spec.project}",
                        missing=("a DP synthetic job of this project",),
                        grantor="project researcher",
                    )
                from connectors.external import read_user_table

                path = self.zone.job_dir(src.id) / "synthetic.parquet"
                table = read_user_table(
                    path, [c.name for c in contract.columns if c.name in src.result["columns"]]
                )
                contract = SchemaContract.from_dict(
                    restricted_contract(contract.to_dict(), list(table.column_names))
                )
            else:
                raise SpecError("--on", "must be dummy or synthetic:JOB", "e.g. --on dummy")
            dest = self.zone.job_dir(job_id) / "dry-run-data"
            ingest_table(table, contract, dest, self.zone.secret())
            self.jobs.create(
                project=spec.project,
                dataset=spec.dataset,
                user=actor.name,
                spec=spec.to_dict(),
                spec_hash=spec.spec_hash(),
                reservation_id=None,
                job_id=job_id,
            )
            extra.update(job=job_id)
        payload = {
            "zone_root": str(self.zone.root),
            "db_url": self.zone.db_url,
            "job_id": job_id,
            "spec": spec.to_dict(),
            "contract": contract.to_dict(),
            "dataset_path": str(dest),
            "dry_run": on,
        }
        return self._run(
            actor,
            job_id,
            payload,
            Resources(cpus=spec.resources.cpus, gpus=0),
            on_progress,
            run_dpsgd_job,
        )

    def quote(self, actor: Any, spec: JobSpec) -> dict[str, Any]:
        """The epsilon and delta a job will spend, from the accountant, before anything runs.

        The sample rate needs the training split's size: the quote uses the dataset card's
        person count times the split's train share (the worker uses the exact count, so the
        real figure may differ in the last digits; it never exceeds the job's epsilon)."""
        from privacy.dp_metrics import plan_job
        from sandbox.disclosure import redact_counts, sees_everything
        from sandbox.worker import EVAL_SHARE

        with self._act(actor, Action.JOB_QUOTE, spec.project, {"dataset": spec.dataset}):
            rec = self.store.get_dataset(spec.dataset)
            if spec.federated is not None:
                from sandbox.federated_run import plan_sites

                # the same planning the submit runs: what it refuses, the quote refuses
                site_plan = plan_sites(spec, rec)
                per_site: dict[str, Any] = {
                    site: {"left_out": reason} for site, reason in site_plan.left_out.items()
                }
                from training.federated.config import EVAL_SHARE as FED_EVAL_SHARE

                for site in site_plan.sites:
                    n_train = max(1, int(rec.sites[site] * TRAIN_FRACTION))
                    per_site[site] = plan_job(
                        spec.privacy.epsilon,
                        spec.privacy.delta,
                        n_train,
                        min(spec.training.batch_size, n_train),
                        spec.federated.rounds * spec.federated.local_epochs,
                        evaluate=site_plan.config.evaluate,
                        eval_share=FED_EVAL_SHARE,
                    ).to_dict()
                quote: dict[str, Any] = {
                    "mode": "federated",
                    "epsilon_per_site": spec.privacy.epsilon,
                    "delta": spec.privacy.delta,
                    "sites": dict(sorted(per_site.items())),
                    "composition": "per site (disjoint patients)",
                    "unit": "person",
                }
            else:
                n_train = int(rec.persons * TRAIN_FRACTION)
                p = plan_job(
                    spec.privacy.epsilon,
                    spec.privacy.delta,
                    n_train,
                    spec.training.batch_size,
                    spec.training.epochs,
                    evaluate=spec.privacy.evaluate,
                    eval_share=EVAL_SHARE,
                )
                quote = {
                    "mode": "dp-sgd",
                    "epsilon": p.epsilon if rec.counts_public else spec.privacy.epsilon,
                    "delta": p.delta,
                    "plan": p.to_dict(),
                    "n_train_estimate": n_train,
                    "unit": "person",
                    "neighbouring": "add/remove one person",
                    "accountant": "rdp",
                }
            if not rec.counts_public and not sees_everything(actor.role):
                quote = redact_counts(quote)
                if "plan" in quote:
                    quote["plan"]["epsilon"] = spec.privacy.epsilon
            return quote

    def quote_curve(
        self,
        actor: Any,
        spec: JobSpec,
        on: str,
        out_dir: Path,
        epsilons: tuple[float, ...] = CURVE_EPSILONS,
    ) -> dict[str, Any]:
        """Utility vs epsilon from dry runs on ``on`` data (no charge), with a PNG and a table."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        points = []
        for eps in epsilons:
            s = replace(spec, privacy=replace(spec.privacy, epsilon=float(eps)))
            job = self.dry_run(actor, s, on)
            m = (job.result or {}).get("metrics", {})
            points.append(
                {
                    "epsilon": eps,
                    "auroc": m.get("auroc"),
                    "accuracy": m.get("accuracy"),
                    "job": job.id,
                }
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [p["epsilon"] for p in points]
        ax.plot(
            xs,
            [p["auroc"] if p["auroc"] is not None else float("nan") for p in points],
            marker="o",
            label="DP AUROC",
        )
        ax.set_xscale("log")
        ax.set_xlabel("epsilon (per person)")
        ax.set_ylabel("AUROC on " + ("dummy" if on == "dummy" else "synthetic") + " data")
        ax.set_title("utility vs epsilon (dry runs, no charge)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = out_dir / "quote_curve.png"
        fig.savefig(png, dpi=120)
        plt.close(fig)
        table = out_dir / "quote_curve.json"
        table.write_text(json.dumps(points, indent=2))
        return {"on": on, "points": points, "png": str(png), "table": str(table)}
