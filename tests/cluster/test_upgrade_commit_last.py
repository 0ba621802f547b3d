"""A writer of this release with holders of the release before ``COMMIT_LAST`` (6c0025e:
push ports that take ``COMMIT`` frames, a Hello without ``commit_last``): the pushes-only
C-STOREs commit after their copies' answers as that release did (none behind their END:
an older holder would close the connection on a frame it does not know), every one
answered Success and recorded twice. Real peers (twistd processes of two releases,
``pacsp2p.testing.release``), R=2, W=2, DCMTK storescu."""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.release import release

BEFORE_COMMIT_LAST = "6c0025ee200c1cdb8f29fa2b0afd9dbe0ebb2bbb"
N = 30


def test_holders_of_the_release_before_commit_last_get_plain_commits(cluster, tmp_path,
                                                                      tmp_path_factory):
    old = release(BEFORE_COMMIT_LAST, tmp_path_factory.mktemp("release-6c0025e"))
    a = cluster.add("peera")
    cluster.add("peerb", twistd=old)
    cluster.add("peerc", twistd=old)
    cluster.wait_mesh()
    files = datasets.make_study(tmp_path / "s", patient_id="OLDHOLD1", size=32,
                                series=[("MR", N, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    proc = storescu(a.port, a.ae_title, files, extra=["-v"], timeout=300)
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == N, out[-3000:]

    def settled():
        rows = get_json(a, f"where?study={study}", 30)
        return len(rows) == N and all(len({x["peer"] for x in r["replicas"]}) == 2
                                      for r in rows) and \
            get_json(a, "status")["catalog"].get("hints", 1) == 0
    wait_until(settled, 60, interval=0.5, what="2 copies of each recorded, no hint left")
    rows = get_json(a, f"where?study={study}", 30)
    assert any(all(x["peer"] != "peera" for x in r["replicas"]) for r in rows)
    assert get_json(a, "status")["ingest"]["commits_behind"] == 0
    for peer in cluster.peers[1:]:
        assert "where a copy begins" not in peer.log_path.read_text()
