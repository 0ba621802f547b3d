"""Repair's trimming keeps R copies of each version of an instance: a copy is surplus
only beyond R live copies of the same bytes.

With ``[strategies] first_copy = "local"`` a second version of an instance (same SOP
Instance UID, other bytes: a modality's correction) sent to a peer that holds no copy of
the first is kept there as a plain copy, its other copy beside the first version on a
holder (a conflict). The instance then had three locations, two versions: repair counted
three copies of one instance and dropped the last in placement order -- a copy of the
first version (left with one copy: lost with one more failure) or the only plain copy of
the second. Both versions were acknowledged (Success).

Three real peers (twistd processes, R=2, W=2, ``repair_after`` 5 s), DCMTK storescu
(TCP_NODELAY=1); what each peer's disk holds read back with pydicom.
"""
from __future__ import annotations

import time
from collections import defaultdict

import pydicom

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import (get_json, patience, store_study, wait_replicated,
                                     wait_until)

from test_conflict_commit import send_version

N = 4


def versions_on_disk(peers) -> dict:
    """{(SOP Instance UID, ImageComments): {peer names whose archive holds that file}}."""
    held = defaultdict(set)
    for p in peers:
        for f in dn.archive_files(p.data_dir):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            held[(ds.SOPInstanceUID, str(ds.get("ImageComments", "")))].add(p.name)
    return held


def two_versions(cluster, tmp_path, patient: str) -> list:
    """Three peers (R = W = 2, local-first); a study of N stored at the first, then a
    second version of each instance stored at the peer holding no copy of the first;
    the peers."""
    cluster.config = {"cluster": {"replicas": 2, "write_quorum": 2, "repair_after": 5},
                      "strategies": {"first_copy": "local"}}
    peers = list(cluster.start(3))
    cluster.wait_mesh()
    study, files = store_study(peers[0], tmp_path / "v1", patient, N)
    rows = {r["instance"]: {x["peer"] for x in r["replicas"]}
            for r in wait_replicated(peers[0], study, N)}
    for i, f in enumerate(files):
        other = next(p for p in peers if p.name not in rows[dn.sop_uid(f)])
        got = send_version(other, f, tmp_path / "v2" / f"{i}.dcm", "version 2")
        assert "Success" in got, f"{other.name}: {got}"
    return peers


def test_trimming_keeps_two_copies_of_each_version(cluster, tmp_path):
    peers = two_versions(cluster, tmp_path, "VERSIONTRIM")
    sent = time.time()
    # two censuses after the second versions: the walk the first one starts is over
    for p in peers:
        seen = []

        def counted(p=p):
            at = get_json(p)["under_replicated"].get("at") or 0
            if at > sent and at not in seen:
                seen.append(at)
            return len(seen) >= 2
        wait_until(counted, patience(90), 0.5, f"{p.name}: two repair counts")
    dropped = {p.name: get_json(p)["repair"]["dropped"] for p in peers}
    held = versions_on_disk(peers)
    few = {k: v for k, v in held.items() if len(v) < 2}
    assert not few, f"versions on fewer than 2 peers: {few}; dropped {dropped}"
    assert len(held) == 2 * N, sorted(held)
    assert sum(dropped.values()) == 0, dropped


def test_a_drain_keeps_two_copies_of_each_version(cluster, tmp_path):
    """The same for a drain: a peer drained counted every other copy of the instance as
    one of its R copies elsewhere, whatever its bytes. With the second versions placed
    as above, ``pacsp2p drain --peer peera`` dropped peera's copy of the first version
    (two copies elsewhere: one of each version), leaving it on one peer. Now a drain
    needs R copies of the same bytes elsewhere; on three peers there is no archive left
    to take one, so those instances stay (the drain says it is blocked)."""
    from test_drain import drain
    peers = two_versions(cluster, tmp_path, "VERSIONDRAIN")
    a = peers[0]
    proc = drain(a, "--peer", a.name, "--stalled", "10")
    held = versions_on_disk(peers)
    few = {k: v for k, v in held.items() if len(v) < 2}
    assert not few, f"versions on fewer than 2 peers: {few}\n{proc.stdout}{proc.stderr}"
    assert len(held) == 2 * N, sorted(held)
