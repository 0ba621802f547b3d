"""A replicated C-STORE in a cluster of fewer archives than copies wanted (R=3 on two
peers of one archive each, W=2): each instance is stored on both and owes a third copy
to no archive in particular (a ``*`` hint, ``Ingest._owe``), made as soon as placement
finds an archive for it: here, a third peer that joins later. Real peers (twistd
processes), DCMTK storescu.

Before the fix, the writer-thread path of a replicated C-STORE (``recorded.store``, one
copy here and a push to the other peer) recorded no such hint: the instances stayed at
two copies when the third peer came (until a repair, ``repair_after`` later)."""
from __future__ import annotations

from pacsp2p.testing.cluster import get_json, store_study, wait_until

N = 8


def copies(peer, study: str) -> dict[str, set[str]]:
    """{instance: {peer of each available copy}} as *peer* lists them."""
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: {x["peer"] for x in r["replicas"] if x["available"]}
            for r in rows}


def test_a_copy_owed_to_no_archive_is_made_when_one_joins(cluster, tmp_path):
    cluster.config = {"cluster": {"replicas": 3, "write_quorum": 2, "repair_after": 3600}}
    a, b = cluster.start(2)
    cluster.wait_mesh()
    study, _ = store_study(a, tmp_path / "s", "SHORT01", N, "CT")
    wait_until(lambda: len(copies(a, study)) == N and all(
        v == {"peera", "peerb"} for v in copies(a, study).values()), 30, 0.5,
        "every instance on peera and peerb")
    # one copy owed per instance, to no archive in particular (none left to take it)
    wait_until(lambda: get_json(a)["catalog"]["hints"] == N, 30, 0.5,
               f"{N} copies owed at peera")

    cluster.add("peerc")
    cluster.wait_mesh(timeout=60)
    wait_until(lambda: len(copies(a, study)) == N and all(
        v == {"peera", "peerb", "peerc"} for v in copies(a, study).values()), 90, 1.0,
        "every instance's third copy made on peerc")
