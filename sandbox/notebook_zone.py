"""``zone``: the analyst's client in a notebook, a friendly face on ``sandbox.client.RemoteZone``.

The safe zone's kernel (``sandbox.kernel``) preloads one ``Zone`` as ``zone``. It holds what an
analyst holds, a URL and a token (``SANDBOX_SERVER``, ``SANDBOX_TOKEN``; optional
``SANDBOX_CA``, ``SANDBOX_OTP``, and ``SANDBOX_PROJECT`` as the default project), and talks to
``sandbox serve`` through the same thin client as the CLI: every call is a route of
``sandbox.api.calls``, decided, charged and audited by the service. Nothing here reads a row of
the zone: what comes back is what the API releases (DP figures, schema-only dummy rows,
released synthetic rows, job records), turned into pandas DataFrames where that reads best.

This module imports only the thin client (``sandbox.client``, ``sandbox.api``,
``foundation.errors``) and, when a call needs them, pandas and matplotlib: the kernel's import
guard refuses everything else of the zone's code.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from foundation.errors import SpecError
from sandbox.notebook_frames import (
    _frame,
    _num,
    _progress_line,
    _query_dict,
    _read_parquet,
    _spec_dict,
    answer_frame,
    plot_answer,
    quote_frame,
    site_frame,
)

ENV_SERVER, ENV_TOKEN, ENV_PROJECT = "SANDBOX_SERVER", "SANDBOX_TOKEN", "SANDBOX_PROJECT"
ENV_CA, ENV_OTP, ENV_DATASET = "SANDBOX_CA", "SANDBOX_OTP", "SANDBOX_DATASET"
BUDGET_COLUMNS = [
    "dataset", "site", "granted_epsilon", "reserved_epsilon", "spent_epsilon",
    "remaining_epsilon", "granted_delta", "spent_delta", "spent_by",
]  # fmt: skip
#: seconds between two looks at a job that ``wait`` follows
POLL_S = 1.0
ENDED = ("succeeded", "failed")


def _missing(variable: str, what: str) -> SpecError:
    return SpecError(
        variable,
        f"is not set: {what}",
        f"export {variable}=... in the shell that starts the notebook server "
        f"(or pass it: Zone(server=..., token=..., project=...))",
    )


class Zone:
    """The zone at ``server`` as the analyst holding ``token``; ``project`` is the default
    project of queries, budgets and submitted specs (else ``$SANDBOX_PROJECT``)."""

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        project: str | None = None,
        *,
        dataset: str | None = None,
        ca: str | Path | None = None,
        otp: str | None = None,
        remote: Any = None,
    ) -> None:
        env = os.environ
        self.project = project or env.get(ENV_PROJECT) or None
        self.dataset = dataset or env.get(ENV_DATASET) or None
        self._me: dict[str, Any] | None = None
        if remote is not None:  # tests hand in a stand-in for the served API
            self.server, self._remote = getattr(remote, "server", "(given)"), remote
            return
        server = server or env.get(ENV_SERVER)
        if not server:
            raise _missing(ENV_SERVER, "the notebook does not know where the zone is")
        token = token or env.get(ENV_TOKEN)
        if not token:
            raise _missing(ENV_TOKEN, "the zone would not know who you are")
        from sandbox.client import RemoteZone

        ca = ca or env.get(ENV_CA) or None
        self._remote = RemoteZone(
            server, token, ca=Path(ca) if ca else None, otp=otp or env.get(ENV_OTP) or None
        )
        self.server = self._remote.server

    # -- who, what -------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """Your user name and role, as the zone knows your token."""
        if self._me is None:
            self._me = dict(self._remote.authenticate(None))
        return self._me

    def datasets(self) -> Any:
        """The datasets you may see: name, sites, and the counts where the contract makes them
        public (else "private")."""
        rows = []
        for d in self._remote.list_datasets(None):
            sites = d.get("site_names") or sorted(d.get("sites") or [])
            rows.append(
                {
                    "name": d["name"],
                    "sites": len(sites),
                    "site_names": ", ".join(sites),
                    "rows": d.get("rows", "private"),
                    "persons": d.get("persons", "private"),
                }
            )
        return _frame(rows, ["name", "sites", "site_names", "rows", "persons"])

    def contract(self, dataset: str | None = None) -> Any:
        """A dataset's schema contract, one row per column: its declared domain, never a value
        drawn from the data."""
        name = self._dataset(dataset)
        cols = self._remote.show_dataset(None, name)["contract"]["columns"]
        if isinstance(cols, Mapping):
            cols = [{"name": k, **v} for k, v in cols.items()]
        keep = ["name", "type", "role", "min", "max", "scale", "categories", "missing_rate"]
        return _frame([{k: c.get(k) for k in keep} for c in cols], keep)

    # -- rows you may hold -----------------------------------------------------------------

    def dummy(self, dataset: str | None = None, rows: int = 1000, seed: int = 0) -> Any:
        """Dummy rows drawn from the contract alone (declared domains, missing rates, label
        balance), never from the data: free, for developing code."""
        name = self._dataset(dataset)
        with tempfile.TemporaryDirectory(prefix="sz-dummy-") as tmp:
            out = Path(tmp) / "dummy.parquet"
            self._remote.synth_dummy(None, name, rows, out, seed)
            return _read_parquet(out)

    def synthetic(self, job: str) -> Any:
        """The rows of a succeeded DP synthetic-data job (``sandbox synth fit``), released
        through the zone's release gate (its epsilon was charged when it ran)."""
        with tempfile.TemporaryDirectory(prefix="sz-synth-") as tmp:
            self._remote.job_result(None, job, Path(tmp))
            path = Path(tmp) / "synthetic.parquet"
            if not path.exists():
                raise SpecError(
                    "job",
                    f"{job} is not a synthetic-data job (its release holds no rows)",
                    "give the id of a `sandbox synth fit` job (zone.jobs() lists yours)",
                )
            return _read_parquet(path)

    def download(self, job: str, out: str | Path) -> list[str]:
        """A succeeded job's release (weights, preprocessing, model card; or synthetic rows
        and their card) into your folder ``out``; the files' paths."""
        return list(self._remote.job_result(None, job, Path(out))["files"])

    # -- DP queries ------------------------------------------------------------------------

    def query(
        self,
        kind: str,
        column: str | None = None,
        *,
        by: str | None = None,
        quantiles: Sequence[float] | None = None,
        bins: int | None = None,
        epsilon: float,
        dataset: str | None = None,
        project: str | None = None,
        dry: bool = False,
    ) -> Any:
        """A DP query's answer as a DataFrame (one row per figure, with its 95% interval);
        ``dry=True``: only its quote (what it would cost, its noise), nothing charged.

        ``kind``: count (rows; no column), sum, mean (``by`` a categorical column for one
        figure per category), histogram (a categorical column's categories, or ``bins``
        equal-width bins over a numeric column's declared range) or quantiles (``quantiles``:
        levels in (0, 1)). Bounds, groups and bins come from the contract, never the data.

        Prints what it costs first (a quote), then what was charged and what is left. Asking
        the same query again returns the released answer: no new noise, no new charge. The
        record's fields (``epsilon``, ``charged``, ``reused``, ``id``, and ``notes``: how the
        engine bounded, binned and noised it) are in ``.attrs``."""
        project = self._project(project)
        q = _query_dict(kind, column, by, quantiles, bins, epsilon, self._dataset(dataset))
        quote = dict(self._remote.run_query(None, project, q, dry=True))
        if quote.get("reused"):
            # the service answered from the released copy: nothing more to charge or ask
            print(
                f"asked before ({quote.get('id')}): the released answer, nothing charged; "
                f"remaining epsilon {_num(quote.get('remaining_epsilon'))}"
            )
            return answer_frame(quote)
        print(
            f"quote: {kind} costs epsilon {_num(quote['epsilon'])} of {project}'s budget on "
            f"{q['dataset']} (remaining now {_num(quote.get('remaining_epsilon'))})"
        )
        if dry:
            return quote_frame(quote)
        rec = dict(self._remote.run_query(None, project, q, dry=False))
        charged = _num(rec["epsilon"]) if rec.get("charged") else "nothing (released before)"
        print(f"charged epsilon {charged}; remaining {_num(rec.get('remaining_epsilon'))}")
        return answer_frame(rec)

    def queries(self, project: str | None = None) -> Any:
        """The project's released query answers, oldest first (asking one again is free)."""
        project = self._project(project)
        rows = [
            {
                "id": r["id"],
                "dataset": r["dataset"],
                "kind": (r.get("query") or {}).get("kind"),
                "column": (r.get("query") or {}).get("column"),
                "by": (r.get("query") or {}).get("by"),
                "epsilon": r["epsilon"],
                "asked_by": r.get("asked_by"),
                "released_at": r.get("released_at"),
            }
            for r in self._remote.list_queries(None, project)
        ]
        cols = ["id", "dataset", "kind", "column", "by", "epsilon", "asked_by", "released_at"]
        return _frame(rows, cols)

    def plot(self, answer: Any, ax: Any = None, title: str | None = None) -> Any:
        """A DP answer as bars with its 95% intervals as error bars, titled with its epsilon;
        the matplotlib Axes (the figure shows inline in Jupyter)."""
        return plot_answer(answer, ax=ax, title=title)

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, spec: str | Path | Mapping[str, Any]) -> str:
        """Submit a job spec (a ``job.toml`` path, or its dict); the job's id, at once. The
        zone parses and checks it; ``zone.wait(id)`` follows it to its end."""
        data = _spec_dict(spec)
        if "project" not in data and self.project:
            data = {"project": self.project, **data}
        rec = self._remote.submit(None, data)
        print(f"job {rec['id']} {rec['state']}; follow it with zone.wait({rec['id']!r})")
        return str(rec["id"])

    def wait(self, job: str, timeout: float | None = None, quiet: bool = False) -> dict[str, Any]:
        """Follow a job until it ends (its progress: epochs or rounds, never a data value);
        its final record. A job keeps running in the zone if you stop waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        rec, shown = dict(self._remote.job_status(None, job)), ""
        while True:
            line = _progress_line(rec)
            if line != shown and not quiet:
                print(line, flush=True)
                shown = line
            if rec["state"] in ENDED:
                return rec
            if deadline is not None and time.monotonic() > deadline:
                raise SpecError(
                    "timeout",
                    f"job {job} is still {rec['state']} after {timeout:g} s",
                    "wait again, or zone.cancel(job) (a running job that read rows is charged)",
                )
            time.sleep(POLL_S)
            rec = dict(self._remote.job_status(None, job))

    def cancel(self, job: str) -> dict[str, Any]:
        """Cancel a job of yours (queued: released; running: stopped, charged if it read)."""
        return dict(self._remote.cancel_job(None, job))

    def jobs(self) -> Any:
        """Your jobs (a project member sees the project's), newest last."""
        rows = []
        for j in self._remote.list_jobs(None):
            r = j.get("result") or {}
            rows.append(
                {
                    "id": j["id"],
                    "project": j["project"],
                    "dataset": j["dataset"],
                    "kind": j.get("kind") or r.get("kind") or r.get("mode"),
                    "state": j["state"],
                    # a dry run charged nothing (its kind says "dry-run")
                    "epsilon": None if j.get("dry_run") else r.get("epsilon"),
                    "submitted_by": j.get("submitted_by"),
                    "created_at": j.get("created_at"),
                }
            )
        cols = ["id", "project", "dataset", "kind", "state", "epsilon", "submitted_by"]
        return _frame(rows, [*cols, "created_at"])

    def result(self, job: str) -> dict[str, Any]:
        """A job's record as a dict (state, result: epsilon, DP metrics with intervals). For a
        succeeded federated job, ``["sites"]`` is a DataFrame of each hospital's charge and DP
        metrics, read from the released model card."""
        rec = dict(self._remote.job_status(None, job))
        r = rec.get("result") or {}
        rec["sites"] = None
        if rec["state"] == "succeeded" and (r.get("kind") == "federated"):
            with tempfile.TemporaryDirectory(prefix="sz-result-") as tmp:
                self._remote.job_result(None, job, Path(tmp))
                card = json.loads((Path(tmp) / "model_card.json").read_text(encoding="utf-8"))
            rec["card"] = card
            rec["sites"] = site_frame(r, card)
        return rec

    def budget(self, project: str | None = None) -> Any:
        """The project's privacy budget per dataset (and per site for federated grants):
        granted, reserved, spent and remaining epsilon per person; ``spent_by``: what each
        mechanism (dp-sgd, federated, synthetic, dp-query) spent of it."""
        project = self._project(project)
        rows = []
        for b in self._remote.budget(None, project):
            key = b.get("key") or {}
            rows.append(
                {
                    **{k: b.get(k) for k in BUDGET_COLUMNS[2:]},
                    "dataset": key.get("dataset"),
                    "site": key.get("site") or None,
                }
            )
        return _frame(rows, BUDGET_COLUMNS)

    # -- display ---------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<safe zone at {self.server}: {self._who()}; project {self.project or '-'}>"

    def _repr_html_(self) -> str:
        from html import escape

        return (
            f"<b>safe zone</b> at <code>{escape(str(self.server))}</code>: {escape(self._who())};"
            f" project <code>{escape(self.project or '-')}</code><br>"
            "<small>zone.datasets() · zone.contract(name) · zone.dummy(name) · "
            "zone.query(kind, column, by=..., epsilon=...) · zone.plot(answer) · "
            "zone.synthetic(job) · zone.submit(spec) · zone.wait(job) · zone.result(job) · "
            "zone.budget() · zone.jobs()</small>"
        )

    def _who(self) -> str:
        from foundation.errors import ZoneError

        try:
            me = self.whoami()
        except ZoneError as exc:
            return f"not signed in ({type(exc).__name__}: {exc})"
        return f"{me.get('name')} ({me.get('role')})"

    def _project(self, project: str | None) -> str:
        chosen = project or self.project
        if not chosen:
            raise SpecError(
                "project",
                f"no project given and {ENV_PROJECT} is not set",
                f"pass project='...', set zone.project = '...', or export {ENV_PROJECT}",
            )
        return chosen

    def _dataset(self, dataset: str | None) -> str:
        chosen = dataset or self.dataset
        if chosen:
            return chosen
        names = [d["name"] for d in self._remote.list_datasets(None)]
        if len(names) == 1:
            return str(names[0])
        raise SpecError(
            "dataset",
            f"no dataset given and the zone shows {len(names)} ({', '.join(names) or 'none'})",
            "pass dataset='...' or set zone.dataset = '...'",
        )


# -- records into frames -------------------------------------------------------------------
