"""Federated DP training across the zone's sites (hospitals) with Flower.

Modules (Flower is imported only in ``client``, ``server`` and ``simulation``):

- ``config``: ``Strategy``, ``ClientDPConfig``, ``FederatedConfig``.
- ``payload``: ``FederatedPayload`` (the job file the zone writes; its path is the run
  config's ``"job-payload"``), ``load_payload``, ``derive_seed``.
- ``site``: what one site does (setup, a round of DP-SGD, the DP evaluation), engine-free;
  ``site_plan``: its DP plan and spend (``SitePlan``, ``SiteLedger``).
- ``client``: ``client_app`` / ``build_client_app`` (Flower ClientApp).
- ``server``: ``server_app`` / ``build_server_app`` (Flower ServerApp), rounds.jsonl, summary.
- ``simulation``: ``run_federated_simulation`` -> ``FederatedResult`` (Simulation Engine, Ray).
- ``weights``, ``metrics``: fixed-order aggregation, client-level DP, pooled DP metrics.
- ``flwr_app/``: the Flower App (``pyproject.toml`` only) that ``flwr run`` starts under
  the Deployment Engine.

Test machinery (the in-process reference loop, fault injection, a loopback Deployment
Engine harness) lives in ``tests/federated_harness/``, outside the product.
"""

from training.federated.config import ClientDPConfig, FederatedConfig, Strategy
from training.federated.payload import RUN_CONFIG_KEY, FederatedPayload, load_payload

__all__ = [
    "RUN_CONFIG_KEY",
    "ClientDPConfig",
    "FederatedConfig",
    "FederatedPayload",
    "Strategy",
    "load_payload",
]
