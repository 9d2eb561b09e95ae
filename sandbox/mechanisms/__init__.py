"""The job mechanisms, by name: each implements ``sandbox.mechanisms.base.JobMechanism``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from sandbox.mechanisms.base import JobMechanism
from sandbox.mechanisms.dpsgd import DpsgdMechanism
from sandbox.mechanisms.dry_run import DryRunMechanism
from sandbox.mechanisms.federated import FederatedMechanism
from sandbox.mechanisms.synthetic import SyntheticMechanism

MECHANISMS: Mapping[str, JobMechanism] = MappingProxyType(
    {
        m.kind: m
        for m in (DpsgdMechanism(), FederatedMechanism(), SyntheticMechanism(), DryRunMechanism())
    }
)
