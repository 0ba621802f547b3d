"""Scrub (issue 13, item 3) with real peers: bytes flipped in a stored file are found by
``pacsp2p scrub`` and the copy is replaced, byte-identical; a C-MOVE while a copy is
damaged still delivers the right bytes (the retrieval checks each copy's SHA-256 and
fails over), and the copy it found damaged is replaced by itself; a missing file comes
back; a peer with no other replica says the damage remains (exit 1).

Peers are separate `twistd pacsp2p` processes; files are damaged on the peers' disks
(the embedded archive's ``objects/``); the C-MOVE is DCMTK ``movescu`` (TCP_NODELAY=1)
to a DCMTK ``storescp +B``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Peer, StoreSCP, dataset_sha256, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, wait_until

PACSP2P = Path(sys.executable).parent / "pacsp2p"


def scrub(peer, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), "scrub", "--config", str(peer.config_path),
                           *extra], capture_output=True, text=True, timeout=600)


def summary(proc) -> str:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("scrub: ")]
    assert lines, proc.stdout + proc.stderr
    return lines[0]


def flip(path: Path, at: int = -100) -> bytes:
    """Flip the bits of 8 bytes near the end of the file (the pixel data); the original
    bytes of the whole file are returned."""
    original = path.read_bytes()
    data = bytearray(original)
    for i in range(at, at + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def files_of(peer) -> dict[str, Path]:
    return dn.by_sop_uid(dn.archive_files(peer.data_dir))


def scrub_status(peer) -> dict:
    return get_json(peer, timeout=30)["scrub"]


def store_study(tmp_path, peer, n: int, pid: str, size: int = 64):
    files = datasets.make_study(tmp_path / pid, patient_id=pid, size=size,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    storescu(peer.port, peer.ae_title, files, timeout=600)
    return files, dn.study_of(files)


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(n, destinations=None):
        c = Cluster(tmp_path / f"cluster{len(made)}", destinations,
                    {"cluster": {"replicas": 2, "write_quorum": 2}})
        made.append(c)
        c.start(n)
        c.wait_mesh(timeout=30)
        return c
    yield make
    for c in made:
        c.stop()


@pytest.fixture
def dest(tmp_path):
    with StoreSCP(tmp_path / "scp", extra=["+B"]) as scp:
        yield scp


def test_scrub_finds_flipped_bytes_and_a_missing_file_and_replaces_them(cluster, dest,
                                                                        tmp_path):
    n = 20
    a, b, c = cluster(3, destinations={"STORESCP": dest.address})
    files, study = store_study(tmp_path, a, n, "SCRUB01")
    sent = dn.dataset_hashes(files)
    wait_until(lambda: sum(len(files_of(p)) for p in (a, b, c)) == 2 * n, 60, 0.5,
               "2 copies of every instance on the disks")
    mine = files_of(a)
    assert mine, "peera holds no copy"

    # a clean pass first: nothing damaged, exit 0
    proc = scrub(a)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc) == f"scrub: {len(mine)} copies checked, 0 damaged, 0 repaired, " \
                            "0 missing", proc.stdout

    # flipped bytes: found, replaced from the other replica, byte-identical again
    uid, path = sorted(mine.items())[0]
    original = flip(path)
    assert dataset_sha256(path) != sent[uid]
    proc = scrub(a)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc) == f"scrub: {len(mine)} copies checked, 1 damaged, 1 repaired, " \
                            "0 missing", proc.stdout
    assert path.read_bytes() == original, "the replaced copy is not byte-identical"
    log = a.log_path.read_text()
    assert f"the copy of {uid} on archive local is damaged" in log
    assert f"{uid} on archive local replaced from peer" in log
    st = scrub_status(a)
    assert st["last"]["damaged"] == 1 and st["last"]["repaired"] == 1, st
    assert st["totals"]["damaged"] >= 1 and st["totals"]["repaired"] >= 1, st

    # a missing file: found, put back
    uid2, path2 = sorted(mine.items())[1]
    original2 = path2.read_bytes()
    path2.unlink()
    proc = scrub(a, "--rate", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc) == f"scrub: {len(mine)} copies checked, 0 damaged, 1 repaired, " \
                            "1 missing", proc.stdout
    assert path2.read_bytes() == original2
    assert f"the copy of {uid2} on archive local is missing" in a.log_path.read_text()

    # `pacsp2p status` says what the last pass found
    proc = subprocess.run([str(PACSP2P), "status", "--config", str(a.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert "scrub: last pass" in proc.stdout and "1 missing" in proc.stdout, proc.stdout


def test_a_c_move_during_the_damage_delivers_the_right_bytes(cluster, dest, tmp_path):
    n = 24
    a, b, c = cluster(3, destinations={"STORESCP": dest.address})
    files, study = store_study(tmp_path, a, n, "SCRUB02")
    sent = dn.dataset_hashes(files)
    wait_until(lambda: sum(len(files_of(p)) for p in (a, b, c)) == 2 * n, 60, 0.5,
               "2 copies of every instance on the disks")
    wait_until(lambda: len({get_json(p, "digest")["digest"] for p in (a, b, c)}) == 1, 60,
               0.5, "catalogs in sync")
    # every copy on peera damaged: a C-MOVE at peerc reads some of them over the bulk
    # channel, one at peera reads its own first; both must fail over to the others,
    # and the copies found damaged are replaced (peerc tells peera: CheckCopy)
    for at, told in ((c, "peer peerc read a damaged copy of"),
                     (a, "failing over to another replica")):
        originals = {uid: flip(path) for uid, path in files_of(a).items()}
        assert originals
        dn.clear(dest.directory)
        proc = dn.movescu(at.port, at.ae_title, "STORESCP",
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                          timeout=180)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "Received Final Move Response (Success)" in out, \
            out[-3000:]
        assert dn.dataset_hashes(dest.files()) == sent, f"wrong bytes via {at.name}"
        wait_until(lambda t=told: t in a.log_path.read_text(), 30, 0.5, told)
        wait_until(lambda: scrub_status(a)["found_by_reads"]["repaired"] > 0, 60, 0.5,
                   "a copy a retrieval found damaged is replaced")
        # (the copies the retrieval did not read are still damaged: the scrub finds them)
        proc = scrub(a)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert all(p.read_bytes() == originals[u] for u, p in files_of(a).items())
    found = scrub_status(a)["found_by_reads"]
    assert found["damaged"] >= 2 and found["repaired"] == found["damaged"], found
    proc = scrub(a)
    assert proc.returncode == 0 and " 0 damaged, 0 repaired, 0 missing" in summary(proc), \
        proc.stdout


def test_damage_without_another_replica_stays_and_exits_1(tmp_path):
    files = datasets.make_study(tmp_path / "in", patient_id="SCRUB03", size=64,
                                series=[("CT", 4, ExplicitVRLittleEndian)])
    with Peer(tmp_path / "alone") as p:
        storescu(p.port, p.ae_title, files, timeout=120)
        held = files_of(p)
        assert len(held) == 4
        uid, path = sorted(held.items())[0]
        flip(path)
        proc = scrub(p)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert summary(proc) == "scrub: 4 copies checked, 1 damaged, 0 repaired, 0 missing"
        assert "could NOT be repaired" in proc.stdout and uid in proc.stdout, proc.stdout
        assert f"{uid} on archive local could not be replaced: no other replica" in \
            p.log_path.read_text()


def two_in_sync(cluster, tmp_path, pid: str, n: int = 6):
    """Two peers (R = 2), a study of *n* stored at the first, a copy of each on both
    peers' disks and their catalogs in sync: (peera, peerb)."""
    a, b = cluster(2)
    store_study(tmp_path, a, n, pid)
    wait_until(lambda: len(files_of(a)) == n and len(files_of(b)) == n, 60, 0.5,
               "a copy of every instance on each peer's disk")
    wait_until(lambda: len({get_json(p, "digest")["digest"] for p in (a, b)}) == 1, 60,
               0.5, "catalogs in sync")
    return a, b


@pytest.mark.timeout(900)     # (wait_until bounds of its own)
def test_a_copy_left_unrepaired_is_mended_once_the_good_replica_is_back(cluster, tmp_path):
    """The only good replica's peer is down when the scrub finds a damaged copy: it is
    left unrepaired (exit 1), and once that peer is back the copy is mended without
    another pass (before: not until the next background pass, a week later by default;
    the fresh clone at d40b9d4 met it with facts not yet pulled). (Mended by the try
    again, or by the sample of peera's archive when health first sees it up, if that
    comes after the damage: both are this peer healing itself.)"""
    a, b = two_in_sync(cluster, tmp_path, "SCRUB04")
    uid, path = sorted(files_of(a).items())[0]
    b.stop()
    original = flip(path)
    proc = scrub(a)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "could NOT be repaired" in proc.stdout and uid in proc.stdout, proc.stdout
    assert path.read_bytes() != original
    assert scrub_status(a)["awaiting_repair"] == 1
    b.restart()
    wait_until(lambda: path.read_bytes() == original, 300, 1,
               "the unrepaired copy mended from peerb once it is back, with no new pass")
    assert f"{uid} on archive local replaced from peerb" in a.log_path.read_text()
    wait_until(lambda: scrub_status(a)["awaiting_repair"] == 0, 60, 0.5,
               "nothing left to try again")


@pytest.mark.timeout(900)     # (wait_until bounds of its own)
def test_an_archive_wiped_while_its_peer_was_down_is_checked_at_start(cluster, tmp_path):
    """Every file of peera's embedded archive deleted while peera is stopped (a disk
    replaced, a VM restored from an old image): at the next start the archive's copies
    are sampled at once (``health``: first seen up), every one is found missing, and a
    scrub pass puts them back from peerb, byte-identical — with no `pacsp2p scrub`.
    Before, the catalog counted them live until the next background pass (a week)."""
    a, b = two_in_sync(cluster, tmp_path, "SCRUB05")
    originals = {uid: path.read_bytes() for uid, path in files_of(a).items()}
    a.stop()
    for path in files_of(a).values():
        path.unlink()
    assert not files_of(a)
    a.restart()
    wait_until(lambda: {u: p.read_bytes() for u, p in files_of(a).items()} == originals,
               300, 1, "peera's copies put back at its start, with no pass asked for")
    log = a.log_path.read_text()
    assert "copies sampled are missing or damaged" in log, log[-3000:]
