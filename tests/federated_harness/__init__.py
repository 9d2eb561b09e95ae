"""Test machinery for federated training; not part of the product.

Imported from test files as ``federated_harness.<module>`` (pytest puts ``tests/`` on
``sys.path``; a simulation's child process and its Ray actors inherit that path):

- ``reference``: ``run_reference``, the same federated job as an in-process loop (no
  Flower, no Ray); the simulation's weights must equal its weights bit for bit. The
  federated benchmark uses it as its baseline too.
- ``faults``: ``faulty_client_app``, a ClientApp whose site crashes in a given round
  (``client_factory="federated_harness.faults:faulty_client_app"``).
- ``deployment``: ``LoopbackFederation``, Flower's Deployment Engine on loopback (one
  SuperLink, one SuperNode per site, each its own process).
"""
