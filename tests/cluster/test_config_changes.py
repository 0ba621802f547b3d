"""An administrator's config changes across a restart, with real peers (separate `twistd
pacsp2p` processes, R=2, ``repair_after`` = 5 s).

An ``[[archives]]`` entry removed (or renamed) while the catalog still has copies there:
the peer says so in one line at start, and every peer counts those copies down (they
were counted live by the others, and by nobody repaired), so repair makes them again
elsewhere: every instance has 2 live copies again, as every peer sees it, byte-identical.

``replicas`` raised 2 -> 3 on every peer (restarted one after the other): each instance
gets its third copy although none was lost (repair copied only lost ones: under-replicated
20 for ever, repair idle); lowered back to 2: the surplus is dropped.

A peer restarted from an older backup of its catalog numbered its facts anew, and the
others ignored them as already held (5 of 5 new copies invisible to them, for good): now
it mends that (``overlay.reclaim``) and says so once. Instances stored through it after
the restore (with the others up, or while it is alone) are listed with all their copies
by every peer, and with it stopped come back byte-identical from the others (C-GET);
what it stored after the backup and before the crash is known again at it, its own
copies included.
"""
from __future__ import annotations

import shutil
from collections import Counter

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, findscu, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, wait_until


def live(peer, study: str) -> dict[str, list[tuple[str, str]]]:
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: sorted((x["peer"], x["archive"]) for x in r["replicas"]
                                  if x["available"]) for r in rows}


TWO = {"archives": [{"name": "local", "adapter": "embedded"},
                    {"name": "spare", "adapter": "embedded"}]}


def three_peers(tmp_path, write_quorum: int):
    c = Cluster(tmp_path / "cluster", None, {"cluster": {
        "replicas": 2, "write_quorum": write_quorum, "repair_after": 5}})
    try:
        c.start(3, per_peer={"peerb": TWO})
        c.wait_mesh(timeout=30)
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(tmp_path):
    yield from three_peers(tmp_path, 2)


@pytest.fixture
def cluster_w1(tmp_path):
    """Write quorum 1: a peer alone takes an instance (the second copy owed)."""
    yield from three_peers(tmp_path, 1)


def test_an_archive_removed_from_the_config_is_repaired_not_counted_live(cluster,
                                                                          tmp_path):
    a, b, _ = cluster
    n = 30
    files = datasets.make_study(tmp_path / "st", patient_id="CFG01", size=64,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    storescu(a.port, a.ae_title, files, timeout=600)
    study, sent = dn.study_of(files), dn.dataset_hashes(files)
    wait_until(lambda: all(len(live(p, study)) == n and
                           all(len(v) == 2 for v in live(p, study).values())
                           for p in cluster), 60, 0.5, "2 live copies of every instance")
    on_spare = {u for u, v in live(a, study).items() if ("peerb", "spare") in v}
    assert on_spare, live(a, study)

    b.stop()
    b.overrides["archives"] = [{"name": "local", "adapter": "embedded"}]
    b.restart()
    cluster.wait_mesh(timeout=60)
    said = [line for line in b.log_path.read_text().splitlines()
            if "archive spare:" in line and "no [[archives]] entry" in line]
    assert len(said) == 1 and f"{len(on_spare)} copies in the catalog" in said[0], said
    assert str(b.config_path) in said[0]

    def healed():
        for p in cluster:
            view = live(p, study)
            if len(view) != n or any(len(v) != 2 or ("peerb", "spare") in v
                                     for v in view.values()):
                return False
            if get_json(p)["under_replicated"]["instances"] != 0:
                return False
        return True
    wait_until(healed, 120, 1.0, "every peer: 2 live copies of every instance, none on "
               "the archive removed from peerb's config")
    held = Counter()
    for p in cluster:
        for f in dn.archive_files(p.data_dir):
            assert dn.dataset_sha256(f) == sent[dn.sop_uid(f)]
            held[dn.sop_uid(f)] += 1
    assert set(held) == set(sent) and min(held.values()) >= 2, held


def test_replicas_raised_then_lowered(cluster, tmp_path):
    n = 20
    a = cluster[0]
    files = datasets.make_study(tmp_path / "st", patient_id="CFG02", size=64,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    storescu(a.port, a.ae_title, files, timeout=600)
    study, sent = dn.study_of(files), dn.dataset_hashes(files)

    def copies_everywhere(r):
        return all(len(live(p, study)) == n and
                   all(len(v) == r for v in live(p, study).values()) and
                   get_json(p)["under_replicated"]["instances"] == 0 for p in cluster)
    wait_until(lambda: copies_everywhere(2), 60, 0.5, "2 live copies of every instance")
    assert all(get_json(p)["repair"]["done"] == 0 for p in cluster)  # nothing to copy yet

    for r in (3, 2):
        for p in cluster:
            p.stop()
            p.overrides["cluster"] = dict(p.overrides["cluster"], replicas=r)
            p.restart()
        cluster.wait_mesh(timeout=60)
        wait_until(lambda r=r: copies_everywhere(r), 120, 1.0,
                   f"replicas = {r}: {r} live copies of every instance on every peer")
        def held():
            out = Counter()
            for p in cluster:
                for arch in ("local", "spare"):
                    for f in dn.archive_files(p.data_dir, arch):
                        try:
                            sha, uid = dn.dataset_sha256(f), dn.sop_uid(f)
                        except FileNotFoundError:          # purged meanwhile
                            continue
                        assert sha == sent[uid]
                        out[uid] += 1
            return out
        # a surplus copy leaves the catalogs first, then its archive (the purge queue)
        wait_until(lambda r=r: held() == Counter({u: r for u in sent}), 60, 1.0,
                   f"replicas = {r}: {r} files of every instance on the archives")


def store_at(peer, tmp_path, pid: str, n: int):
    files = datasets.make_study(tmp_path / pid, patient_id=pid, size=64,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    storescu(peer.port, peer.ae_title, files, timeout=600)
    return files, dn.study_of(files)


def agreed(cluster, study: str, n: int) -> bool:
    """Every peer lists the *n* instances of *study* with the same copies (2 at least):
    peerc's own facts too, not only the others'."""
    views = [live(p, study) for p in cluster]
    return len(views[0]) == n and all(len(v) >= 2 for v in views[0].values()) \
        and all(v == views[0] for v in views)


def stored_then_lost(cluster, tmp_path, pid: str) -> tuple[str, dict, object]:
    """peerc stores a study, is backed up (its catalog, stopped), stores another one
    that every peer then lists, and is stopped with its catalog put back from the
    backup: (that study, its copies then, as peera listed them, the backup)."""
    a, _, c = cluster
    store_at(c, tmp_path, pid + "A", 5)
    c.stop()
    backup = tmp_path / "backup"
    backup.mkdir()
    for f in c.data_dir.glob("catalog.sqlite*"):
        shutil.copy2(f, backup / f.name)
    c.restart()
    cluster.wait_mesh(timeout=60)
    _, lost = store_at(c, tmp_path, pid + "B", 8)       # facts the backup does not have
    wait_until(lambda: agreed(cluster, lost, 8), 60, 0.5,
               "every peer lists every copy of every instance of the second study")
    before = live(a, lost)
    assert any(p == "peerc" for v in before.values() for p, _ in v), before
    c.stop()
    for f in c.data_dir.glob("catalog.sqlite*"):
        f.unlink()
    for f in backup.iterdir():
        shutil.copy2(f, c.data_dir / f.name)
    return lost, before, backup


def mended(cluster, lost: str, before: dict) -> list[str]:
    """Once peerc knows again its copies of *lost* and every peer agrees on them: the
    lines where it said it mended its catalog."""
    c = cluster[2]
    mine = {(u, x) for u, v in before.items() for x in v if x[0] == "peerc"}
    wait_until(lambda: all(x in live(c, lost).get(u, ()) for u, x in mine), 60, 0.5,
               "peerc knows again its copies of what it stored after the backup")
    wait_until(lambda: agreed(cluster, lost, 8), 60, 0.5,
               "every peer agrees on the second study")
    said = [line for line in c.log_path.read_text().splitlines()
            if "holds facts of this peer up to" in line]
    assert len(said) == 1 and "restored from an older backup" in said[0], said
    assert "mended" in said[0], said
    return said


def found_then_got(cluster, tmp_path, files, study: str) -> None:
    """peera and peerb find every instance of *study* (C-FIND) and, peerc stopped, return
    it byte-identical (C-GET)."""
    a, b, c = cluster
    sent = dn.dataset_hashes(files)
    for p in (a, b):
        rows, proc = findscu(p.port, p.ae_title, {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": ""},
            timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert {str(r.SOPInstanceUID) for r in rows} == set(sent), p.name
    c.stop()
    for p in (a, b):
        out = tmp_path / f"get-{p.name}"
        proc = dn.getscu(p.port, p.ae_title, out, {"QueryRetrieveLevel": "STUDY",
                                                   "StudyInstanceUID": study}, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert dn.dataset_hashes(list(out.iterdir())) == sent, p.name


def test_a_catalog_restored_from_an_older_backup_is_mended(cluster, tmp_path):
    c = cluster[2]
    lost, before, _ = stored_then_lost(cluster, tmp_path, "CFG03")
    c.restart()
    cluster.wait_mesh(timeout=60)
    n = 12
    files, new = store_at(c, tmp_path, "CFG05", n)     # numbered by the restored catalog
    wait_until(lambda: agreed(cluster, new, n), 120, 1.0,
               "every peer lists every copy of every instance stored after the restore")
    after = live(cluster[0], new)
    assert any(("peerc", "local") in v for v in after.values()), after
    mended(cluster, lost, before)
    found_then_got(cluster, tmp_path, files, new)


def test_what_a_restored_peer_stored_alone_reaches_the_others(cluster_w1, tmp_path):
    """peerc restarts from the backup while peera and peerb are down: it starts all the
    same, and what it stores (write quorum 1, the second copies owed) before it can
    hear that the others hold more of its facts is numbered in a new epoch (from 2^24
    above its catalog's top), new to them: they list it, and its lost facts come back."""
    cluster = cluster_w1
    a, b, c = cluster
    lost, before, _ = stored_then_lost(cluster, tmp_path, "CFG06")
    a.stop()
    b.stop()
    c.restart()                             # its seeds do not answer: it starts alone
    n = 8
    files, new = store_at(c, tmp_path, "CFG08", n)     # known only by peerc's facts
    a.restart()
    b.restart()
    cluster.wait_mesh(timeout=60)
    wait_until(lambda: agreed(cluster, new, n), 120, 1.0,
               "every peer lists every copy of every instance peerc stored alone")
    said = mended(cluster, lost, before)
    assert "are new to everybody" in said[0], said
    wait_until(lambda: all(any(p != "peerc" for p, _ in v)
                           for v in live(a, new).values()), 120, 1.0,
               "every instance peerc stored alone has a copy on peera or peerb too")
    found_then_got(cluster, tmp_path, files, new)
