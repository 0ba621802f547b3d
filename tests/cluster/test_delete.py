"""Delete, cluster-wide (issue 13, item 5), with real peers (separate twistd processes).

One three-peer cluster (R=2, ``repair_after`` 5 s so that repair runs during the tests)
for the module, each test with studies of its own:

- ``pacsp2p delete --study`` while peerb is down (peerb held copies of the first study;
  the second was stored while it was down, so hints were owed to it): C-FIND finds them
  at no peer, their files go; peerb returns and removes them from its catalog and disk;
  after anti-entropy, hinted hand-off and repair have run again they are still gone and
  the catalogs agree (same digest);
- the same with an IHE IOCM rejection note (a Key Object Selection document built with
  pydicom) sent by DCMTK storescu: it rejects one series of a study, the other series
  and the note itself stay;
- sending a deleted study again stores it again (2 copies of each instance, found at
  every peer), and it stays;
- a writer that held hints for a deleted study and slept through the delete hands
  nothing back when it returns (its own copies, which the deleter never saw, go with a
  follow-up tombstone).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, findscu, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until
from pacsp2p.testing.iocm import rejection_note

PACSP2P = Path(sys.executable).parent / "pacsp2p"
SETTLE = 12.0          # seconds for hand-off (every 3 s), repair and sync to run again


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("delete"),
                config={"cluster": {"repair_after": 5}})
    c.start(3)
    c.wait_mesh()
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def all_up(cluster):
    """A test that failed while peerb was stopped leaves it stopped: the next one starts
    it again (one failure, not one per test after it)."""
    down = [p for p in cluster.peers if not (p.process and p.process.alive)]
    for peer in down:
        peer.restart()
    if down:
        cluster.wait_mesh(timeout=120)


def study_files(tmp_path, name, patient_id, series) -> tuple[list[Path], str]:
    paths = datasets.make_study(tmp_path / name, patient_id=patient_id, size=16,
                                series=series)
    return paths, dn.study_of(paths)


def uids_of(paths) -> set[str]:
    return {dn.sop_uid(p) for p in paths}


def files_of(peer, uids: set[str]) -> Counter:
    """{SOP Instance UID: files} the peer's embedded archive holds of *uids*."""
    found = Counter()
    for p in dn.archive_files(peer.data_dir):
        try:
            uid = dn.sop_uid(p)
        except Exception:            # removed while we read it
            continue
        if uid in uids:
            found[uid] += 1
    return found


def find_studies(peer, study: str) -> list:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study,
        "NumberOfStudyRelatedInstances": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return rows


def find_images(peer, study: str) -> set[str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": ""},
        timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.SOPInstanceUID) for r in rows}


def where(peer, study: str) -> dict:
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: {(x["peer"], x["archive"]) for x in r["replicas"]} for r in rows}


def delete(peer, study: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), "delete", "--config", str(peer.config_path),
                           "--study", study, "--reason", "test"], capture_output=True,
                          text=True, timeout=600)


def digests_agree(peers) -> bool:
    return len({get_json(p, "digest")["digest"] for p in peers}) == 1


def left_of(peers, study: str, uids: set[str]) -> dict:
    """What each peer still holds of a deleted study: {peer: [what]} ({} when gone)."""
    left = {}
    for p in peers:
        what = [name for name, held in (("C-FIND rows", find_studies(p, study)),
                                        ("files", files_of(p, uids)),
                                        ("locations", where(p, study))) if held]
        if what:
            left[p.name] = what
    return left


def gone_everywhere(peers, study: str, uids: set[str]) -> bool:
    return not left_of(peers, study, uids)


def settle(cluster, a):
    """Hinted hand-off, anti-entropy and repair run again: hints done, catalogs agree,
    then a few more rounds of each."""
    wait_until(lambda: get_json(a)["catalog"]["hints"] == 0, 120, 0.5,
               "hinted hand-off has nothing left to do")
    wait_until(lambda: digests_agree(cluster.peers), 120, 0.5, "catalogs agree")
    time.sleep(SETTLE)
    wait_until(lambda: digests_agree(cluster.peers), 120, 0.5, "catalogs agree again")


def stop_b(cluster):
    a, b, c = cluster.peers
    b.stop()
    wait_until(lambda: members(a).get("peerb") == "dead" and
               members(c).get("peerb") == "dead", 60, 0.2, "peera and peerc see peerb dead")


def start_b(cluster):
    a, b, c = cluster.peers
    b.restart()
    cluster.wait_mesh(timeout=120)


# -- 1. pacsp2p delete while a peer is down --------------------------------------------------------

def test_a_study_deleted_while_a_peer_is_down_is_gone_when_it_returns(cluster, tmp_path):
    a, b, c = cluster.peers
    s1, study1 = study_files(tmp_path, "s1", "DELETE01", [("CT", 12, ExplicitVRLittleEndian)])
    s2, study2 = study_files(tmp_path, "s2", "DELETE02", [("MR", 8, ExplicitVRLittleEndian)])
    u1, u2 = uids_of(s1), uids_of(s2)
    storescu(a.port, a.ae_title, s1)
    wait_until(lambda: len(where(b, study1)) == 12, 120, 0.5, "peerb knows study 1")
    on_b = files_of(b, u1)
    assert on_b, "peerb holds no copy of study 1: nothing would test its return"

    stop_b(cluster)
    storescu(a.port, a.ae_title, s2)                 # copies owed to peerb: hints
    # peerc holds the other copy; its record of it may follow the answer (a commit group)
    wait_until(lambda: len(find_studies(c, study2)) == 1, 120, 0.2, "peerc finds study 2")

    for study, n in ((study1, 12), (study2, 8)):
        done = delete(a, study)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"deleted {n} instance(s) of study {study}" in done.stdout, done.stdout
    # at once, at every live peer: not found, and (soon) no file
    for p in (a, c):
        assert not find_studies(p, study1) and not find_studies(p, study2)
        assert not where(p, study1) and not where(p, study2)
    wait_until(lambda: not files_of(a, u1 | u2) and not files_of(c, u1 | u2), 120, 0.5,
               "the files are gone from peera and peerc")
    assert get_json(a)["catalog"]["hints"] == 0, "hints for deleted instances remain"

    # peerb still holds its copies on disk while it is down
    assert files_of(b, u1) == on_b
    start_b(cluster)
    wait_until(lambda: not find_studies(b, study1) and not where(b, study1), 120, 0.5,
               "peerb no longer finds study 1")
    wait_until(lambda: not files_of(b, u1 | u2), 120, 0.5, "peerb removed its files")
    deletions = get_json(b)["deletions"]
    assert deletions["tombstones"] >= 20 and deletions["purge_pending"] == 0, deletions

    settle(cluster, a)
    for study, uids in ((study1, u1), (study2, u2)):
        assert gone_everywhere(cluster.peers, study, uids)
        for p in cluster.peers:
            assert not find_images(p, study)


# -- 2. an IOCM rejection note --------------------------------------------------------------
def test_a_rejection_note_sent_by_storescu_rejects_what_it_references(cluster, tmp_path):
    a, b, c = cluster.peers
    s3, study3 = study_files(tmp_path, "s3", "REJECT01", [
        ("CT", 6, ExplicitVRLittleEndian), ("CT", 4, ExplicitVRLittleEndian)])
    rejected = [p for p in s3 if p.parent.name.startswith("01_")]
    kept = [p for p in s3 if p not in rejected]
    ur, uk = uids_of(rejected), uids_of(kept)
    storescu(a.port, a.ae_title, s3)
    wait_until(lambda: len(where(b, study3)) == 10, 120, 0.5, "peerb knows study 3")
    assert files_of(b, ur), "peerb holds no rejected copy: nothing would test its return"

    stop_b(cluster)
    note = rejection_note(tmp_path / "kos" / "note.dcm", s3, rejected)
    done = storescu(c.port, c.ae_title, [note])                 # DCMTK, at another peer
    assert done.returncode == 0, done.stderr[-2000:]
    note_uid = dn.sop_uid(note)
    for p in (a, c):
        wait_until(lambda p=p: find_images(p, study3) == uk | {note_uid}, 120, 0.5,
                   f"{p.name} finds the kept series and the note only")
    wait_until(lambda: not files_of(a, ur) and not files_of(c, ur), 120, 0.5,
               "rejected files gone from peera and peerc")

    start_b(cluster)
    wait_until(lambda: find_images(b, study3) == uk | {note_uid}, 120, 0.5,
               "peerb finds the kept series and the note only")
    wait_until(lambda: not files_of(b, ur), 120, 0.5, "peerb removed its rejected files")
    settle(cluster, a)
    for p in cluster.peers:
        assert find_images(p, study3) == uk | {note_uid}
        assert not files_of(p, ur)
        assert set(where(p, study3)) == uk | {note_uid}
        assert all(len(reps) == 2 for reps in where(p, study3).values())
    assert sum(get_json(p)["deletions"]["rejection_notes"] for p in cluster.peers) == 1
    rows = find_studies(a, study3)
    assert int(rows[0].NumberOfStudyRelatedInstances) == len(uk) + 1


# -- 3. sending again after a delete -----------------------------------------------------------

def test_sending_again_after_a_delete_stores_again(cluster, tmp_path):
    a, b, c = cluster.peers
    s4, study4 = study_files(tmp_path, "s4", "RESEND01", [("CT", 10, ExplicitVRLittleEndian)])
    u4 = uids_of(s4)
    storescu(a.port, a.ae_title, s4)
    wait_until(lambda: all(len(where(p, study4)) == 10 for p in cluster.peers), 120, 0.5,
               "every peer knows study 4")
    done = delete(c, study4)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: gone_everywhere(cluster.peers, study4, u4), 120, 0.5,
               "study 4 gone everywhere")

    storescu(b.port, b.ae_title, s4)                       # the same files again
    for p in cluster.peers:
        wait_until(lambda p=p: len(find_images(p, study4)) == 10, 120, 0.5,
                   f"{p.name} finds study 4 again")
    settle(cluster, a)
    total = Counter()
    for p in cluster.peers:
        total.update(files_of(p, u4))
        reps = where(p, study4)
        assert set(reps) == u4 and all(len(r) == 2 for r in reps.values()), reps
        assert len(find_studies(p, study4)) == 1
    assert total == Counter({u: 2 for u in u4}), total
    status = json.loads(subprocess.run(
        [str(PACSP2P), "status", "--config", str(a.config_path), "--json"],
        capture_output=True, text=True, timeout=120).stdout)
    assert status["deletions"]["purge_pending"] == 0


# -- 4. hinted hand-off by a peer that slept through the delete --------------------------------

def test_a_stale_writer_hands_nothing_back_after_a_delete(cluster, tmp_path):
    """peera holds hints for copies owed to peerb; peera is killed, peerb returns, the
    study is deleted at peerc; when peera returns, its hand-off (from a catalog that still
    holds the study until it pulls the tombstone) brings nothing back: peerb refuses a
    copy of a deleted instance, and peera removes its own copies when it learns."""
    a, b, c = cluster.peers
    s5, study5 = study_files(tmp_path, "s5", "HANDOFF5", [("CT", 10, ExplicitVRLittleEndian)])
    u5 = uids_of(s5)
    stop_b(cluster)
    storescu(a.port, a.ae_title, s5)
    owed = get_json(a)["catalog"]["hints"]
    assert owed > 0, "no copy owed to peerb: nothing would test the hand-off"
    wait_until(lambda: len(where(c, study5)) == 10, 120, 0.5, "peerc knows study 5")
    a.kill9()
    wait_until(lambda: members(c).get("peera") == "dead", 60, 0.2, "peerc sees peera dead")
    b.restart()
    wait_until(lambda: members(b).get("peerc") == "alive" and
               members(c).get("peerb") == "alive", 120, 0.2, "peerb and peerc meshed")
    wait_until(lambda: len(where(b, study5)) == 10, 120, 0.5, "peerb knows study 5")

    done = delete(c, study5)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: not where(b, study5) and not find_studies(b, study5), 120, 0.5,
               "peerb learned the delete")
    a.restart()
    cluster.wait_mesh(timeout=120)
    try:
        wait_until(lambda: gone_everywhere(cluster.peers, study5, u5), 120, 0.5,
                   "study 5 gone everywhere")
    except TimeoutError as e:
        raise AssertionError(f"{e}; left: {left_of(cluster.peers, study5, u5)}") from None
    settle(cluster, a)
    assert gone_everywhere(cluster.peers, study5, u5)
    for p in cluster.peers:
        assert not find_images(p, study5)
