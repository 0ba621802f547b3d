"""A replicated C-STORE whose first wave is pushes only (the writer keeps no copy:
``recorded.store_remote``) commits each pushed copy behind its END on the push port
(``pushport.COMMIT_LAST``), not after the copy's answer: one round trip per holder fewer.
Every such copy is recorded by that commit (none the plain way), the others' as before,
and the cluster ends as it did: two copies of each, recorded, no hint left, the bytes
received. Real peers (three twistd processes, R=2, W=2), DCMTK storescu."""
from __future__ import annotations

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, store_study, wait_replicated

N = 60
SYNC = 60.0


def test_pushes_only_copies_are_committed_behind_their_end(trio, tmp_path):
    a = trio[0]
    before = get_json(a, "status")["ingest"]
    study, files = store_study(a, tmp_path / "s", "BEHIND01", N)
    rows = wait_replicated(a, study, N, SYNC)
    remote_only = sum(1 for r in rows if all(x["peer"] != a.name for x in r["replicas"]))
    assert 0 < remote_only < N
    after = get_json(a, "status")["ingest"]
    # before: no such count (each of those copies was committed after its answer)
    assert after.get("commits_behind", 0) - before.get("commits_behind", 0) == \
        2 * remote_only, (after, remote_only)
    sent = dn.dataset_hashes(files)
    # every C-STORE's copies were durable and recorded when the thread that finished
    # the last part looked (Success may go from there): before, none — a pushed copy's
    # receipt names no "given" hash (only a converting archive's does), so the check
    # against ours failed, and a pushes-only C-STORE's commits were the reactor's
    assert after["durable_in_thread"] - before.get("durable_in_thread", 0) == N, after
    for peer in trio[1:]:                  # each holder holds the bytes received
        held = dn.dataset_hashes(dn.archive_files(peer.data_dir))
        assert held and all(sent[u] == h for u, h in held.items() if u in sent)
