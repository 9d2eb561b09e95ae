"""The server's side of a federated job without the engine: sampling, accounting, records.

``ServerRun`` is driven by the Flower ServerApp (``server.py``) and by the in-process
reference loop (``reference.py``) alike, so both sample the same sites, charge the same
spend and aggregate the same way. It imports no Flower.

Accounting. The server keeps each site's spend itself (counts of DP-SGD steps and
evaluations, times the site's plan), so a site that crashes still gets charged: a site
that answered "failed" is charged by what it says it touched; one that sent an error or
no reply is charged its whole planned step (touched unknown = assume it ran). A site that
drops out takes no further part. Epsilons are always ``epsilon_for`` over the history.

Client-level DP (``client_dp``): the server clips each site's update and adds noise
(``weights.dp_average``) and accounts it with its own RDP accountant: unit = site,
``GaussianStep(z, 1.0, rounds with a release)``. The sample rate is 1.0, not
``clients_per_round / sites``: the sites of a round are drawn from the public seed and
written to ``rounds.jsonl``, so the subsampling is not secret and amplification by
sampling does not apply.

``rounds.jsonl`` (one line per round, appended when the round ends; the last round's line
after the evaluation, with its metrics)::

    {"round": 2,
     "sites": {"hospital-a": {"epsilon": 0.61, "delta": 1e-06, "steps": 72, "n": 5021,
                              "status": "trained", "dp_metrics": null}, ...},
     "trained": ["hospital-a", "hospital-b"], "refused": [],
     "dropped": ["hospital-c"],
     "dropped_detail": {"hospital-c": {"touched": null, "reason": "error reply (code 0)"}},
     "server_epsilon": null}

``sites`` holds every site that has a plan, with its cumulative figures, so the last line
has each site's final charge. A site's ``status``: trained | idle (not sampled) | refused
(out of budget, read nothing) | dropped | out (dropped or refused earlier). ``touched``:
true/false as the site said, null when it could not say.

``summary.json``: job_id, status (completed | failed), error, strategy, secure_aggregation,
rounds_planned, rounds_done, privacy (accountant, neighbouring, unit, target_epsilon,
delta), sites (per site: epsilon, delta, steps, evals, rounds, n, status, touched,
dp_metrics, plan), excluded ([{site, reason}]), dropped, server_dp, evaluation ("skipped"
when the job runs none), global_dp_metrics, weights. Every ``dp_metrics`` is
``privacy.dp_metrics.DPMetrics.to_dict()``: figures, ``ci95``, ``unreliable``. Written on failure too, so the zone can charge what was spent.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from foundation.errors import ComputeError, SpecError, ZoneError
from training.federated.config import EVALUATION_DONE, EVALUATION_SKIPPED, Strategy
from training.federated.payload import (
    ROUNDS_FILE,
    STATUS_FILE,
    SUMMARY_FILE,
    WEIGHTS_FILE,
    FederatedPayload,
    derive_seed,
)
from training.federated.site import SiteSetup, SiteStatus, clean_metrics
from training.federated.site_plan import SiteLedger, SitePlan

State = dict[str, np.ndarray]


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def error_text(exc: BaseException) -> str:
    """An error for the job's files: ours name fields only; others by type only."""
    if isinstance(exc, ZoneError):
        return str(exc)
    return f"the server failed ({type(exc).__name__})"


def select_sites(active: Iterable[str], k: int, seed: int, server_round: int) -> list[str]:
    """The sites a round trains: all if ``k`` covers them, else ``k`` drawn with the public
    seed (a function of the seed, the round and the active sites only), sorted."""
    pool = sorted(active)
    if k >= len(pool):
        return pool
    rng = np.random.default_rng([seed, server_round])
    return sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))


@dataclass(frozen=True)
class Reply:
    """One site's answer to a train or evaluate message, as the server reads it."""

    site: str
    #: None: an error reply or no reply at all (the site could not say what it did)
    status: SiteStatus | None
    touched: bool | None
    reason: str
    ledger: SiteLedger | None = None
    #: FedAvg weight: the site's training persons
    weight: float = 0.0
    state: State | None = field(default=None, repr=False)
    histogram: np.ndarray | None = field(default=None, repr=False)


def no_reply(site: str, reason: str = "no reply") -> Reply:
    return Reply(site, None, None, reason)


@dataclass(frozen=True)
class SiteRecord:
    """The server's record of one site; ``ServerRun`` replaces it as the job goes on."""

    name: str
    node_id: int
    plan: SitePlan
    ledger: SiteLedger = field(default_factory=SiteLedger)
    active: bool = True
    touched: bool | None = True
    dropped_in: int | None = None
    dp_metrics: dict[str, Any] | None = None

    def epsilon(self) -> float:
        return self.plan.epsilon(self.ledger.train_steps, self.ledger.evals)


class ServerRun:
    """Everything one job's server knows; writes the job's files when ``out`` is a folder."""

    def __init__(self, payload: FederatedPayload, out: Path | None, initial: State) -> None:
        self.payload = payload
        self.cfg = payload.config
        self.out = out
        self.sites: dict[str, SiteRecord] = {}
        self.excluded: dict[str, str] = {}
        self.global_state: State = dict(initial)
        self.rounds_done = 0
        self.server_releases = 0
        self.pending_line: dict[str, Any] | None = None
        self.global_metrics: dict[str, Any] | None = None

    # -- files -------------------------------------------------------------------------
    def status(self, phase: str, **extra: Any) -> None:
        if self.out is None:
            return
        body = {
            "job_id": self.payload.job_id,
            "phase": phase,
            "round": self.rounds_done,
            "rounds": self.cfg.rounds,
            "sites": self.active(),
            "excluded": sorted(self.excluded),
            **extra,
        }
        atomic_write(self.out / STATUS_FILE, json.dumps(body, sort_keys=True))

    def _append_line(self, line: Mapping[str, Any]) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # one write of one whole line: a reader polling the file sees complete lines only
        # (it parses up to the last newline); no fsync, the summary is the durable record
        with open(self.out / ROUNDS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")

    # -- setup -------------------------------------------------------------------------
    def register(self, entries: Sequence[tuple[int, SiteSetup]]) -> None:
        """Take each node's setup answer: ready sites join, the others are left out."""
        for node_id, setup in entries:
            name = setup.site
            if name not in self.cfg.sites:
                continue
            if name in self.sites or name in self.excluded:
                self.excluded.setdefault(
                    name, f"site {name!r} answered from two nodes; the second is ignored"
                )
                continue
            if setup.status is SiteStatus.READY and setup.plan is not None:
                self.sites[name] = SiteRecord(name, node_id, setup.plan)
            else:
                self.excluded[name] = setup.reason or f"site {name!r} failed at setup"
        for name in self.cfg.sites:
            if name not in self.sites and name not in self.excluded:
                self.excluded[name] = f"site {name!r} did not answer the setup"
        if len(self.sites) < self.cfg.quorum:
            raise ComputeError(
                f"only {len(self.sites)} site(s) are ready, fewer than federated.min_sites "
                f"({self.cfg.quorum}); summary.json lists why the others are left out",
                retryable=False,
            )

    # -- rounds ------------------------------------------------------------------------
    def active(self) -> list[str]:
        return sorted(s.name for s in self.sites.values() if s.active)

    def sample(self, server_round: int) -> list[str]:
        active = self.active()
        if len(active) < self.cfg.quorum:
            raise ComputeError(
                f"round {server_round}: only {len(active)} site(s) are still active, fewer "
                f"than federated.min_sites ({self.cfg.quorum})",
                retryable=True,
            )
        return select_sites(active, self.cfg.per_round, self.cfg.seed, server_round)

    def charged(self, site: str) -> SiteLedger:
        return self.sites[site].ledger

    def message_config(self, site: str, server_round: int) -> dict[str, Any]:
        """What a train/evaluate message tells a site: the round, FedProx's mu, and the
        spend the server has charged it (a node that lost its state resumes from this)."""
        ledger = self.sites[site].ledger
        config: dict[str, Any] = {
            "server-round": server_round,
            "charged-train-steps": ledger.train_steps,
            "charged-evals": ledger.evals,
            "charged-rounds": ledger.rounds,
        }
        if self.cfg.strategy is Strategy.FEDPROX:
            config["proximal-mu"] = self.cfg.mu
        return config

    def site_of_node(self, node_id: int) -> str | None:
        for s in self.sites.values():
            if s.node_id == node_id:
                return s.name
        return None

    def _update(self, site: str, **changes: Any) -> None:
        self.sites[site] = replace(self.sites[site], **changes)

    def _charge(self, reply: Reply, *, evaluation: bool) -> None:
        s = self.sites[reply.site]
        led = s.ledger if reply.ledger is None else s.ledger.merged(reply.ledger)
        if reply.status is None:
            # no word from the site: assume it did the whole step it was asked for
            led = (
                SiteLedger(led.train_steps, led.evals + 1, led.rounds)
                if evaluation
                else SiteLedger(led.train_steps + s.plan.steps_per_round, led.evals, led.rounds + 1)
            )
        self._update(reply.site, ledger=led)

    def _site_figures(self, statuses: Mapping[str, str]) -> dict[str, Any]:
        out = {}
        for name in sorted(self.sites):
            s = self.sites[name]
            out[name] = {
                "epsilon": s.epsilon(),
                "delta": self.cfg.delta,
                "steps": s.ledger.train_steps,
                "n": s.plan.n_train,
                "status": statuses.get(name, "idle" if s.active else "out"),
                "dp_metrics": s.dp_metrics,
            }
        return out

    def server_epsilon(self) -> float | None:
        dp = self.cfg.client_dp
        if dp is None:
            return None
        from privacy.accountant import GaussianStep, epsilon_for

        step = GaussianStep(dp.noise_multiplier, 1.0, self.server_releases)
        return epsilon_for([step], self.cfg.delta)

    def close_round(
        self,
        server_round: int,
        sampled: Sequence[str],
        replies: Mapping[str, Reply],
        secure_aggregate: State | None = None,
    ) -> State:
        """Charge, drop, aggregate (fixed order) and record one round; the new global model.

        ``secure_aggregate``: SecAgg+'s already n-weighted average (the server never sees a
        site's own model then)."""
        from training.federated.weights import SiteUpdate, check_like, dp_average, weighted_average

        statuses: dict[str, str] = {}
        dropped: dict[str, dict[str, Any]] = {}
        updates: list[SiteUpdate] = []
        refused: list[str] = []
        for site in sampled:
            reply = replies.get(site) or no_reply(site)
            self._charge(reply, evaluation=False)
            if reply.status is SiteStatus.TRAINED and reply.state is not None:
                try:
                    check_like(reply.state, self.global_state, f"site {site!r} model")
                except SpecError as exc:
                    reply = Reply(site, SiteStatus.FAILED, True, str(exc), reply.ledger)
            if reply.status is SiteStatus.TRAINED and (
                reply.state is not None or secure_aggregate is not None
            ):
                statuses[site] = "trained"
                if reply.state is not None:
                    updates.append(SiteUpdate(site, reply.weight, reply.state))
                continue
            # out of budget or failed: it takes no further part
            if reply.status is SiteStatus.REFUSED:
                self._update(site, active=False)
                statuses[site] = "refused"
                refused.append(site)
                continue
            self._update(site, active=False, dropped_in=server_round, touched=reply.touched)
            statuses[site] = "dropped"
            dropped[site] = {"touched": reply.touched, "reason": reply.reason}
        trained = sorted(s for s, st in statuses.items() if st == "trained")
        enough = len(trained) >= self.cfg.quorum
        if enough:
            if secure_aggregate is not None:
                new_state = {
                    k: np.asarray(v, dtype=np.float32) for k, v in secure_aggregate.items()
                }
            elif self.cfg.client_dp is not None:
                seed = derive_seed(self.payload.secret, "server", server_round)
                new_state = dp_average(
                    updates,
                    self.global_state,
                    self.cfg.client_dp,
                    len(sampled),
                    np.random.default_rng(seed),
                )
                self.server_releases += 1
            else:
                new_state = weighted_average(updates)
            self.global_state = new_state
            self.rounds_done = server_round
        line = {
            "round": server_round,
            "sites": self._site_figures(statuses),
            "trained": trained,
            "refused": sorted(refused),
            "dropped": sorted(dropped),
            "dropped_detail": dropped,
            "server_epsilon": self.server_epsilon(),
        }
        if not enough:
            self._append_line(line)
            raise ComputeError(
                f"round {server_round}: {len(trained)} site(s) trained, fewer than "
                f"federated.min_sites ({self.cfg.quorum})",
                retryable=True,
            )
        if server_round == self.cfg.rounds:
            self.pending_line = line  # written after the evaluation, with its metrics
        else:
            self._append_line(line)
            self.status("training")
        return self.global_state

    def close_evaluation(self, targets: Sequence[str], replies: Mapping[str, Reply]) -> None:
        """Charge the evaluation, derive each site's metrics from its histogram and pool the
        histograms. Every figure carries its 95% interval and the unreliable flag
        (``privacy.dp_metrics``); the redraws behind the intervals are seeded from the job's
        secret (post-processing: no charge)."""
        from training.federated.metrics import metrics_from_histogram, pooled_metrics

        secret = self.payload.secret
        pooled = []
        for site in targets:
            reply = replies.get(site) or no_reply(site)
            self._charge(reply, evaluation=True)
            sigma = self.sites[site].plan.eval_sigma
            if (
                reply.status is SiteStatus.EVALUATED
                and reply.histogram is not None
                and sigma is not None
            ):
                seed = derive_seed(secret, "eval-interval", site)
                metrics = metrics_from_histogram(reply.histogram, sigma, seed)
                self._update(site, dp_metrics=clean_metrics(metrics.to_dict()))
                pooled.append((reply.histogram, sigma))
        pooled_seed = derive_seed(secret, "eval-interval", "pooled")
        pooled_result = pooled_metrics(pooled, pooled_seed)
        self.global_metrics = (
            None if pooled_result is None else clean_metrics(pooled_result.to_dict())
        )

    def skip_evaluation(self) -> None:
        """``evaluate`` off: no evaluation message, no charge, no metrics."""
        self.global_metrics = None

    def flush_pending(self) -> None:
        """Write the last round's line, with the figures after the evaluation."""
        if self.pending_line is None:
            return
        line = dict(self.pending_line)
        line["sites"] = {
            name: {
                **fig,
                "epsilon": self.sites[name].epsilon(),
                "steps": self.sites[name].ledger.train_steps,
                "dp_metrics": self.sites[name].dp_metrics,
            }
            for name, fig in line["sites"].items()
        }
        line["server_epsilon"] = self.server_epsilon()
        self._append_line(line)
        self.pending_line = None

    # -- the end -----------------------------------------------------------------------
    def summary(self, status: str, error: str = "") -> dict[str, Any]:
        from privacy.accountant import NEIGHBOURING, UNIT

        cfg = self.cfg
        sites = {}
        for name in sorted(self.sites):
            s = self.sites[name]
            sites[name] = {
                "epsilon": s.epsilon(),
                "delta": cfg.delta,
                "steps": s.ledger.train_steps,
                "evals": s.ledger.evals,
                "rounds": s.ledger.rounds,
                "n": s.plan.n_train,
                "status": "completed" if s.active else ("dropped" if s.dropped_in else "stopped"),
                "touched": s.touched,
                "dp_metrics": s.dp_metrics,
                "plan": s.plan.card(),
            }
        dp = cfg.client_dp
        return {
            "job_id": self.payload.job_id,
            "status": status,
            "error": error or None,
            "strategy": cfg.strategy.value,
            "secure_aggregation": cfg.secure_aggregation,
            "rounds_planned": cfg.rounds,
            "rounds_done": self.rounds_done,
            "privacy": {
                "accountant": "rdp",
                "neighbouring": NEIGHBOURING,
                "unit": UNIT,
                "target_epsilon": cfg.epsilon,
                "delta": cfg.delta,
            },
            "sites": sites,
            "excluded": [{"site": k, "reason": v} for k, v in sorted(self.excluded.items())],
            "dropped": sorted(n for n, s in self.sites.items() if s.dropped_in is not None),
            "server_dp": None
            if dp is None
            else {
                "epsilon": self.server_epsilon(),
                "delta": cfg.delta,
                "noise_multiplier": dp.noise_multiplier,
                "clipping_norm": dp.clipping_norm,
                "releases": self.server_releases,
                "sample_rate": 1.0,
                "neighbouring": "add/remove one site",
                "unit": "site",
            },
            "evaluation": EVALUATION_DONE if cfg.evaluate else EVALUATION_SKIPPED,
            "global_dp_metrics": self.global_metrics,
            "weights": WEIGHTS_FILE if status == "completed" else None,
        }

    def finish(self) -> None:
        from training.federated.weights import save_weights

        if self.out is None:
            return
        save_weights(self.out / WEIGHTS_FILE, self.global_state, self.cfg.model)
        summary = json.dumps(self.summary("completed"), indent=2, sort_keys=True)
        atomic_write(self.out / SUMMARY_FILE, summary)
        self.status("done")

    def fail(self, exc: BaseException) -> None:
        self.flush_pending()
        if self.out is None:
            return
        summary = json.dumps(self.summary("failed", error_text(exc)), indent=2, sort_keys=True)
        atomic_write(self.out / SUMMARY_FILE, summary)
        self.status("failed", error=error_text(exc))
