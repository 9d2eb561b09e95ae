"""How many ClientApp actors a federated simulation starts (``simulation.client_cpus``).

Flower's Ray backend starts ``floor(node CPUs / client CPUs)`` actors per node whatever the
site count; the zone asks each client for enough CPUs that the pool is at most one actor per
site, never fewer CPUs than the spec asked, and every count still fits its node."""

from __future__ import annotations

import pytest

from training.federated.simulation import client_cpus


def flower_pool(node_cpus: list[float], cpus: float) -> int:
    """Flower's own count (``pool_size_from_resources``), written out: per node, int(n / c)."""
    return sum(int(n / cpus) for n in node_cpus)


@pytest.mark.parametrize(
    ("nodes", "sites", "asked", "actors"),
    [
        ([16], 2, 1.0, 2),  # a GPU node: 2 actors of 8 CPUs, not 16 of 1
        ([16], 3, 1.0, 3),  # 16 / 3 cut to 5.3333: three fit
        ([16], 3, 4.0, 3),  # the spec's 4 would give 4 actors for 3 sites
        ([8, 8], 3, 1.0, 2),  # a third actor would need a node's half: two of 8
        ([64, 8], 2, 1.0, 2),
        ([2], 3, 1.0, 2),  # fewer CPUs than sites: one CPU each, as asked
        ([2], 2, 1.0, 2),  # the tests' Ray: unchanged
        ([2], 1, 1.0, 1),
        ([16], 20, 1.0, 16),
    ],
)
def test_the_pool_is_at_most_one_actor_per_site(
    nodes: list[float], sites: int, asked: float, actors: int
) -> None:
    cpus = client_cpus(nodes, sites, asked)
    assert cpus >= asked
    assert flower_pool(nodes, cpus) == actors
    # every actor fits its node and the pool never exceeds the sites unless each already
    # has only what it asked for
    assert flower_pool(nodes, cpus) <= sites or cpus == asked
    assert flower_pool(nodes, cpus) >= 1


def test_no_node_with_cpus_leaves_the_ask_as_it_was() -> None:
    assert client_cpus([], 3, 1.0) == 1.0
    assert client_cpus([0.0], 3, 2.0) == 2.0
