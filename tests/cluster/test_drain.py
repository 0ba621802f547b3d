"""Drain (issue 13, item 4) with real peers: ``pacsp2p drain --peer`` moves every copy off
a peer, ends with "safe to remove", and placement sends nothing new there meanwhile and
afterwards; ``kill -9`` of the drained peer then leaves nothing under-replicated, even
past ``repair_after``. ``--archive`` drains one archive of a peer with two, ``--stop``
gives it back to placement.

Three peers (separate `twistd pacsp2p` processes), R=2, ``repair_after`` = 5 s. Copies
are read from ``GET /where`` (= ``pacsp2p where --json``) and the peers' disks.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import StoreSCP, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until

PACSP2P = Path(sys.executable).parent / "pacsp2p"
REPAIR_AFTER = 5


def where(peer, study: str) -> dict[str, list[tuple[str, str, bool]]]:
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: [(x["peer"], x["archive"], x["available"]) for x in r["replicas"]]
            for r in rows}


def under(peer) -> dict:
    return get_json(peer, timeout=30)["under_replicated"]


def drain(peer, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), "drain", "--config", str(peer.config_path), *args],
                          capture_output=True, text=True, timeout=900)


def store_study(tmp_path, peer, n: int, pid: str):
    files = datasets.make_study(tmp_path / pid, patient_id=pid, size=64,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    storescu(peer.port, peer.ae_title, files, timeout=600)
    return files, dn.study_of(files)


def in_sync(peers) -> bool:
    return len({get_json(p, "digest")["digest"] for p in peers}) == 1


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(n=3, destinations=None, per_peer=None):
        c = Cluster(tmp_path / f"cluster{len(made)}", destinations,
                    {"cluster": {"replicas": 2, "write_quorum": 2,
                                 "repair_after": REPAIR_AFTER}})
        made.append(c)
        c.start(n, per_peer=per_peer)
        c.wait_mesh(timeout=30)
        return c
    yield make
    for c in made:
        c.stop()


@pytest.fixture
def dest(tmp_path):
    with StoreSCP(tmp_path / "scp", extra=["+B"]) as scp:
        yield scp


def test_drain_a_peer_then_kill_it_nothing_is_under_replicated(cluster, dest, tmp_path):
    n = 40
    a, b, c = cluster(destinations={"STORESCP": dest.address})
    files, study = store_study(tmp_path, a, n, "DRAIN01")
    sent = dn.dataset_hashes(files)
    wait_until(lambda: in_sync((a, b, c)) and len(where(a, study)) == n and
               all(len(v) == 2 for v in where(a, study).values()), 60, 0.5,
               "2 copies of every instance, catalogs in sync")
    on_c = sum(1 for v in where(a, study).values() if any(p == "peerc" for p, _, _ in v))
    assert on_c > 0

    # asked at peera, done by peerc (over the overlay)
    proc = drain(a, "--peer", "peerc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("drained peer peerc") and last.endswith("safe to remove"), last
    # "safe to remove" is peerc's word: every copy it held is recorded elsewhere. peera
    # learns of the new copies and of peerc's tombstones by dissemination, a moment later.
    wait_until(lambda: len(where(a, study)) == n and
               all(len(v) == 2 and all(p != "peerc" for p, _, _ in v)
                   for v in where(a, study).values()), 60, 0.5,
               "peera's catalog: 2 copies of every instance, none on peerc")
    assert dn.archive_files(c.data_dir) == [], "files left on the drained peer"
    assert Counter(dn.sop_uid(f) for p in (a, b) for f in dn.archive_files(p.data_dir)) == \
        Counter({u: 2 for u in sent})
    # every peer knows, and places nothing new there: not even what peerc itself receives
    wait_until(lambda: get_json(b)["drain"]["peers"].get("peerc", {}).get("states") ==
               {"local": "drained"}, 30, 0.2, "peerb knows peerc is drained")
    files2, study2 = store_study(tmp_path, c, 10, "DRAIN02")
    wait_until(lambda: len(where(a, study2)) == 10 and
               all(len(v) == 2 for v in where(a, study2).values()), 60, 0.5,
               "the new study has its 2 copies")
    assert all(p != "peerc" for v in where(a, study2).values() for p, _, _ in v)
    assert dn.archive_files(c.data_dir) == []
    status = subprocess.run([str(PACSP2P), "status", "--config", str(c.config_path)],
                            capture_output=True, text=True, timeout=60).stdout
    assert "drain: local drained" in status, status

    # remove it the hard way: nothing is under-replicated, now or after repair_after
    wait_until(lambda: in_sync((a, b, c)), 60, 0.5, "catalogs in sync")
    # (while copies move, a peer may count an instance short for a moment: it can learn
    # of the drained copy's tombstone before the new copy's fact; never lost, never
    # repaired)
    for p in (a, b):
        wait_until(lambda p=p: under(p)["instances"] == 0, 60, 0.5,
                   f"{p.name}: nothing under-replicated after the drain")
    assert c.kill9() == -9
    for p in (a, b):
        wait_until(lambda p=p: members(p).get("peerc") == "dead", 20, 0.2,
                   f"{p.name} sees peerc dead")
    t_dead = time.time()
    while time.time() < t_dead + REPAIR_AFTER + 10:
        for p in (a, b):
            u = under(p)
            assert u["instances"] == 0 and u["unavailable"] == 0, (p.name, u)
        time.sleep(0.5)
    for p in (a, b):
        wait_until(lambda p=p: (under(p).get("at") or 0) > t_dead + REPAIR_AFTER, 60, 0.5,
                   f"{p.name} counted again after repair_after")
        assert under(p)["instances"] == 0, under(p)
        assert get_json(p)["repair"]["done"] == 0
    dn.clear(dest.directory)
    proc = dn.movescu(a.port, a.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert dn.dataset_hashes(dest.files()) == sent


def test_drain_one_archive_then_stop(cluster, tmp_path):
    two = {"archives": [{"name": "local", "adapter": "embedded"},
                        {"name": "spare", "adapter": "embedded"}]}
    a, b, c = cluster(per_peer={"peerb": two})
    files, study = store_study(tmp_path, a, 30, "DRAIN03")
    wait_until(lambda: in_sync((a, b, c)) and len(where(b, study)) == 30 and
               all(len(v) == 2 for v in where(b, study).values()), 60, 0.5,
               "2 copies of every instance")
    on_b = [(u, arch) for u, v in where(b, study).items() for p, arch, _ in v if p == "peerb"]
    assert on_b
    for name in ("local", "spare"):
        proc = drain(b, "--archive", name, "--stop")       # (nothing to stop: harmless)
        assert proc.returncode == 0, proc.stderr
    proc = drain(b, "--archive", "spare")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("safe to remove"), proc.stdout
    # the drained copies' drops reach b's catalog by anti-entropy: wait for it (bounded)
    wait_until(lambda: all(len(v) == 2 for v in where(b, study).values()), 60, 0.2,
               "two copies of every instance at peerb's view")
    copies = where(b, study)
    assert all(len(v) == 2 for v in copies.values()), copies
    assert all(arch != "spare" for v in copies.values() for p, arch, _ in v if p == "peerb")
    assert dn.archive_files(b.data_dir, "spare") == []
    # a drained archive takes nothing new; once the drain is stopped, placement may
    # choose it again
    _, study4 = store_study(tmp_path, a, 10, "DRAIN04")
    wait_until(lambda: len(where(b, study4)) == 10 and
               all(len(v) == 2 for v in where(b, study4).values()), 60, 0.5,
               "the new study has its 2 copies")
    assert all((p, arch) != ("peerb", "spare") for v in where(b, study4).values()
               for p, arch, _ in v)
    proc = drain(b, "--archive", "spare", "--stop")
    assert proc.returncode == 0 and "stopped" in proc.stdout, proc.stdout + proc.stderr
    wait_until(lambda: not get_json(a)["drain"]["peers"].get("peerb"), 30, 0.2,
               "peera knows the drain stopped")
    assert get_json(b)["drain"]["here"] is None
    # an unknown archive or peer is refused with a clear line
    proc = drain(b, "--archive", "nosuch")
    assert proc.returncode != 0 and "has no archive 'nosuch'" in proc.stderr, proc.stderr
    proc = drain(a, "--peer", "nosuch")
    assert proc.returncode != 0 and "no peer 'nosuch'" in proc.stderr, proc.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 160 KiB tmpfs (unmounted afterwards): room for a dozen small instances."""
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_drain_onto_a_full_archive_says_why_and_ends(cluster, tiny_disk, tmp_path):
    """peerc's only archive is a small tmpfs that fills up: the copies that must go there
    cannot move. Before, `pacsp2p drain` waited for ever (no "blocked": an archive was
    there) while the peer retried every 30 s; now it ends (exit 1) naming the error, and
    nothing was lost: every instance still has its 2 copies, byte-identical."""
    tiny = {"archives": [{"name": "local", "adapter": "embedded",
                          "path": str(tiny_disk / "archive")}]}
    a, b, c = cluster(per_peer={"peerc": tiny})
    n = 40
    files = datasets.make_study(tmp_path / "FULL01", patient_id="FULL01", size=64,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    r = subprocess.run(["/usr/bin/storescu", "-aec", a.ae_title, "127.0.0.1", str(a.port),
                        *map(str, files)], capture_output=True, text=True, timeout=600,
                       env={"TCP_NODELAY": "1"}, check=False)
    assert r.returncode == 0, r.stderr
    study, sent = dn.study_of(files), dn.dataset_hashes(files)
    wait_until(lambda: in_sync((a, b, c)) and len(where(a, study)) == n and
               all(len(v) == 2 for v in where(a, study).values()), 60, 0.5,
               "2 copies of every instance, catalogs in sync")
    proc = drain(a, "--peer", "peera", "--stalled", "10")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines()
            if line.startswith("pacsp2p: NOT safe to remove peer peera")]
    assert len(said) == 1, proc.stderr
    said = said[0]
    assert "No space left on device" in said and "not moved for 10 s" in said, said
    assert all(len(v) == 2 for v in where(a, study).values())
    held = Counter()
    for f in sorted(tmp_path.glob("cluster*/peer*/data/archives/*/objects/*/*.dcm")) + \
            sorted(tiny_disk.glob("archive/objects/*/*.dcm")):
        assert dn.dataset_sha256(f) == sent[dn.sop_uid(f)]
        held[dn.sop_uid(f)] += 1
    assert set(held) == set(sent) and min(held.values()) >= 2, held
    assert drain(a, "--peer", "peera", "--stop").returncode == 0
