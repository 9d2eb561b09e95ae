"""The ClientApp: one hospital's side of a federated job, for both of Flower's engines.

``client_app`` (this module's attribute; Flower app reference
``training.federated.client:client_app``) is what a SuperNode runs under the Deployment
Engine; ``build_client_app(default_payload)`` makes the same app for the Simulation Engine,
where ``run_simulation`` has no run config, so the payload path is bound in instead.

Which site am I (``context.node_config``):

* ``"site"`` if the node config names it (deployment), else
  ``config.sites[partition-id]`` (Flower injects ``partition-id`` under simulation; a
  SuperNode's ``--node-config 'partition-id=0 num-partitions=3'`` does the same).
* ``"data-path"`` (deployment, optional): the site's own governed Parquet file or dataset
  dir, read instead of the payload's dataset; otherwise ``payload.data_path(site)``.

Every read goes through ``connectors.reader.DatasetHandle(authorization=job_id)`` and
``load_split(..., sites=[site])`` (``site.py``).

Messages (the server's side is ``server.py``):

``query`` (setup)
    reply ``"site"`` ConfigRecord: site, status (SiteStatus), touched, reason, and the plan
    (n, noise-multiplier, sample-rate, steps-per-round, eval-sigma, ...).
``train``
    in: ``"arrays"`` (global model), ``"config"`` (server-round, proximal-mu, the spend the
    server has charged this site so far). Reply: ``"arrays"`` (the site's model, only if
    it trained), ``"metrics"`` MetricRecord (num-examples = training persons, epsilon,
    steps), ``"site"`` ConfigRecord (site, status, touched, reason, ledger counts).
    Under secure aggregation the same handler answers Flower's legacy fit messages
    (FitIns/FitRes) inside ``secaggplus_mod``, which is applied to those messages only.
``evaluate``
    in: ``"arrays"`` (final global model), ``"config"``. Reply: ``"metrics"`` (epsilon,
    the noisy histogram as a flat list: the release; the server derives the metrics and
    their intervals from it), ``"site"`` as above. A job with ``evaluate`` off sends none.

Nothing in a reply is a raw value: models come out of DP-SGD, metrics from a noisy
histogram, counts are the public training-split sizes, and reasons name fields only. The
training loss is never sent.

Imports are lazy (inside the handlers): under the Deployment Engine each message starts a
fresh ClientApp process (docs/engines.md), so importing this module must stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from foundation.errors import SpecError
from training.federated.payload import RUN_CONFIG_KEY, FederatedPayload, load_payload

if TYPE_CHECKING:
    from flwr.clientapp.typing import ClientAppCallable, Mod

    from training.federated.site_plan import SiteLedger, SitePlan

#: context.state record holding this site's plan and spend between rounds
STATE_KEY = "safe-zone.site"
#: the ConfigRecord every reply carries (site, status, touched, reason, ledger)
SITE_RECORD = "site"


def payload_of(context: Context, default_payload: str | None) -> FederatedPayload:
    """The job payload named by the run config (deployment) or bound in (simulation)."""
    path = context.run_config.get(RUN_CONFIG_KEY, default_payload)
    if not isinstance(path, str) or not path:
        raise SpecError(
            f"run_config.{RUN_CONFIG_KEY}",
            "is missing",
            f"pass --run-config '{RUN_CONFIG_KEY}=\"/abs/path/payload.json\"'",
        )
    return load_payload(path)


def site_of(context: Context, payload: FederatedPayload) -> tuple[str, Path | None]:
    """This node's site name and, if its node config gives one, its own data path."""
    node = context.node_config
    site = node.get("site")
    if site is None:
        pid = node.get("partition-id")
        sites = payload.config.sites
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(sites):
            raise SpecError(
                "node_config.partition-id",
                f"must be a whole number between 0 and {len(sites) - 1}",
                "set partition-id (or site) in the SuperNode's --node-config",
            )
        site = sites[pid]
    if not isinstance(site, str) or site not in payload.config.sites:
        raise SpecError("node_config.site", "is not one of the job's sites", "check --node-config")
    data_path = node.get("data-path")
    if data_path is None:
        return site, None
    if not isinstance(data_path, str) or not Path(data_path).is_absolute():
        raise SpecError("node_config.data-path", "must be an absolute path", "resolve it")
    return site, Path(data_path)


def _stored(context: Context) -> tuple[SitePlan | None, SiteLedger]:
    from training.federated.site_plan import SiteLedger, SitePlan

    rec = context.state.config_records.get(STATE_KEY)
    if rec is None:
        return None, SiteLedger()
    plan = SitePlan.from_record(rec) if "n" in rec else None
    return plan, SiteLedger.from_record(rec) if "train-steps" in rec else SiteLedger()


def _store(context: Context, plan: SitePlan | None, ledger: SiteLedger) -> None:
    values: dict[str, Any] = dict(ledger.to_record())
    if plan is not None:
        values.update(plan.to_record())
    context.state.config_records[STATE_KEY] = ConfigRecord(values)


def _server_charged(config: Any) -> SiteLedger:
    from training.federated.site_plan import SiteLedger

    def num(key: str) -> int:
        value = config.get(key, 0)
        return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0

    return SiteLedger(num("charged-train-steps"), num("charged-evals"), num("charged-rounds"))


def _site_record(
    site: str, status: str, touched: bool, reason: str, ledger: SiteLedger
) -> ConfigRecord:
    return ConfigRecord(
        {
            "site": site,
            "status": status,
            "touched": bool(touched),
            "reason": reason,
            **ledger.to_record(),
        }
    )


def _plan_for(
    payload: FederatedPayload, context: Context, site: str, data_path: Path | None
) -> tuple[SitePlan | None, SiteLedger, str]:
    """The stored plan, or (a node that lost its state) the same plan made again."""
    from training.federated.site import SiteStatus, setup_site

    plan, ledger = _stored(context)
    if plan is not None and plan.site == site:
        return plan, ledger, ""
    setup = setup_site(payload, site, data_path)
    if setup.status is not SiteStatus.READY:
        return None, ledger, setup.reason
    return setup.plan, ledger, ""


def handle_setup(msg: Message, context: Context, default_payload: str | None) -> Message:
    from training.federated.site import SiteStatus, setup_site

    payload = payload_of(context, default_payload)
    site, data_path = site_of(context, payload)
    setup = setup_site(payload, site, data_path)
    _, ledger = _stored(context)
    if setup.plan is not None:
        _store(context, setup.plan, ledger)
    record = _site_record(site, setup.status.value, setup.touched, setup.reason, ledger)
    if setup.status is SiteStatus.READY and setup.plan is not None:
        for key, value in setup.plan.to_record().items():
            record[key] = value
    return Message(RecordDict({SITE_RECORD: record}), reply_to=msg)


def _epsilon(plan: SitePlan | None, ledger: SiteLedger) -> float:
    return 0.0 if plan is None else plan.epsilon(ledger.train_steps, ledger.evals)


def _train(
    payload: FederatedPayload,
    context: Context,
    server_round: int,
    global_state: dict[str, Any],
    charged: SiteLedger,
) -> tuple[str, Any, SitePlan | None]:
    """Shared by the Message API and the legacy (SecAgg+) formats: (site, outcome, plan)."""
    from training.federated.site import SiteStatus, TrainOutcome, train_round

    site, data_path = site_of(context, payload)
    plan, ledger, why = _plan_for(payload, context, site, data_path)
    ledger = ledger.merged(charged)
    if plan is None:
        outcome = TrainOutcome(site, SiteStatus.FAILED, ledger, True, reason=why)
    else:
        outcome = train_round(payload, plan, ledger, server_round, global_state, data_path)
    _store(context, plan, outcome.ledger)
    return site, outcome, plan


def handle_train(msg: Message, context: Context, default_payload: str | None) -> Message:
    if "fitins.parameters" in msg.content.array_records:
        return _handle_legacy_fit(msg, context, default_payload)
    payload = payload_of(context, default_payload)
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    arrays = msg.content.array_records["arrays"]
    global_state = {k: v.numpy() for k, v in arrays.items()}
    site, outcome, plan = _train(
        payload, context, server_round, global_state, _server_charged(config)
    )
    content = RecordDict(
        {
            SITE_RECORD: _site_record(
                site, outcome.status.value, outcome.touched, outcome.reason, outcome.ledger
            ),
            "metrics": MetricRecord(
                {
                    "num-examples": plan.n_train if plan is not None else 0,
                    "epsilon": _epsilon(plan, outcome.ledger),
                    "steps": outcome.ledger.train_steps,
                }
            ),
        }
    )
    if outcome.state is not None:
        from flwr.app import Array

        content["arrays"] = ArrayRecord({k: Array(v) for k, v in outcome.state.items()})
    return Message(content, reply_to=msg)


def _handle_legacy_fit(msg: Message, context: Context, default_payload: str | None) -> Message:
    """Flower's legacy fit format, as SecAgg+'s workflow sends it (FitIns -> FitRes)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from training.federated.site import SiteStatus, initial_state

    payload = payload_of(context, default_payload)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = int(fitins.config["server-round"])
    # legacy parameters are an ordered list; the names are the model's state_dict order
    names = list(initial_state(payload))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(names):
        raise SpecError("fitins.parameters", "does not match the model's parameter count")
    global_state = dict(zip(names, arrays, strict=True))
    site, outcome, plan = _train(
        payload, context, server_round, global_state, _server_charged(fitins.config)
    )
    trained = outcome.status is SiteStatus.TRAINED and outcome.state is not None
    # a site that did not train still answers, with weight 0: SecAgg+ then sums it in with
    # no effect, instead of treating it as a dropout to be unmasked
    values = [outcome.state[k] for k in names] if trained else arrays
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(values),
        num_examples=plan.n_train if (trained and plan is not None) else 0,
        metrics={
            "site": site,
            "status": outcome.status.value,
            "touched": bool(outcome.touched),
            "reason": outcome.reason,
            "epsilon": _epsilon(plan, outcome.ledger),
            **outcome.ledger.to_record(),
        },
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, default_payload: str | None) -> Message:
    from training.federated.site import EvalOutcome, SiteStatus, evaluate_site

    payload = payload_of(context, default_payload)
    config = msg.content.config_records["config"]
    arrays = msg.content.array_records["arrays"]
    global_state = {k: v.numpy() for k, v in arrays.items()}
    site, data_path = site_of(context, payload)
    plan, ledger, why = _plan_for(payload, context, site, data_path)
    ledger = ledger.merged(_server_charged(config))
    if plan is None:
        outcome = EvalOutcome(site, SiteStatus.FAILED, ledger, True, reason=why)
    else:
        outcome = evaluate_site(payload, plan, ledger, global_state, data_path)
    _store(context, plan, outcome.ledger)
    metrics: dict[str, Any] = {"epsilon": _epsilon(plan, outcome.ledger)}
    if outcome.histogram is not None:
        # the release itself; the server derives every figure (and its interval) from it
        metrics["histogram"] = [float(x) for x in outcome.histogram.ravel()]
    record = _site_record(
        site, outcome.status.value, outcome.touched, outcome.reason, outcome.ledger
    )
    return Message(
        RecordDict({SITE_RECORD: record, "metrics": MetricRecord(metrics)}), reply_to=msg
    )


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's ``secaggplus_mod`` only to SecAgg+ messages (those carrying its
    config record); plain Message-API training passes straight through (docs/engines.md)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def build_client_app(default_payload: str | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """The site's ClientApp. ``default_payload`` (an absolute path) stands in for the run
    config's ``"job-payload"`` where the engine has none (``run_simulation``). ``mods`` wrap
    every handler (Flower mods), e.g. a fault-injection mod in tests."""
    app = ClientApp(mods=list(mods))

    @app.query()
    def setup(msg: Message, context: Context) -> Message:
        return handle_setup(msg, context, default_payload)

    @app.train(mods=[secagg_when_asked])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, default_payload)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, default_payload)

    return app


#: the Deployment Engine's ClientApp (payload path from the run config's "job-payload")
client_app = build_client_app()
