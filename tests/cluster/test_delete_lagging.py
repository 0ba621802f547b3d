"""A delete at a peer that lags behind the others' catalogs (real twistd peers).

peerc pulls catalog facts at most once an hour (``pull_interval`` 3600 s), so it knows
only part of what peera and peerb hold: of a series stored after its first pull, only
its own copies. A delete of the study at peerc first catches up with the peers alive
(``Deleter._catch_up``), so it deletes every instance of the study and its tombstones
cover every copy: no peer finds any of it, no archive keeps a file of it. Without the
catch-up the instances peerc had not heard of stayed everywhere.
"""
from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, wait_until

from test_delete import delete, files_of, find_images, uids_of, where


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("lagging"))
    c.start(3, per_peer={"peerc": {"overlay": {"pull_interval": 3600.0}}})
    c.wait_mesh()
    yield c
    c.stop()


def test_a_delete_at_a_lagging_peer_removes_what_it_had_not_heard_of(cluster, tmp_path):
    a, b, c = cluster.peers
    files = datasets.make_study(tmp_path / "s", patient_id="LAG1", size=16,
                                series=[("CT", 6, ExplicitVRLittleEndian),
                                        ("MR", 8, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    first = [f for f in files if f.parent.name.startswith("01_")]
    later = [f for f in files if f not in first]
    storescu(a.port, a.ae_title, first)       # peerc's one pull of the hour, early in it
    wait_until(lambda: len(where(a, study)) == 6 and
               all(len(r) == 2 for r in where(a, study).values()), 120, 0.5,
               "peera lists the first series, 2 copies each")
    storescu(a.port, a.ae_title, later)
    every = uids_of(first) | uids_of(later)
    wait_until(lambda: set(where(a, study)) == every and
               all(len(r) == 2 for r in where(a, study).values()), 120, 0.5,
               "peera lists both series, 2 copies each")
    known_at_c = where(c, study)
    unheard = {u for u in uids_of(later)
               if {p for p, _ in where(a, study)[u]} != {"peerc"} and
               known_at_c.get(u, set()) != where(a, study)[u]}
    assert unheard, "peerc knows every copy of the later series: nothing would be tested"

    done = delete(c, study)
    assert done.returncode == 0, done.stdout + done.stderr
    for p in (a, b, c):
        wait_until(lambda p=p: not find_images(p, study) and not where(p, study), 120, 0.5,
                   f"{p.name} finds nothing of the study")
    wait_until(lambda: not any(files_of(p, every) for p in (a, b, c)), 120, 0.5,
               "no archive keeps a file of the study")
