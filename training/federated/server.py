"""The ServerApp: Flower's FedAvg/FedProx (or SecAgg+) driving ``rounds.ServerRun``.

``server_app`` (Flower app reference ``training.federated.server:server_app``) is what the
Deployment Engine runs, with the payload's path in the run config's ``"job-payload"``;
``build_server_app(default_payload)`` makes the same app for ``run_simulation``.

A run, in order:

1. **Setup.** Wait (up to ``round_timeout_s``) until every site's node has connected, then
   send each node a Flower ``query`` message; it answers with its site name and plan, or
   "excluded" and why (e.g. fewer training persons than ``min_site_rows``). Fewer ready
   sites than ``min_sites`` fails the job.
2. **Rounds** with Flower's own ``FedAvg`` / ``FedProx`` (``flwr.serverapp.strategy``, the
   Message API), or with ``secure_aggregation`` SecAgg+ on Flower's legacy path
   (``SecAggPlusWorkflow`` in a ``DefaultWorkflow``, a ``LegacyContext`` around a legacy
   ``flwr.server.strategy.FedAvg``; the new strategies have no secure aggregation).
   The strategies are subclassed for three things only: which sites a round samples
   (``ServerRun.sample``: ``clients_per_round`` of the active sites, drawn with the public
   seed, the reference loop draws the same), aggregation in a fixed order (replies sorted
   by site, ``weights.py``: the same seed gives bit-identical weights; Flower would average
   in arrival order), and the per-round records (``rounds.py``).
3. **Evaluation.** The final global model goes to every active site (an ``evaluate``
   message); each releases one noisy histogram on its test split; the server derives each
   site's metrics (with 95% intervals and the unreliable flag) and pools the histograms.
   Skipped when the config's ``evaluate`` is off: no message, no charge.
4. **Files** in ``out_dir`` (``rounds.py`` describes them): ``rounds.jsonl``,
   ``global.safetensors``, ``summary.json``, and ``status.json`` with the phase.

SecAgg+ settings: every sampled site shares keys with every other (``num_shares=1.0``);
unmasking needs a majority of the round's sites (at least ``min_sites``), so no minority
colluding with the server can unmask one site; ``max_weight`` is the largest site's
training persons, so each site's weight n / max_weight is <= 1 (docs/engines.md); parameters are
quantized on [-8, 8] to 2^22 levels (Flower's defaults; a model weight outside +-8 would
be clipped). Metrics (each site's epsilon) are not masked: they are public figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from foundation.errors import ComputeError, SpecError
from training.federated.client import SITE_RECORD
from training.federated.config import Strategy
from training.federated.payload import ROUNDS_FILE, RUN_CONFIG_KEY, load_payload
from training.federated.rounds import Reply, ServerRun, State
from training.federated.site import SiteSetup, SiteStatus
from training.federated.site_plan import SiteLedger, SitePlan

#: how often the setup phase looks for newly connected nodes
_NODE_POLL_S = 0.2


def _arrays(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _ledger(rec: Any) -> SiteLedger:
    return SiteLedger(
        int(rec.get("train-steps", 0)), int(rec.get("evals", 0)), int(rec.get("rounds", 0))
    )


def _setup_of(msg: Message, sites: tuple[str, ...]) -> SiteSetup | None:
    """A node's setup answer; None when it cannot even say which site it is."""
    if msg.has_error():
        return None
    rec = msg.content.config_records.get(SITE_RECORD)
    if rec is None or rec.get("site") not in sites:
        return None
    site = str(rec["site"])
    try:
        status = SiteStatus(str(rec.get("status")))
    except ValueError:
        return SiteSetup(site, SiteStatus.FAILED, None, True, f"site {site!r}: malformed setup")
    plan = None
    if status is SiteStatus.READY:
        try:
            plan = SitePlan.from_record(rec)
        except (KeyError, TypeError, ValueError):
            return SiteSetup(site, SiteStatus.FAILED, None, True, f"site {site!r}: malformed plan")
    return SiteSetup(site, status, plan, bool(rec.get("touched", True)), str(rec.get("reason", "")))


def _setup(run: ServerRun, grid: Grid) -> None:
    want = len(run.cfg.sites)
    deadline = time.monotonic() + run.cfg.round_timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() >= deadline:
            break
        time.sleep(_NODE_POLL_S)
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"phase": "setup"})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            group_id="0",
        )
        for node in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=run.cfg.round_timeout_s)
    entries = []
    for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
        setup = _setup_of(msg, run.cfg.sites)
        if setup is not None:
            entries.append((msg.metadata.src_node_id, setup))
    run.register(entries)


def _reply_of(run: ServerRun, msg: Message, site: str) -> Reply:
    if msg.has_error():
        # Flower's error text can carry the site's exception message: not copied
        return Reply(site, None, None, f"error reply (code {msg.error.code})")
    rec = msg.content.config_records.get(SITE_RECORD)
    if rec is None or rec.get("site") != site:
        return Reply(site, None, None, "malformed reply")
    try:
        status = SiteStatus(str(rec.get("status")))
    except ValueError:
        return Reply(site, None, None, "malformed reply")
    metrics = msg.content.metric_records.get("metrics") or MetricRecord()
    state = None
    if "arrays" in msg.content.array_records:
        state = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    histogram = None
    if "histogram" in metrics:
        from training.federated.metrics import EVAL_BINS

        values = np.asarray(metrics["histogram"], dtype=np.float64)
        if values.size != 2 * EVAL_BINS or not np.isfinite(values).all():
            return Reply(site, None, None, "malformed reply")
        # the release; close_evaluation derives the site's metrics from it
        histogram = values.reshape(2, EVAL_BINS)
    return Reply(
        site,
        status,
        bool(rec.get("touched", True)),
        str(rec.get("reason", "")),
        _ledger(rec),
        float(run.sites[site].plan.n_train),
        state,
        histogram,
    )


def read_replies(run: ServerRun, messages: Iterable[Message]) -> dict[str, Reply]:
    """Replies keyed by site (each node mapped to its site through the setup)."""
    out: dict[str, Reply] = {}
    for msg in messages:
        site = run.site_of_node(msg.metadata.src_node_id)
        if site is not None:
            out[site] = _reply_of(run, msg, site)
    return out


def _evaluate(run: ServerRun, grid: Grid) -> None:
    if not run.cfg.evaluate:
        # privacy.evaluate = false: no site is asked, none is charged
        run.skip_evaluation()
        return
    run.status("evaluating")
    targets = run.active()
    arrays = _arrays(run.global_state)
    messages = [
        Message(
            RecordDict(
                {"arrays": arrays, "config": ConfigRecord(run.message_config(s, run.cfg.rounds))}
            ),
            dst_node_id=run.sites[s].node_id,
            message_type=MessageType.EVALUATE,
            group_id="evaluate",
        )
        for s in targets
    ]
    replies = grid.send_and_receive(messages, timeout=run.cfg.round_timeout_s)
    run.close_evaluation(targets, read_replies(run, replies))


# --- the Message-API path (FedAvg / FedProx) ----------------------------------------------


class _ZoneRounds:
    """Mixed in before Flower's FedAvg/FedProx: our sampling, fixed-order aggregation and
    records; Flower's ``Strategy.start`` runs the rounds."""

    run: ServerRun
    _sampled: dict[int, list[str]]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sites = self.run.sample(server_round)
        self._sampled[server_round] = sites
        base = dict(config)
        return [
            Message(
                RecordDict(
                    {
                        "arrays": arrays,
                        "config": ConfigRecord(
                            {**base, **self.run.message_config(s, server_round)}
                        ),
                    }
                ),
                dst_node_id=self.run.sites[s].node_id,
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for s in sites
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sampled = self._sampled.pop(server_round)
        by_site = read_replies(self.run, replies)
        state = self.run.close_round(server_round, sampled, by_site)
        trained = sum(1 for r in by_site.values() if r.status is SiteStatus.TRAINED)
        return _arrays(state), MetricRecord({"sites-trained": trained})

    # the DP evaluation happens once, after the last round (``_evaluate``)
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None


def _strategy_args(run: ServerRun) -> dict[str, Any]:
    return {
        "fraction_train": min(1.0, run.cfg.per_round / max(len(run.sites), 1)),
        "fraction_evaluate": 0.0,
        "min_train_nodes": run.cfg.quorum,
        "min_evaluate_nodes": 0,
        "min_available_nodes": run.cfg.quorum,
    }


class ZoneFedAvg(_ZoneRounds, FedAvg):
    def __init__(self, run: ServerRun) -> None:
        FedAvg.__init__(self, **_strategy_args(run))
        self.run = run
        self._sampled = {}


class ZoneFedProx(_ZoneRounds, FedProx):
    def __init__(self, run: ServerRun) -> None:
        FedProx.__init__(self, **_strategy_args(run), proximal_mu=run.cfg.mu)
        self.run = run
        self._sampled = {}


def _run_message_api(run: ServerRun, grid: Grid) -> None:
    strategy = ZoneFedProx(run) if run.cfg.strategy is Strategy.FEDPROX else ZoneFedAvg(run)
    strategy.start(
        grid=grid,
        initial_arrays=_arrays(run.global_state),
        num_rounds=run.cfg.rounds,
        timeout=run.cfg.round_timeout_s,
    )


# --- the legacy path with SecAgg+ ---------------------------------------------------------


def secagg_threshold(sampled: int, min_sites: int) -> int:
    """Shares needed to unmask a site: a majority of the round's sites, at least
    ``min_sites`` and 2, at most all of them."""
    return min(sampled, max(2, int(min_sites), sampled // 2 + 1))


def _run_secagg(run: ServerRun, grid: Grid, context: Context) -> None:
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    names = list(run.global_state)

    class SecAggFedAvg(LegacyFedAvg):
        """Legacy FedAvg whose aggregate is SecAgg+'s sum (already n-weighted)."""

        def __init__(self) -> None:
            super().__init__(
                fraction_fit=1.0,
                fraction_evaluate=0.0,
                min_fit_clients=run.cfg.quorum,
                min_evaluate_clients=0,
                min_available_clients=run.cfg.quorum,
                initial_parameters=ndarrays_to_parameters([run.global_state[k] for k in names]),
            )
            self.sampled: dict[int, list[str]] = {}

        def configure_fit(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> list[Any]:
            for halted in sorted(self.sampled):
                # SecAgg+ stopped in that round (too few sites): nothing was aggregated
                run.close_round(halted, self.sampled.pop(halted), {})
            sites = run.sample(server_round)
            self.sampled[server_round] = sites
            proxies = {p.node_id: p for p in client_manager.all().values()}
            return [
                (
                    proxies[run.sites[s].node_id],
                    FitIns(parameters, run.message_config(s, server_round)),
                )
                for s in sites
                if run.sites[s].node_id in proxies
            ]

        def aggregate_fit(
            self, server_round: int, results: list[Any], failures: list[Any]
        ) -> tuple[Any, dict[str, Any]]:
            sampled = self.sampled.pop(server_round)
            replies: dict[str, Reply] = {}
            aggregate: State | None = None
            for proxy, fitres in results:
                site = run.site_of_node(proxy.node_id)
                if site is None:
                    continue
                m = fitres.metrics
                try:
                    status = SiteStatus(str(m.get("status")))
                except ValueError:
                    status = None
                if m.get("site") != site or status is None:
                    replies[site] = Reply(site, None, None, "malformed reply")
                    continue
                touched = bool(m.get("touched", True))
                replies[site] = Reply(site, status, touched, str(m.get("reason", "")), _ledger(m))
                if aggregate is None:
                    # SecAgg+ gives every result the same (aggregated) parameters
                    arrays = parameters_to_ndarrays(fitres.parameters)
                    aggregate = {
                        k: np.asarray(a, dtype=np.float32)
                        for k, a in zip(names, arrays, strict=True)
                    }
            if aggregate is None or not all(np.isfinite(v).all() for v in aggregate.values()):
                aggregate = dict(run.global_state)  # every site had weight 0: no average
            state = run.close_round(server_round, sampled, replies, secure_aggregate=aggregate)
            return ndarrays_to_parameters([state[k] for k in names]), {}

        def configure_evaluate(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> list[Any]:
            return []

        def evaluate(self, server_round: int, parameters: Any) -> None:
            return None

    strategy = SecAggFedAvg()
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=run.cfg.rounds, round_timeout=run.cfg.round_timeout_s),
        strategy=strategy,
    )
    per_round = min(run.cfg.per_round, len(run.sites))
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=secagg_threshold(per_round, run.cfg.quorum),
            max_weight=float(max(s.plan.n_train for s in run.sites.values())),
            timeout=run.cfg.round_timeout_s,
        )
    )
    workflow(grid, legacy)
    for halted in sorted(strategy.sampled):  # the last round stopped inside SecAgg+
        run.close_round(halted, strategy.sampled.pop(halted), {})


# --- the app --------------------------------------------------------------------------------


def run_job(grid: Grid, context: Context, default_payload: str | None) -> None:
    """The ServerApp's main: setup, rounds, evaluation, files (module doc)."""
    from training.federated.site import initial_state

    path = context.run_config.get(RUN_CONFIG_KEY, default_payload)
    if not isinstance(path, str) or not path:
        raise SpecError(f"run_config.{RUN_CONFIG_KEY}", "is missing", "pass the payload's path")
    payload = load_payload(path)
    payload.out_dir.mkdir(parents=True, exist_ok=True)
    (payload.out_dir / ROUNDS_FILE).unlink(missing_ok=True)
    run = ServerRun(payload, payload.out_dir, initial_state(payload))
    try:
        run.status("setup")
        _setup(run, grid)
        run.status("training")
        if payload.config.secure_aggregation:
            _run_secagg(run, grid, context)
        else:
            _run_message_api(run, grid)
        if run.rounds_done < payload.config.rounds:
            raise ComputeError("the rounds ended early (see rounds.jsonl)", retryable=True)
        _evaluate(run, grid)
        run.flush_pending()
        run.finish()
    except BaseException as exc:
        run.fail(exc)
        raise


def build_server_app(default_payload: str | None = None) -> ServerApp:
    """The job's ServerApp; ``default_payload`` stands in for the run config's path."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_job(grid, context, default_payload)

    return app


#: the Deployment Engine's ServerApp (payload path from the run config's "job-payload")
server_app = build_server_app()
