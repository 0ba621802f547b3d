"""Fixtures for cluster tests: N real pacsp2p peers (separate twistd processes) joined by
the overlay, with a cluster CA made in a temporary directory (pacsp2p.testing.cluster).

``make_cluster(3, destinations={...})`` -> a started, meshed Cluster (module scope);
stopped by PID at teardown.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytest

from pacsp2p.testing.cluster import Cluster


@pytest.fixture(scope="module")
def make_cluster(tmp_path_factory):
    """Factory: make_cluster(n, destinations=None, config=None) -> Cluster of n meshed
    peers (*config* deep-merged into every peer's config)."""
    made: list[Cluster] = []

    def factory(n: int, destinations: Mapping[str, str] | None = None,
                config: Mapping[str, Any] | None = None) -> Cluster:
        cluster = Cluster(tmp_path_factory.mktemp("cluster"), destinations, config)
        made.append(cluster)
        cluster.start(n)
        cluster.wait_mesh()
        return cluster

    yield factory
    for cluster in made:
        cluster.stop()
