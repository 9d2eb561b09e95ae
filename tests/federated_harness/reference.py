"""The reference: the same federated job as an in-process loop, no Flower, no Ray.

``run_reference(payload)`` calls the very functions the ClientApp calls (``site.py``:
setup, one round of DP-SGD per sampled site) and the server's book-keeping and aggregation
(``rounds.ServerRun``, ``weights.py``), one site after another in this process. Same
payload (seed and secret), same sites sampled, same noise, same fixed-order average: the
simulation's global weights must equal these bit for bit, which is how the tests check the
Flower path, and it is the benchmark's baseline for Flower's overhead
(``benchmarks/bench_federated.py`` imports it from here). Test machinery, not product code.

It writes no files and runs no evaluation (those are releases; the simulation makes them),
and it has no secure aggregation: with ``secure_aggregation`` set it returns the plain
average that SecAgg+ approximates.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.federated.payload import FederatedPayload, load_payload
from training.federated.rounds import Reply, ServerRun
from training.federated.site import initial_state, setup_site, train_round
from training.federated.site_plan import SiteLedger


def run_reference(
    payload: FederatedPayload | str | Path,
    *,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, np.ndarray]:
    """The global model after ``config.rounds`` rounds (state_dict names -> float32 arrays).

    ``on_round(round, info)`` is called once the setup is done (round 0: the ready and the
    excluded sites) and after each round (the sites that trained, each site's epsilon so
    far), for progress and timing."""
    if not isinstance(payload, FederatedPayload):
        payload = load_payload(Path(payload).resolve())
    cfg = payload.config
    run = ServerRun(payload, None, initial_state(payload))
    run.register([(i, setup_site(payload, site)) for i, site in enumerate(cfg.sites)])
    # each site's own view of its spend, as its context.state would carry it
    ledgers: dict[str, SiteLedger] = {site: SiteLedger() for site in run.sites}
    if on_round is not None:
        on_round(0, {"ready": run.active(), "excluded": sorted(run.excluded)})
    for server_round in range(1, cfg.rounds + 1):
        sampled = run.sample(server_round)
        replies: dict[str, Reply] = {}
        for site in sampled:
            plan = run.sites[site].plan
            ledger = ledgers[site].merged(run.charged(site))
            out = train_round(payload, plan, ledger, server_round, run.global_state)
            ledgers[site] = out.ledger
            replies[site] = Reply(
                site,
                out.status,
                out.touched,
                out.reason,
                out.ledger,
                float(plan.n_train),
                out.state,
            )
        run.close_round(server_round, sampled, replies)
        if on_round is not None:
            on_round(
                server_round,
                {
                    "trained": sorted(s for s, r in replies.items() if r.state is not None),
                    "epsilon": {s: run.sites[s].epsilon() for s in run.sites},
                },
            )
    return dict(run.global_state)
