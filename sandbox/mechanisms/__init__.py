"""The job mechanisms, by name: each implements ``sandbox.mechanisms.base.JobMechanism``.

A registry of names, each resolved to its class on first use (as ``privacy.synth.registry``
maps synthesizers): the mechanisms bring the data plane with them (numpy, Arrow, the
synthesizers, the planners), and a command that only reads the zone's state (``jobs list``,
``access grants``, ``audit verify``) should not pay their import (~0.2 s of ~0.6 s).
"""

from __future__ import annotations

import importlib
from functools import cache
from types import MappingProxyType

from sandbox.mechanisms.base import JobMechanism

#: job kind -> (module, class) of its mechanism
REGISTRY = MappingProxyType(
    {
        "dp-sgd": ("sandbox.mechanisms.dpsgd", "DpsgdMechanism"),
        "federated": ("sandbox.mechanisms.federated", "FederatedMechanism"),
        "synthetic": ("sandbox.mechanisms.synthetic", "SyntheticMechanism"),
        "dry-run": ("sandbox.mechanisms.dry_run", "DryRunMechanism"),
    }
)


@cache
def mechanism(kind: str) -> JobMechanism:
    """The one mechanism of job kind ``kind`` (a key of :data:`REGISTRY`; ``KeyError``
    otherwise: kinds come from the zone's own code, never from a user)."""
    module, name = REGISTRY[kind]
    # tests/sandbox/test_mechanism_registry.py holds each class's own kind to its key here
    found: JobMechanism = getattr(importlib.import_module(module), name)()
    return found
