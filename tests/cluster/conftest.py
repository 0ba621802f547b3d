"""Fixtures for cluster tests: N real pacsp2p peers (separate twistd processes) joined by
the overlay, with a cluster CA made in a temporary directory (pacsp2p.testing.cluster).

``make_cluster(3, destinations={...})`` -> a started, meshed Cluster (module scope);
stopped by PID at teardown. ``dest``: a DCMTK storescp, the C-MOVE destination STORESCP;
``trio``: three peers (R=2, W=2) that know it, placing by the strategy's order alone
(``first_copy = "placement"``: copies only pushed, or one kept here, as rendezvous says). ``cluster``: an empty Cluster
(function scope) to start peers in.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytest

from pacsp2p.testing import StoreSCP
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


@pytest.fixture
def cluster(tmp_path):
    """An empty Cluster under *tmp_path* (``start``/``add`` peers), stopped at teardown."""
    c = Cluster(tmp_path / "cluster")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    """A DCMTK storescp (+B: files exactly as received), the C-MOVE destination STORESCP."""
    with StoreSCP(tmp_path_factory.mktemp("storescp") / "in", extra=["+B"]) as scp:
        yield scp


@pytest.fixture(scope="module")
def trio(make_cluster, dest):
    """Three peers (R=2, W=2) that know STORESCP and place every copy by rendezvous
    (``first_copy = "placement"``): the writer holds a copy of 2 in 3 instances, pushes
    both of the others' -- the paths these tests are about. The default (``"auto"``, one
    copy where it arrives): tests/cluster/test_first_copy.py."""
    return make_cluster(3, destinations={"STORESCP": dest.address},
                        config={"strategies": {"first_copy": "placement"}})
