"""The service's synthetic-data, dry-run and quote calls (``Service.synth`` holds them).

- ``synth_dummy``: free dummy rows from the schema contract alone (no row is read).
- ``synth_fit``: DP synthetic data fitted inside the zone on real rows, charged like a job
  (decision -> reservation -> Ray worker -> commit); a steward may also fit SDV's non-DP
  synthesizers, whose output is held until the steward releases it.
- ``synth_report``: the steward sees the full report; the researcher sees the aggregate
  scores only after a steward released them (``synth_release_report``).
- ``submit(..., on=...)`` dry runs a job on dummy or released synthetic data at no charge.
- ``quote``: what a job will spend (from the accountant, before anything runs), after every
  check a submit runs (``sandbox.mechanisms.precheck``), and with ``curve`` the utility of
  dry runs at several epsilons.
- ``tune``: the search that chooses a spec's ``"auto"`` hyperparameters on free rows
  (``sandbox.mechanisms.tuning``), shown, charging nothing; quotes and dry runs resolve such a
  spec the same way before they plan it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from connectors.dummy import dummy_table
from connectors.external import write_table
from connectors.schema import SchemaContract
from foundation.errors import PolicyDenied, SpecError
from policies.roles import Action, Actor, Role
from sandbox.context import ProgressFn, ZoneContext
from sandbox.jobs import JobRecord, JobState
from sandbox.jobspec import JobSpec
from sandbox.mechanisms.dry_run import DryRunMechanism, DryRunRequest, synthetic_job
from sandbox.mechanisms.precheck import precheck
from sandbox.mechanisms.synthetic import SyntheticMechanism, SynthRequest
from sandbox.mechanisms.tuning import resolve, summary
from sandbox.quotes import quote_of
from sandbox.runner import JobRunner

#: epsilons a quote's utility curve tries by default
CURVE_EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class SynthCalls:
    """Synthetic data, dry runs and quotes, over the zone's context and its one job runner."""

    def __init__(self, ctx: ZoneContext, runner: JobRunner) -> None:
        self.ctx = ctx
        self.runner = runner

    # -- dummy -------------------------------------------------------------------------------

    def synth_dummy(
        self, actor: Actor, dataset: str, rows: int, out: Path, seed: int = 0
    ) -> dict[str, Any]:

        with self.ctx.act(actor, Action.SYNTH_DUMMY, dataset, {"rows": rows}):
            if not 1 <= rows <= 10_000_000:
                raise SpecError("--rows", "must be between 1 and 10,000,000", "ask for fewer rows")
            rec = self.ctx.store.get_dataset(dataset)
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
        actor: Actor,
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
        wait: bool = True,
    ) -> JobRecord:
        """DP synthetic data (charged like a job) or a steward's non-DP baseline (held);
        ``wait=False`` (served mode) returns the QUEUED record."""
        request = SynthRequest(
            project=project,
            dataset=dataset,
            epsilon=epsilon,
            delta=delta,
            method=method,
            rows=rows,
            seed=seed,
            columns=tuple(columns) if columns else None,
            label=label,
        )
        job = self.runner.submit(
            SyntheticMechanism.kind,
            actor,
            request,
            action=Action.SYNTH_FIT,
            target=project,
            details={"dataset": dataset, "method": method, "epsilon": epsilon},
            wait=wait,
        )
        return self.ctx.job_view(actor, job)

    def synth_report(self, actor: Actor, job_id: str) -> dict[str, Any]:
        with self.ctx.act(actor, Action.SYNTH_REPORT, job_id):
            rec = synthetic_job(self.ctx, job_id)
            self.ctx.check_member(actor, rec.project)
            job_dir = self.ctx.zone.job_dir(job_id)
            if actor.role is Role.STEWARD:
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

    def synth_release(self, actor: Actor, job_id: str, *, rows: bool = False) -> JobRecord:
        """A steward releases a synthetic job's aggregate report (and, with ``rows``, a non-DP
        baseline's rows, which otherwise never leave)."""
        with self.ctx.act(actor, Action.SYNTH_RELEASE, job_id, {"rows": rows, "release": "non-dp"}):
            rec = synthetic_job(self.ctx, job_id)
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
                "at": self.ctx.clock().isoformat(),
            }
            if rows:
                result["steward_release"] = True
            return self.ctx.jobs.update_result(job_id, result)

    # -- dry runs and quotes -------------------------------------------------------------------

    def dry_run(
        self,
        actor: Actor,
        spec: JobSpec,
        on: str,
        *,
        on_progress: ProgressFn | None = None,
        curve_point: bool = False,
    ) -> JobRecord:
        """Run ``spec`` on dummy data (``on="dummy"``) or on a released DP synthetic table
        (``on="synthetic:JOB"``), charging nothing, after every check a submit runs
        (``curve_point``: a point of a quote's curve, whose grant and budget the quote
        checked for the spec's own epsilon)."""
        job = self.runner.submit(
            DryRunMechanism.kind,
            actor,
            DryRunRequest(spec, on, curve_point=curve_point),
            # a dry run charges nothing: it is decided (and audited) as a quote
            action=Action.JOB_QUOTE,
            target=spec.project,
            details={"dataset": spec.dataset, "dry_run": on},
            on_progress=on_progress,
        )
        return self.ctx.job_view(actor, job)

    def quote(self, actor: Actor, spec: JobSpec, for_request: bool = False) -> dict[str, Any]:
        """The epsilon and delta a job will spend, and its noise figures, before anything runs.

        The quote runs every check a submit runs (``sandbox.mechanisms.precheck``: what
        submit refuses, the quote refuses, with the same message) and shows the plan the run
        is run and charged from (``sandbox.quotes``). ``for_request``: a quote to attach to
        an access request, where the missing grant or budget is what the request asks for:
        those refusals are listed (``submit_now``) instead of raised."""
        details = {"dataset": spec.dataset, "for_request": for_request is True}
        with self.ctx.act(actor, Action.JOB_QUOTE, spec.project, details):
            if not isinstance(for_request, bool):  # a served call's JSON
                raise SpecError("for_request", "must be true or false", "e.g. true")
            return quote_of(precheck(self.ctx, actor, spec, for_request=for_request), actor)

    def quote_curve(
        self,
        actor: Actor,
        spec: JobSpec,
        on: str,
        out_dir: Path,
        epsilons: tuple[float, ...] = CURVE_EPSILONS,
    ) -> dict[str, Any]:
        """Utility vs epsilon from dry runs on ``on`` data (no charge), with a PNG and a table.
        A spec with ``"auto"`` hyperparameters is resolved once, at its own epsilon, and every
        point runs those values (what changes along the curve is epsilon alone). Each point
        carries its AUROC's 95% interval; the PNG marks the spec's own epsilon."""
        from sandbox import utility_curve

        if spec.auto_fields:
            with self.ctx.act(actor, Action.JOB_QUOTE, spec.project, {"tune": "curve"}):
                self.ctx.check_member(actor, spec.project)
                spec, _ = resolve(self.ctx, spec)

        points = []
        for eps in epsilons:
            s = replace(spec, privacy=replace(spec.privacy, epsilon=float(eps)))
            job = self.dry_run(actor, s, on, curve_point=True)
            m = (job.result or {}).get("metrics", {})
            points.append(
                {
                    "epsilon": eps,
                    "auroc": m.get("auroc"),
                    "auroc_ci95": (m.get("ci95") or {}).get("auroc"),
                    "accuracy": m.get("accuracy"),
                    "job": job.id,
                }
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        png = utility_curve.write(
            points, out_dir / "quote_curve.png", on=on, asked_epsilon=spec.privacy.epsilon
        )
        table = out_dir / "quote_curve.json"
        table.write_text(json.dumps(points, indent=2))
        return {"on": on, "points": points, "png": str(png), "table": str(table)}

    def tune(self, actor: Actor, spec: JobSpec, on: str | None = None) -> dict[str, Any]:
        """Choose ``spec``'s ``"auto"`` hyperparameters by the search on free rows (``on``:
        ``"dummy"`` or ``"synthetic:JOB"``, else the default: the project's newest released
        DP synthetic table of the dataset, else dummy): the resolved spec and the search's
        record. Nothing is charged, reserved or read from the real rows; a spec with nothing
        ``"auto"`` comes back as it is (``tuning`` None)."""
        details = {"dataset": spec.dataset, "tune": on or "default"}
        with self.ctx.act(actor, Action.JOB_QUOTE, spec.project, details) as extra:
            self.ctx.store.get_project(spec.project)
            self.ctx.check_member(actor, spec.project)
            resolved, tuning = resolve(self.ctx, spec, on)
            if tuning is not None:
                extra.update(tuned=summary(tuning))
            return {"spec": resolved.to_dict(), "tuning": tuning}
