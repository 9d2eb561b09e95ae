"""The service's DP query calls: ``run_query`` (a quote with ``dry``) and ``list_queries``.

A query is a release like a job's: decided (project, grant for ``dp-query`` naming its
columns, not expired), quoted (its epsilon and noise, from the contract alone), reserved in
the ledger (a query over what is left is refused here, before any row is read), answered by
``privacy.dpquery.engine`` on rows read through ``connectors.tables.load_table`` (at most
the contract's ``query_rows_per_person`` rows per person), committed, and stored
(``sandbox.query_releases``). It runs in the service's process, which holds the dataset key;
no client ever receives a row.

Chokepoints (``docs/chokepoints.md``): the access decision is ``decide_job_access``, the same
pure function jobs use; the charge is the ledger's reserve/commit; a repeated query returns
the stored answer (``QueryReleases.find``) before anything is reserved or read, so asking
again neither costs nor reveals anything new. A failure after the rows were opened keeps its
charge (the noise was not released, but the read happened, as with a failed job).
"""

from __future__ import annotations

import hashlib
from typing import Any

from connectors.schema import SchemaContract
from foundation.errors import ComputeError, PolicyDenied, ZoneError
from policies.decisions import JobAccessRequest, Mechanism, decide_job_access
from policies.roles import Action, Actor
from privacy.budget_events import BudgetKey
from sandbox.context import ZoneContext
from sandbox.query_releases import QueryRelease, QueryReleases, new_query_id


class QueryCalls:
    def __init__(self, ctx: ZoneContext, releases: QueryReleases) -> None:
        self.ctx = ctx
        self.releases = releases

    def run_query(
        self, actor: Actor, project: str, query: Any, dry: bool = False
    ) -> dict[str, Any]:
        """Answer ``query`` (a dict: dataset, kind, epsilon, column, by, quantiles, bins) for
        ``project``; ``dry``: only quote it (its epsilon, noise scales and intervals)."""
        from privacy.dpquery.engine import quote
        from privacy.dpquery.spec import QuerySpec, check_against, columns_needed

        ctx = self.ctx
        with ctx.act(actor, Action.QUERY_RUN, project) as extra:
            spec = QuerySpec.from_dict(query)
            extra.update(dataset=spec.dataset, kind=str(spec.kind), dry=bool(dry))
            ctx.store.get_project(project)
            ctx.check_member(actor, project)
            # the version the grant for dp-query is pinned to, else the latest
            dataset = ctx.dataset_version_for(project, spec.dataset, "dp-query")
            contract = SchemaContract.from_dict(dataset.contract)
            check_against(spec, contract)
            grant = self._decide(actor, project, spec, columns_needed(spec))
            priced = quote(spec, contract)
            key = BudgetKey(project, spec.dataset)
            self.releases.require()
            stored = self.releases.find(project, release_key(spec.key(), dataset.version))
            if stored is not None:
                # the released answer again: no new noise, no new charge
                extra.update(query=stored.id, charged=0.0, reused=True)
                return self._record(stored, key, charged=False, reused=True)
            if dry:
                extra.update(charged=0.0, quoted=priced.epsilon)
                return self._quote_record(project, priced, key, grant)
            release = self._answer(actor, project, spec, contract, dataset, priced, key)
            extra.update(query=release.id, charged=release.epsilon, grant=grant)
            return self._record(release, key, charged=True, reused=False)

    def list_queries(self, actor: Actor, project: str) -> list[dict[str, Any]]:
        """The project's released query answers, oldest first."""
        ctx = self.ctx
        with ctx.act(actor, Action.QUERY_LIST, project):
            ctx.store.get_project(project)
            ctx.check_member(actor, project)
            return [
                self._record(r, None, charged=False, reused=True)
                for r in self.releases.list(project)
            ]

    # -- steps ------------------------------------------------------------------------------

    def _decide(self, actor: Actor, project: str, spec: Any, columns: list[str]) -> str:
        """Chokepoint 1 for queries: the same pure access decision jobs use."""
        decision = decide_job_access(
            JobAccessRequest(
                user=actor.name,
                role=actor.role,
                project=project,
                dataset=spec.dataset,
                columns=frozenset(columns),
                mechanism=Mechanism.DP_QUERY,
                epsilon=spec.epsilon,
                delta=0.0,
                action=Action.QUERY_RUN,
            ),
            self.ctx.store.project_view(project),
            self.ctx.store.grants_for(project, spec.dataset),
            self.ctx.clock(),
        )
        if not decision.allowed:
            raise PolicyDenied(decision.reason, missing=decision.missing, grantor=decision.grantor)
        return decision.grant_id or ""

    def _answer(
        self,
        actor: Actor,
        project: str,
        spec: Any,
        contract: SchemaContract,
        dataset: Any,
        priced: Any,
        key: BudgetKey,
    ) -> QueryRelease:
        from connectors.dataset_handle import DatasetHandle
        from connectors.tables import load_table
        from privacy.dpquery.engine import run
        from privacy.dpquery.spec import columns_needed

        ctx = self.ctx
        qid = new_query_id()
        # refused here, before any row is read, when the grant has less than the quote left
        rid = ctx.ledger.reserve(key, priced.epsilon, priced.delta, job_id=qid, actor=actor.name)
        opened: list[bool] = []
        try:
            handle = DatasetHandle(
                name=spec.dataset,
                path=ctx.dataset_path(dataset),
                contract=contract,
                authorization=qid,
                on_open=lambda: opened.append(True),
            )
            table = load_table(
                handle,
                columns_needed(spec),
                max_rows_per_person=contract.query_rows_per_person,
            )
            answer = run(spec, contract, table)
        except BaseException as exc:
            if opened:
                ctx.ledger.commit(rid, priced.epsilon, priced.delta, actor=actor.name)
            else:
                ctx.ledger.release(rid, actor=actor.name, reason="query failed before data")
            if isinstance(exc, ZoneError):
                raise
            # a message from inside the engine may quote data: only its type leaves
            raise ComputeError(f"the query failed ({type(exc).__name__})") from None
        # the engine's epsilon is the quote's (the same plan): the quote is what is charged
        ctx.ledger.commit(rid, priced.epsilon, priced.delta, actor=actor.name)
        release = QueryRelease(
            id=qid,
            project=project,
            dataset=spec.dataset,
            query_key=release_key(spec.key(), dataset.version),
            query=spec.to_dict(),
            answer=answer.to_dict(),
            epsilon=float(priced.epsilon),
            delta=float(priced.delta),
            asked_by=actor.name,
            released_at=ctx.clock(),
        )
        return self.releases.add(release)

    def _remaining(self, key: BudgetKey | None) -> float | None:
        if key is None:
            return None
        return float(self.ctx.ledger.balance(key).remaining_epsilon)

    def _record(
        self, r: QueryRelease, key: BudgetKey | None, *, charged: bool, reused: bool
    ) -> dict[str, Any]:
        answer = r.answer
        return {
            "id": r.id,
            "project": r.project,
            "dataset": r.dataset,
            "query": r.query,
            "epsilon": r.epsilon,
            "delta": r.delta,
            "charged": charged,
            "reused": reused,
            "dry": False,
            "figures": list(answer.get("figures", [])),
            "notes": list(answer.get("notes", [])),
            "rows_per_person": answer.get("rows_per_person"),
            "parts": [],
            "asked_by": r.asked_by,
            "released_at": r.released_at.isoformat(),
            "remaining_epsilon": self._remaining(key),
        }

    def _quote_record(
        self, project: str, priced: Any, key: BudgetKey, grant: str
    ) -> dict[str, Any]:
        q = priced.to_dict()
        remaining = self._remaining(key)
        return {
            "id": None,
            "project": project,
            "dataset": priced.spec.dataset,
            "query": priced.spec.to_dict(),
            "epsilon": float(priced.epsilon),
            "delta": float(priced.delta),
            "charged": False,
            "reused": False,
            "dry": True,
            "figures": [],
            "notes": list(q.get("notes", [])),
            "rows_per_person": q.get("rows_per_person"),
            "parts": list(q.get("parts", [])),
            "asked_by": None,
            "released_at": None,
            "remaining_epsilon": remaining,
            # would it be answered now? (the grant's epsilon left covers the quote)
            "fits": remaining is not None and remaining + 1e-12 >= float(priced.epsilon),
            "grant": grant,
        }


def release_key(query_key: str, version: int) -> str:
    """ "The same query again" is the same query on the same dataset version: a newer version
    is new data, answered (and charged) afresh. Version 1 keeps the query's own key, as
    releases made before dataset versions have it."""
    if version == 1:
        return query_key
    return hashlib.sha256(f"{query_key}@v{version}".encode()).hexdigest()
