"""A writer of this release with holders of the release before ``COMMIT_LAST`` (6c0025e:
push ports that take ``COMMIT`` frames, a Hello without ``commit_last``): the pushes-only
C-STOREs commit after their copies' answers as that release did (none behind their END:
an older holder would close the connection on a frame it does not know), every one
answered Success and recorded twice. Real peers (twistd processes of two releases,
``pacsp2p.testing.release``), R=2, W=2, DCMTK storescu."""
from __future__ import annotations

from pacsp2p.testing.cluster import get_json, store_study, wait_replicated
from pacsp2p.testing.release import release

BEFORE_COMMIT_LAST = "6c0025ee200c1cdb8f29fa2b0afd9dbe0ebb2bbb"
N = 30


def test_holders_of_the_release_before_commit_last_get_plain_commits(cluster, tmp_path,
                                                                      tmp_path_factory):
    old = release(BEFORE_COMMIT_LAST, tmp_path_factory.mktemp("release-6c0025e"))
    # by rendezvous alone: a third of the C-STOREs are pushes-only (first_copy = "auto",
    # the default, keeps a copy of every one at peera)
    a = cluster.add("peera", config={"strategies": {"first_copy": "placement"}})
    cluster.add("peerb", twistd=old)
    cluster.add("peerc", twistd=old)
    cluster.wait_mesh()
    study, _ = store_study(a, tmp_path / "s", "OLDHOLD1", N)
    rows = wait_replicated(a, study, N)
    assert any(all(x["peer"] != "peera" for x in r["replicas"]) for r in rows)
    assert get_json(a, "status")["ingest"]["commits_behind"] == 0
    for peer in cluster.peers[1:]:
        assert "where a copy begins" not in peer.log_path.read_text()
