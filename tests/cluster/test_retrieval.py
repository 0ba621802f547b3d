"""Parallel retrieval (issue 6) with real peers: every replica holder is a source.

Peers peera, peerb, peerc hold archives (embedded, defaults R=2, W=2); peerd is a
facade-only peer (config ``archives = []``): everything it returns comes from the others
over the bulk channel. A 300-instance study (64x64) is stored at peera; DCMTK movescu and
getscu at peerd must return it byte-identical, from at least two replica holders; a
``kill -9`` of a source mid-movescu must not cost a single sub-operation. Then peere
stores a second study with R=1, the only holder of some of its instances is killed, and
a pynetdicom C-MOVE at peerd must list exactly those UIDs as failed.

Every peer is a separate `twistd pacsp2p` process; DCMTK tools run by full path with
TCP_NODELAY=1; the C-MOVE destination is a DCMTK storescp (+B: bytes as received).
"""
from __future__ import annotations

import subprocess

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pacsp2p.testing import findscu, storescu
from pacsp2p.testing.dcmtk import dcmtk_env, dcmtk_path
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until
from pacsp2p.testing.ports import LOOPBACK

N = 300
SIZE = 64
SYNC = 60.0                    # bound for replication + catalog sync of a 300-instance study
WARNING, ALL_FAILED = 0xB000, 0xA702


# -- helpers --------------------------------------------------------------------------

def where(peer, study: str) -> dict[str, set[str]]:
    """{instance uid: {peers holding a replica}} from GET /where?study= of *peer*."""
    rows = get_json(peer, f"where?study={study}", timeout=20)
    return {r["instance"]: {x["peer"] for x in r["replicas"]} for r in rows}


def store(peer, paths) -> None:
    proc = storescu(peer.port, peer.ae_title, paths, extra=["-v"], timeout=300)
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == len(paths), out[-3000:]


def wait_replicated(peer, study: str, uids: set[str], replicas: int) -> dict[str, set[str]]:
    """Wait until *peer* knows every instance of *study* with *replicas* holders."""
    seen: dict = {}

    def ready():
        seen.update(w=where(peer, study))
        return set(seen["w"]) == uids and all(len(h) == replicas for h in seen["w"].values())
    wait_until(ready, SYNC, interval=0.5,
               what=f"{len(uids)} instances with {replicas} replicas known at {peer.name}")
    return seen["w"]


def latest_retrieval(peer, n: int) -> dict:
    """The newest retrieval of *n* instances in *peer*'s GET /status."""
    rs = [r for r in get_json(peer)["retrievals"] if r["instances"] == n]
    assert rs, f"no retrieval of {n} instances in {peer.name}'s status"
    return max(rs, key=lambda r: r["id"])


def per_peer(sources: dict) -> dict:
    """A retrieval's sources (one per archive, "peer/archive") summed per peer: alive if
    all its archives stayed sources, completed and failed summed."""
    out: dict[str, dict] = {}
    for s in sources.values():
        p = out.setdefault(s["peer"], {"alive": True, "completed": 0, "failed": 0})
        p["alive"] = p["alive"] and s["alive"]
        p["completed"] += s["completed"]
        p["failed"] += s["failed"]
    return out


def move_keys(study: str) -> dict:
    return {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dest):
    """peera, peerb, peerc (embedded archives) + peerd (archives = []), meshed."""
    c = Cluster(tmp_path_factory.mktemp("retrieval"), {"STORESCP": dest.address})
    try:
        c.start(4, per_peer={"peerd": {"archives": []}})
        c.wait_mesh(timeout=30)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def study(cluster, tmp_path_factory):
    """300 CT instances stored at peera, replicated twice, known at peerd:
    (files, study uid, {uid: holders}, {uid: dataset sha256})."""
    a, d = cluster[0], cluster[3]
    files = datasets.make_study(tmp_path_factory.mktemp("retr-study"), patient_id="RETR0001",
                                patient_name="RETRIEVAL^PARALLEL", size=SIZE,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    store(a, files)
    uid = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    placed = wait_replicated(d, uid, set(sent), 2)
    return files, uid, placed, sent


# -- 1. a facade-only peer ------------------------------------------------------------

def test_a_peer_without_archives_runs_and_stores_into_the_others(cluster, tmp_path):
    a, b, c, d = cluster
    st = get_json(d)
    assert st["peer"] == "peerd" and st["archives"] == {}
    assert not (d.data_dir / "archives").exists() or not dn.archive_files(d.data_dir)
    assert {m: s for m, s in members(d).items() if m != "peerd"} == {
        "peera": "alive", "peerb": "alive", "peerc": "alive"}
    # a C-STORE at peerd is placed on two archives of the other peers
    files = datasets.make_study(tmp_path / "d", patient_id="RETR0000", size=16,
                                series=[("CT", 4, ExplicitVRLittleEndian)])
    store(d, files)
    placed = wait_replicated(a, dn.study_of(files), set(dn.dataset_hashes(files)), 2)
    assert all(h <= {"peera", "peerb", "peerc"} for h in placed.values()), placed
    rows, proc = findscu(d.port, d.ae_title, {"QueryRetrieveLevel": "IMAGE",
                                              "StudyInstanceUID": dn.study_of(files),
                                              "SOPInstanceUID": ""})
    assert proc.returncode == 0 and len(rows) == 4


# -- 2. C-MOVE and C-GET at peerd, from every replica holder ----------------------------

def test_movescu_at_the_archiveless_peer_uses_several_replica_holders(cluster, study, dest):
    d = cluster[3]
    _files, uid, placed, sent = study
    dn.clear(dest.directory)
    proc = dn.movescu(d.port, d.ae_title, "STORESCP", move_keys(uid), timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    got = dn.dataset_hashes(dest.files())
    assert len(dest.files()) == N
    assert got == sent, "retrieved data sets differ from those stored"

    r = latest_retrieval(d, N)
    assert r["done"] == N and r["pending"] == 0
    holders = set().union(*placed.values())
    print(f"\nC-MOVE at peerd: sources {r['sources']}")
    sources = per_peer(r["sources"])
    assert "peerd" not in sources
    assert set(sources) <= holders, f"sources {set(sources)} not all replica holders"
    used = {name for name, s in sources.items() if s["completed"] > 0}
    assert len(used) >= 2, f"only {used} served the retrieval"
    assert sum(s["completed"] for s in sources.values()) == N
    assert all(s["alive"] and s["failed"] == 0 for s in sources.values()), sources


def test_getscu_at_the_archiveless_peer_is_byte_identical(cluster, study, tmp_path):
    d = cluster[3]
    _files, uid, placed, sent = study
    out = tmp_path / "get"
    proc = dn.getscu(d.port, d.ae_title, out, move_keys(uid), timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    received = list(out.iterdir())
    assert len(received) == N
    assert dn.dataset_hashes(received) == sent
    r = latest_retrieval(d, N)
    used = {name for name, s in per_peer(r["sources"]).items() if s["completed"] > 0}
    assert r["done"] == N and len(used) >= 2 and used <= set().union(*placed.values())


# -- 3. kill -9 of a source during the movescu ------------------------------------------

def test_kill9_of_a_source_mid_move_costs_no_suboperation(cluster, study, dest):
    a, b, c, d = cluster
    _files, uid, placed, sent = study
    dn.clear(dest.directory)
    before = max((r["id"] for r in get_json(d)["retrievals"]), default=0)
    argv = [str(dcmtk_path("movescu")), "-S", "-v", "-aet", "MOVESCU", "-aec",
            d.ae_title, "-aem", "STORESCP", "-to", "20", "-ta", "20", "-td", "60",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
            LOOPBACK, str(d.port)]
    mover = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", env=dcmtk_env(),
                             stdin=subprocess.DEVNULL)
    killed = None
    try:
        # wait until the retrieval is under way with some source (not peera: it stays up
        # to be looked at) having delivered instances, then kill that source
        state = {}

        def under_way():
            rs = [r for r in get_json(d, timeout=2)["retrievals"] if r["id"] > before]
            if not rs:
                return False
            r = state["r"] = rs[-1]
            return 10 <= r["done"] and any(
                n != "peera" and s["completed"] > 0
                for n, s in per_peer(r["sources"]).items())
        wait_until(under_way, 60, interval=0.01, what="the C-MOVE's retrieval under way")
        peers = per_peer(state["r"]["sources"])
        victim_name = max((n for n in peers if n != "peera"),
                          key=lambda n: peers[n]["completed"])
        victim = next(p for p in cluster if p.name == victim_name)
        assert victim.kill9() == -9
        killed = victim
        done_at_kill = state["r"]["done"]
        out, _ = mover.communicate(timeout=180)
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.wait(10)
    print(f"\nkilled {killed.name} with {done_at_kill}/{N} fetched")
    assert done_at_kill < N, "the retrieval was over before the kill: nothing tested"
    assert mover.returncode == 0, out[-3000:]
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    assert "Failed" not in out.split("Received Final Move Response")[-1].split("\n")[0]
    received = dest.files()
    assert len(received) == N
    assert dn.dataset_hashes(received) == sent
    r = latest_retrieval(d, N)
    assert r["id"] > before and r["done"] == N
    peers = per_peer(r["sources"])
    # asked anything after the kill, the victim failed it and was dropped at once; with
    # batches of small instances it may have served all it was asked before the kill
    # landed (a 300-instance move takes ~0.25 s): then nothing failed on it
    if peers[killed.name]["failed"]:
        assert peers[killed.name]["alive"] is False, r["sources"]    # dropped
    others = {n: s for n, s in peers.items() if n != killed.name}
    assert sum(s["completed"] for s in peers.values()) == N
    assert any(s["completed"] > 0 for s in others.values())

    # bring it back for what follows
    killed.restart()
    cluster.wait_mesh(timeout=120)


# -- 4. R=1 and the only holder gone ---------------------------------------------------

def test_instances_whose_only_holder_is_dead_are_listed_as_failed(cluster, dest, tmp_path):
    a, b, c, d = cluster[:4]
    e = cluster.add("peere", config={"cluster": {"replicas": 1, "write_quorum": 1},
                                     "strategies": {"first_copy": "placement"}})     # by rendezvous' spread
    cluster.wait_mesh(timeout=30)
    n = 120
    files = datasets.make_study(tmp_path / "r1", patient_id="RETR0002", size=SIZE,
                                patient_name="RETRIEVAL^SINGLE", seed=2,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    store(e, files)
    uid = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    placed = wait_replicated(d, uid, set(sent), 1)
    by_peer: dict[str, set[str]] = {}
    for inst, hs in placed.items():
        by_peer.setdefault(next(iter(hs)), set()).add(inst)
    # the victim: the peer (other than the one we store at) holding the most of them
    victim_name = max((p for p in by_peer if p != "peere"), key=lambda p: len(by_peer[p]))
    lost = by_peer[victim_name]
    assert 0 < len(lost) < n, by_peer
    victim = next(p for p in cluster if p.name == victim_name)
    assert victim.kill9() == -9
    wait_until(lambda: members(d).get(victim_name) == "dead", 30,
               what=f"peerd sees {victim_name} dead")

    dn.clear(dest.directory)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    with dn.association(d.port, d.ae_title,
                        [build_context(StudyRootQueryRetrieveInformationModelMove)],
                        timeout=120) as assoc:
        responses = list(assoc.send_c_move(query, "STORESCP",
                                           StudyRootQueryRetrieveInformationModelMove))
    final, identifier = responses[-1]
    assert final.Status in (WARNING, ALL_FAILED), hex(final.Status)
    assert final.NumberOfCompletedSuboperations == n - len(lost)
    assert final.NumberOfFailedSuboperations == len(lost)
    failed = identifier.FailedSOPInstanceUIDList
    failed = [failed] if isinstance(failed, str) else list(failed)
    assert len(failed) == len(set(failed))
    assert set(failed) == lost
    received = dn.dataset_hashes(dest.files())
    assert set(received) == set(sent) - lost
    assert all(received[u] == sent[u] for u in received)
    r = latest_retrieval(d, n)
    assert victim_name not in {n for n, s in per_peer(r["sources"]).items() if s["completed"]}

    victim.restart()
    cluster.wait_mesh(timeout=30)
