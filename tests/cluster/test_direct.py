"""Direct delivery of a C-MOVE (``[destinations] X = {address, mode = "direct"}``) with
real peers: every holder sends its share straight to the destination.

Peers peera, peerb, peerc hold embedded archives (R=2, W=2); peerd has none
(``archives = []``), so whatever reaches the destination from a C-MOVE at peerd can only
come from the holders. The destination STORESCP of every peer is a DCMTK storescp
(--fork: each holder opens its own associations; +B: bytes as received) in direct mode.

1. 200 instances stored at peera; movescu at peerd: all arrive byte-identical, final
   Success, sent by at least two holders, while peerd itself fetched nothing.
2. kill -9 of a holder mid-way through a 600-instance direct move: the unsent share goes
   to the other holders; final Success and every instance arrives byte-identical.
3. peere stores with R=1 and is killed, the only holder of some instances: a pynetdicom
   C-MOVE at peerd ends Warning with exactly those UIDs in FailedSOPInstanceUIDList.
4. the same storescp as STORESCP2, direct with ``associations = 2``: every holder sends
   its share over two associations at once (``SendTo`` passes the number on).

Every peer is a separate `twistd pacsp2p` process; DCMTK tools run by full path with
TCP_NODELAY=1; every process is stopped by its own PID.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pacsp2p.testing import StoreSCP, storescu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until
from pacsp2p.testing.dcmtk import dcmtk_env, dcmtk_path
from pacsp2p.testing.ports import LOOPBACK

SIZE = 32                      # small images: the test is about who sends, not how fast
SYNC = 60.0                    # bound for replication + catalog sync of a study
WARNING, ALL_FAILED = 0xB000, 0xA702
KILL_SIZE = 128                # 600 x 32 KB: long enough a move to kill a holder mid-way
KILL_AT = 40                   # instances at the destination when the holder is killed


# -- helpers --------------------------------------------------------------------------

def where(peer, study: str) -> dict[str, set[str]]:
    """{instance uid: {peers holding a replica}} from GET /where?study= of *peer*."""
    rows = get_json(peer, f"where?study={study}", timeout=20)
    return {r["instance"]: {x["peer"] for x in r["replicas"]} for r in rows}


def make(directory: Path, n: int, patient: str, seed: int) -> list[Path]:
    return datasets.make_study(directory, patient_id=patient, patient_name="DIRECT^MOVE",
                               size=SIZE, seed=seed,
                               series=[("CT", n, ExplicitVRLittleEndian)])


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


def move_keys(study: str) -> dict:
    return {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}


def received_hashes(dest: StoreSCP, sent: dict[str, str]) -> dict[str, str]:
    """{uid: sha256} of what the destination holds, every copy checked against *sent*
    (a duplicate is fine as long as its bytes are those stored)."""
    got: dict[str, str] = {}
    for path in dest.files():
        uid = dn.sop_uid(path)
        h = dn.dataset_sha256(path)
        assert sent.get(uid) == h, f"{path.name}: data set differs from the one stored"
        got[uid] = h
    return got


SENDING = re.compile(r"direct delivery: sending (\d+) instances to STORESCP")


def storescp_log_size(dest: StoreSCP) -> int:
    return dest.log_path.stat().st_size if dest.log_path.exists() else 0


def associations_since(dest: StoreSCP, offset: int) -> list[str]:
    """The storescp 'Association Received' lines logged after byte *offset*."""
    text = dest.log_path.read_bytes()[offset:].decode(errors="replace")
    return [line for line in text.splitlines() if "Association Received" in line]


def log_size(peer) -> int:
    return peer.log_path.stat().st_size


def log_since(peer, offset: int) -> str:
    return peer.log_path.read_bytes()[offset:].decode(errors="replace")


def revive(cluster: Cluster, peer) -> None:
    """Start a killed peer again (same config and data) and wait for the full mesh."""
    peer.restart()
    cluster.wait_mesh(timeout=30)


def retrieval_ids(peer) -> set[int]:
    return {r["id"] for r in get_json(peer)["retrievals"]}


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    """DCMTK storescp (--fork, +B), the direct-mode C-MOVE destination STORESCP."""
    with StoreSCP(tmp_path_factory.mktemp("direct-scp") / "in", fork=True,
                  extra=["+B"]) as scp:
        yield scp


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dest):
    """peera, peerb, peerc (embedded archives) + peerd (archives = []), meshed; every
    peer's STORESCP destination is in direct mode."""
    c = Cluster(tmp_path_factory.mktemp("direct"),
                {"STORESCP": {"address": dest.address, "mode": "direct"},
                 "STORESCP2": {"address": dest.address, "mode": "direct",
                               "associations": 2}})
    try:
        c.start(4, per_peer={"peerd": {"archives": []}})
        c.wait_mesh(timeout=30)
        yield c
    finally:
        c.stop()


# -- 1. every holder sends its own share ------------------------------------------------

def test_direct_move_is_sent_by_the_holders_not_the_requesting_peer(cluster, dest,
                                                                    tmp_path):
    a, b, c, d = cluster
    assert get_json(d)["archives"] == {}
    n = 200
    files = make(tmp_path / "s1", n, "DIRECT0001", seed=11)
    store(a, files)
    uid = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    placed = wait_replicated(d, uid, set(sent), 2)
    holders = set().union(*placed.values())
    assert holders <= {"peera", "peerb", "peerc"}, holders

    dn.clear(dest.directory)
    scp_at = storescp_log_size(dest)
    logs_at = {p.name: log_size(p) for p in cluster}
    before = retrieval_ids(d)
    proc = dn.movescu(d.port, d.ae_title, "STORESCP", move_keys(uid), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    got = received_hashes(dest, sent)
    assert got == sent, f"{len(got)}/{n} instances arrived"

    # peerd fetched nothing: no retrieval of its own ran (a relay would have pulled every
    # instance over the bulk channel and shown up as a started retrieval with sources)
    assert not {r["id"] for r in get_json(d)["retrievals"]} - before, \
        get_json(d)["retrievals"]
    assert not (d.data_dir / "archives").exists() or not dn.archive_files(d.data_dir)
    # ... and the destination was reached by several associations (each holder opens
    # its own, one per chunk) from at least two holders
    assocs = associations_since(dest, scp_at)
    print(f"\nstorescp: {len(assocs)} associations; e.g. {assocs[:1]}")
    assert len(assocs) >= 2, assocs
    # each holder logs the share it sends ("direct delivery: sending N instances to AE")
    shares = {p.name: sum(int(k) for k in SENDING.findall(log_since(p, logs_at[p.name])))
              for p in cluster}
    print(f"holders {sorted(holders)}; instances each peer sent itself {shares}")
    assert shares["peerd"] == 0, shares
    assert sum(shares.values()) == n, shares
    senders = {name for name, k in shares.items() if k}
    assert senders <= holders and len(senders) >= 2, shares
    assert len(assocs) >= len(senders), (assocs, shares)


# -- 2. kill -9 of a holder mid-way -----------------------------------------------------

def test_kill9_of_a_holder_mid_direct_move_hands_its_share_to_the_others(cluster, dest,
                                                                        tmp_path, request):
    a, b, c, d = cluster
    n = 600
    files = datasets.make_study(tmp_path / "s2", patient_id="DIRECT0002",
                                patient_name="DIRECT^KILL", size=KILL_SIZE, seed=12,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    store(a, files)
    uid = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    placed = wait_replicated(d, uid, set(sent), 2)
    victim = c                            # with R=2 on three peers, never the only holder
    assert sum(victim.name in h for h in placed.values()) > 0
    assert all(h - {victim.name} for h in placed.values())     # another holder for each

    dn.clear(dest.directory)
    d_log = log_size(d)
    argv = [str(dcmtk_path("movescu")), "-S", "-v", "-aet", "MOVESCU", "-aec",
            d.ae_title, "-aem", "STORESCP", "-to", "20", "-ta", "20", "-td", "60",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
            LOOPBACK, str(d.port)]
    mover = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", env=dcmtk_env(),
                             stdin=subprocess.DEVNULL)
    try:
        # kill the holder once the move is under way (some instances arrived)
        wait_until(lambda: len(list(dest.directory.iterdir())) >= KILL_AT, 60,
                   interval=0.005, what=f"{KILL_AT} instances at the destination")
        arrived_at_kill = len(list(dest.directory.iterdir()))
        assert victim.kill9() == -9
        request.addfinalizer(lambda: revive(cluster, victim))
        out, _ = mover.communicate(timeout=120)
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.wait(10)
    print(f"\nkilled {victim.name} with {arrived_at_kill}/{n} instances at the destination")
    assert mover.returncode == 0, out[-3000:]
    final = out.split("Received Final Move Response")[-1]
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    assert "Failed" not in final.split("\n")[0], final[:500]
    # the victim failed mid-share (so the hand-over was exercised), and nothing was lost
    handed = log_since(d, d_log)
    assert f"{victim.name} failed to send its share" in handed, handed[-3000:]
    got = received_hashes(dest, sent)
    assert got == sent, f"{len(got)}/{n} instances arrived"



# -- 3. R=1 and the only holder gone ---------------------------------------------------
#
# peere stores with R=1 (its own config); the R=2 peers' repair loop gives the instances
# THEY hold a second copy within 15 s (maybe onto peere), but never one peere alone holds
# (the repair of an instance is run by its first holder, and peere's own R is 1). So the
# victim is peere: what only peere holds has no live holder once it is dead.

def test_instances_without_a_live_holder_are_listed_as_failed(cluster, dest, tmp_path,
                                                              request):
    d = cluster[3]
    victim = cluster.add("peere", config={"cluster": {"replicas": 1, "write_quorum": 1},
                                          "strategies": {"first_copy": "placement"}})     # by rendezvous' spread
    cluster.wait_mesh(timeout=30)
    n = 120
    files = make(tmp_path / "s3", n, "DIRECT0003", seed=13)
    store(victim, files)
    uid = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    wait_until(lambda: set(where(d, uid)) == set(sent), SYNC, interval=0.5,
               what=f"{n} instances known at peerd")
    assert victim.kill9() == -9
    request.addfinalizer(lambda: revive(cluster, victim))
    wait_until(lambda: members(d).get(victim.name) == "dead", 30,
               what=f"peerd sees {victim.name} dead")

    # the instances only peere holds, once every live peer's catalog agrees (no copy of
    # them can appear any more: their only holder is dead)
    live = [p for p in cluster if p is not victim]
    views: list = []

    def settled():
        now = []
        for p in live:
            w = where(p, uid)
            if set(w) != set(sent):
                return False
            now.append(frozenset(u for u, hs in w.items() if hs == {victim.name}))
        views.append(now[0] if len(set(now)) == 1 else None)
        return len(views) >= 2 and views[-1] is not None and views[-1] == views[-2]
    wait_until(settled, SYNC, interval=0.5, what="live peers agree on peere's instances")
    lost = set(views[-1])
    assert 0 < len(lost) < n, f"{len(lost)} instances only on {victim.name}"

    dn.clear(dest.directory)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    with dn.association(d.port, d.ae_title,
                        [build_context(StudyRootQueryRetrieveInformationModelMove)],
                        timeout=60) as assoc:
        responses = list(assoc.send_c_move(query, "STORESCP",
                                           StudyRootQueryRetrieveInformationModelMove))
    final, identifier = responses[-1]
    print(f"\nR=1, {victim.name} dead, the only holder of {len(lost)}/{n}: "
          f"final {final.Status:#06x}")
    assert final.Status in (WARNING, ALL_FAILED), hex(final.Status)
    assert final.Status == WARNING          # the others' instances were sent
    assert final.NumberOfCompletedSuboperations == n - len(lost)
    assert final.NumberOfFailedSuboperations == len(lost)
    assert final.NumberOfWarningSuboperations == 0
    assert identifier is not None, "no identifier with the Failed SOP Instance UID List"
    failed = identifier.FailedSOPInstanceUIDList
    failed = [failed] if isinstance(failed, str) else list(failed)
    assert len(failed) == len(set(failed)), "a UID listed twice"
    assert set(failed) == lost
    got = received_hashes(dest, sent)
    assert set(got) == set(sent) - lost


# -- 4. each holder over several associations ---------------------------------------------

def test_direct_move_over_two_associations_per_holder(cluster, dest, tmp_path):
    a, d = cluster[0], cluster[3]          # (test 3 added a killed peere)
    n = 150
    files = make(tmp_path / "s4", n, "DIRECT0004", seed=44)
    store(a, files)
    uid = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    wait_replicated(d, uid, set(sent), 2)
    for _attempt in range(3):       # (a very busy machine may send a chunk of 50 small
        dn.clear(dest.directory)    # instances before the second association is up)
        logs_at = {p.name: log_size(p) for p in cluster}
        proc = dn.movescu(d.port, d.ae_title, "STORESCP2", move_keys(uid), timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "Received Final Move Response (Success)" in out, out[-3000:]
        assert received_hashes(dest, sent) == sent
        # each holder's deliveries (one per SendTo chunk of 50) say over how many they went
        over = {p.name: [int(k) for k in re.findall(
            r"C-MOVE to STORESCP2: \d+ instances over (\d+) association",
            log_since(p, logs_at[p.name]))] for p in cluster}
        print(f"\nassociations per delivery, by holder: {over}")
        assert not over["peerd"], over
        if max(k for ks in over.values() for k in ks) == 2:
            break
    assert max(k for ks in over.values() for k in ks) == 2, over
