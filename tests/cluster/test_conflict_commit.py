"""A second version of an instance (same SOP Instance UID, other bytes) in a cluster: each
holder of the first keeps it beside it (a conflict) and its commit is answered, so the
C-STORE succeeds and the writer's hint for it is dropped.

A holder's commit of a conflicting copy answered a sqlite3.Cursor for its sequence number
(``Catalog.record_conflict`` fired with ``conn.execute``'s result): the ``Commits``
answer failed ('<=' not supported between 'sqlite3.Cursor' and 'int'). A writer with no
copy of its own waits for those commits: the C-STORE was refused (0xA700 'copies made but
only 0 could be recorded') while both holders had kept the bytes. A writer with a copy
of its own answered Success, and its commit to the other holder failed the same way
(logged; the hint was left to hinted hand-off).

Three real peers (twistd processes, R=2, W=2, placement by rendezvous: a version goes
to the archives the first is on), DCMTK storescu (TCP_NODELAY=1) as the modality.
"""
from __future__ import annotations

from pathlib import Path

import pydicom

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import (get_json, patience, store_study, wait_replicated,
                                     wait_until)
from pacsp2p.testing.dcmtk import storescu


def send_version(peer, original: Path, out: Path, comment: str) -> str:
    """*original* with ImageComments *comment* (other bytes, the same UIDs) sent to
    *peer* by storescu; the status line storescu printed."""
    ds = pydicom.dcmread(original)
    ds.ImageComments = comment
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    proc = storescu(peer.port, peer.ae_title, [out], extra=["-v"], timeout=patience(120),
                    check=False)
    return next((line for line in (proc.stdout + proc.stderr).splitlines()
                 if "Received Store Response" in line), "no response")


def test_a_conflicting_version_is_committed_at_each_holder(cluster, tmp_path):
    cluster.config = {"cluster": {"replicas": 2, "write_quorum": 2},   # a writer holding
                      "strategies": {"first_copy": "placement"}}          # no copy of some
    peers = list(cluster.start(3))
    cluster.wait_mesh()
    a = peers[0]
    study, files = store_study(a, tmp_path / "v1", "CONFLICTCOMMIT", 2)
    rows = {r["instance"]: {x["peer"] for x in r["replicas"]}
            for r in wait_replicated(a, study, 2)}
    outside, inside = files
    # 1. sent to the peer that holds no copy of it: the writer waits for both commits
    uid = dn.sop_uid(outside)
    other = next(p for p in peers if p.name not in rows[uid])
    got = send_version(other, outside, tmp_path / "v2" / "outside.dcm", "version 2")
    assert "Success" in got, f"{other.name} (holds no copy): {got}"
    # 2. sent to a holder: Success at once, the other holder's commit comes after
    uid = dn.sop_uid(inside)
    holder = next(p for p in peers if p.name in rows[uid])
    got = send_version(holder, inside, tmp_path / "v2" / "inside.dcm", "version 2")
    assert "Success" in got, f"{holder.name} (holds a copy): {got}"
    # every commit answered: no hint left anywhere; each version kept beside the first
    for p in peers:
        wait_until(lambda p=p: get_json(p)["catalog"].get("hints", 1) == 0, 60, 0.5,
                   f"{p.name}: no hint left (a conflict's commit answered)")
    conflicts = sum(get_json(p)["catalog"]["conflicts"] for p in peers)
    assert conflicts >= 4, conflicts        # two holders of each of the two instances
    logs = "".join(p.log_path.read_text(errors="replace") for p in peers)
    assert "sqlite3.Cursor" not in logs
