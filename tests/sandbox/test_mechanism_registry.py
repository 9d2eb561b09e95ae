"""The job kinds resolve, by name and on first use, to the mechanism that says it is that kind
(``sandbox.mechanisms.mechanism``); an unknown kind is a ``KeyError`` (kinds come from the
zone's own code, never from a user)."""

from __future__ import annotations

import pytest

from sandbox.mechanisms import REGISTRY, mechanism
from sandbox.mechanisms.base import JobMechanism


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_each_kind_resolves_to_its_one_mechanism(kind: str) -> None:
    found = mechanism(kind)
    assert isinstance(found, JobMechanism) and found.kind == kind
    assert mechanism(kind) is found  # one instance per kind, as the runner had


def test_the_four_kinds_and_no_other() -> None:
    assert set(REGISTRY) == {"dp-sgd", "federated", "synthetic", "dry-run"}
    with pytest.raises(KeyError):
        mechanism("free-lunch")
