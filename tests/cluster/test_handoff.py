"""Hinted hand-off moves copies back, and a lone writer's instances get their replicas.

- Three peers (R=2, W=2), peerb down: instances placement wanted on peerb go to a
  stand-in; when peerb returns each gets its copy on peerb and the stand-in drops its
  own (a tombstone fact tells every peer), so every instance ends with exactly 2 copies.
- A peer alone in its cluster (W=1) stores; a second peer joins later: each instance
  gets its second copy then (a hint owed to no archive in particular).
"""
from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, storescu, toml
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, members, wait_until

N = 40


def replicas(peer, study: str) -> dict[str, list[tuple[str, bool]]]:
    rows = get_json(peer, f"where?study={study}", timeout=20)
    return {r["instance"]: [(x["peer"], x["available"]) for x in r["replicas"]] for r in rows}


def owed_to(peer, name: str) -> int:
    """Instances *peer*'s catalog owes a copy on peer *name* (its hints table, read-only:
    the status count also holds the hints of commits a holder has not confirmed yet)."""
    uri = f"file:{peer.data_dir / 'catalog.sqlite'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
        return conn.execute("SELECT count(DISTINCT SOPInstanceUID) FROM hints "
                            "WHERE peer = ?", (name,)).fetchone()[0]


def study_uid(paths) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def files_on(peer) -> Counter:
    return Counter(dn.sop_uid(p) for p in dn.archive_files(peer.data_dir))


def test_a_stand_in_copy_moves_back_when_the_peer_returns(cluster, tmp_path):
    a, b, c = cluster.start(3)
    cluster.wait_mesh()
    study = datasets.make_study(tmp_path / "s", patient_id="HANDOFF1", size=16,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    uid = study_uid(study)

    b.stop()
    wait_until(lambda: members(a).get("peerb") == "dead", 15, what="peera sees peerb dead")
    storescu(a.port, a.ae_title, study)
    assert get_json(a)["catalog"]["hints"] > 0, "no copy was owed to peerb"
    # the records of copies on peerc may finish after the answers, each covered by a
    # hint owed to peerc until then: count only the hints owed to peerb, once every
    # instance is listed with its 2 copies
    wait_until(lambda: (r := replicas(a, uid)) and len(r) == N and
               all(len(v) == 2 for v in r.values()), 60, 0.5,
               "peera lists every instance with its 2 copies")
    seen = []

    def steady():                     # the same count two polls (1 s) in a row
        seen.append(owed_to(a, "peerb"))
        return len(seen) > 1 and seen[-1] == seen[-2]
    wait_until(steady, 30, 1.0, "peera's hints settle")
    owed = seen[-1]
    assert owed > 0, "no copy was owed to peerb"

    b.restart()

    def on_b(r):
        return sum(1 for v in r.values() if "peerb" in {p for p, _ in v})

    def settled():
        # peera learns the copy made on peerb and the stand-in dropped elsewhere by two
        # pulls, in either order: an instance can show its 2 old copies for a moment
        r = replicas(a, uid)
        return (len(r) == N and all(len(v) == 2 for v in r.values())
                and get_json(a)["catalog"]["hints"] == 0 and on_b(r) >= owed)
    wait_until(settled, 60, 0.5, "every owed copy on peerb, exactly 2 copies, hints done")
    r = replicas(a, uid)
    assert on_b(r) >= owed, (on_b(r), owed)
    # the disks agree with the catalog: 2 files per instance in all, none left over
    wait_until(lambda: sum((files_on(a) + files_on(b) + files_on(c)).values()) == 2 * N,
               30, 0.5, "stand-in files removed")
    # every peer's catalog says the same (tombstones spread by anti-entropy)
    wait_until(lambda: len({get_json(p, "digest")["digest"] for p in (a, b, c)}) == 1,
               30, 0.5, "catalogs converge")
    assert all(len(v) == 2 for v in replicas(c, uid).values())


def test_a_lone_writer_gets_its_replicas_when_a_peer_joins(cluster, tmp_path):
    cluster.config = toml.deep_merge(cluster.config, {"cluster": {"write_quorum": 1}})
    a = cluster.add("peera")
    study = datasets.make_study(tmp_path / "s", patient_id="LONE0001", size=16,
                                series=[("CT", 10, ExplicitVRLittleEndian)])
    uid = study_uid(study)
    storescu(a.port, a.ae_title, study)
    assert all(len(v) == 1 for v in replicas(a, uid).values())
    assert get_json(a)["catalog"]["hints"] == 10

    b = cluster.add("peerb")
    cluster.wait_mesh()
    wait_until(lambda: all(len(v) == 2 for v in replicas(a, uid).values())
               and get_json(a)["catalog"]["hints"] == 0, 60, 0.5,
               "every instance got its second copy on peerb")
    assert sum(files_on(b).values()) == 10
