"""Repair (issue 13, items 1 and 2) with real peers: re-replication after a peer dies for
good, surplus copies dropped when it returns, the repair rate, resuming after a restart.

Three peers (separate `twistd pacsp2p` processes), R=2, ``repair_after`` = 5 s; peers are
killed with ``kill -9`` by PID (pacsp2p.testing). Copies are read back from ``GET
/where`` (what ``pacsp2p where --json`` prints) and from the peers' disks; the C-MOVE is
DCMTK ``movescu`` (TCP_NODELAY=1) to a DCMTK ``storescp +B``.
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
WAIT = 180.0                      # generous bound for a repair to finish


def config(rate: float = 0, first_copy: str = "auto") -> dict:
    return {"cluster": {"replicas": 2, "write_quorum": 2, "repair_after": REPAIR_AFTER,
                        "repair_rate": rate}, "strategies": {"first_copy": first_copy}}


def replicas(peer, study: str) -> dict[str, list[tuple[str, bool]]]:
    """{instance: [(peer, available), ...]} from *peer*'s GET /where (= where --json)."""
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: [(x["peer"], x["available"]) for x in r["replicas"]]
            for r in rows}


def live(peer, study: str) -> dict[str, int]:
    return {u: sum(1 for _, ok in v if ok) for u, v in replicas(peer, study).items()}


def under(peer) -> dict:
    return get_json(peer, timeout=30)["under_replicated"]


def repair(peer) -> dict:
    return get_json(peer, timeout=30)["repair"]


def files_on(*peers) -> Counter:
    return Counter(dn.sop_uid(p) for peer in peers for p in dn.archive_files(peer.data_dir))


def store_study(tmp_path, peer, n: int, size: int, pid: str):
    files = datasets.make_study(tmp_path / pid, patient_id=pid, size=size,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    storescu(peer.port, peer.ae_title, files, timeout=600)
    uid = dn.study_of(files)
    wait_until(lambda: all(len(v) == 2 for v in replicas(peer, uid).values())
               and len(replicas(peer, uid)) == n, 60, 0.5, "every instance has 2 copies")
    return files, uid


def kill_for_good(cluster, victim, *others):
    assert victim.kill9() == -9
    for p in others:
        wait_until(lambda p=p: members(p).get(victim.name) == "dead", 20, 0.2,
                   f"{p.name} sees {victim.name} dead")


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(n=3, rate=0.0, destinations=None, first_copy="auto"):
        c = Cluster(tmp_path / f"cluster{len(made)}", destinations, config(rate, first_copy))
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


# -- 1. a peer dies for good: every instance gets its second copy back ----------------

def test_repair_after_a_peer_dies_then_a_second_failure_loses_nothing(cluster, dest,
                                                                      tmp_path):
    n = 60
    a, b, c = cluster(destinations={"STORESCP": dest.address})
    files, uid = store_study(tmp_path, a, n, 64, "REPAIR01")
    sent = dn.dataset_hashes(files)
    on_c = sum(1 for v in replicas(a, uid).values() if "peerc" in dict(v))
    assert on_c > 0
    wait_until(lambda: under(a)["instances"] == 0, 30, 0.5, "counted once, 0")

    kill_for_good(cluster, c, a, b)
    t_dead = time.monotonic()
    # counted under-replicated at once, not repaired before repair_after
    wait_until(lambda: under(a)["instances"] == on_c, 15, 0.2,
               "peera counts the instances that lost their copy on peerc")
    assert under(a)["unavailable"] == 0
    st = repair(a)
    if time.monotonic() - t_dead < REPAIR_AFTER - 2:      # (not on a very slow machine)
        assert st["state"] == "waiting", st
        assert any(w["what"] == "peerc" for w in st["waiting"]), st
        assert sum(repair(p)["done"] for p in (a, b)) == 0
    took = wait_until(lambda: all(x == 2 for x in live(a, uid).values()), WAIT, 0.5,
                      "every instance has 2 live copies again")
    print(f"\nrepaired {on_c} instances within {took + REPAIR_AFTER:.1f} s of the kill")
    assert time.monotonic() - t_dead >= REPAIR_AFTER, "repaired before repair_after"
    for p in (a, b):
        wait_until(lambda p=p: under(p)["instances"] == 0, 60, 0.5,
                   f"{p.name}: under_replicated back to 0")
    # exactly one peer made each copy: the copies made are the copies lost
    done = {p.name: repair(p)["done"] for p in (a, b)}
    assert sum(done.values()) == on_c, done
    assert files_on(a, b) == Counter({u: 2 for u in sent}), "not 2 files per instance"
    # `pacsp2p where` ends with a one-line summary
    proc = subprocess.run([str(PACSP2P), "where", "--config", str(a.config_path), "--study",
                           uid], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{n} instances, live copies min 2 max 2 (replicas 2)"), last
    proc = subprocess.run([str(PACSP2P), "status", "--config", str(a.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert "under-replicated: 0 instances with fewer than 2 live copies, 0 with none" \
        in proc.stdout, proc.stdout
    assert "repair: " in proc.stdout, proc.stdout

    # a second failure: everything is still on peera, byte for byte
    kill_for_good(cluster, b, a)
    wait_until(lambda: under(a)["instances"] == n, 30, 0.5, "all down to one copy")
    assert under(a)["unavailable"] == 0
    dn.clear(dest.directory)
    proc = dn.movescu(a.port, a.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": uid}, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Received Final Move Response (Success)" in out, \
        out[-3000:]
    assert dn.dataset_hashes(dest.files()) == sent


# -- 2. the dead peer returns: surplus dropped to exactly R, never below --------------

def test_surplus_copies_are_dropped_when_the_dead_peer_returns(cluster, tmp_path):
    n = 60
    a, b, c = cluster()
    files, uid = store_study(tmp_path, a, n, 64, "REPAIR02")
    kill_for_good(cluster, c, a, b)
    wait_until(lambda: all(x == 2 for x in live(a, uid).values()), WAIT, 0.5,
               "repaired")
    surplus = sum(1 for v in replicas(a, uid).values() if "peerc" in dict(v))
    assert surplus > 0

    c.restart()
    cluster_peers = (a, b, c)
    wait_until(lambda: members(a).get("peerc") == "alive", 30, 0.2, "peerc is back")
    seen_surplus, lowest = 0, 2
    deadline = time.monotonic() + WAIT
    while True:
        counts = live(a, uid)
        assert len(counts) == n
        lowest = min(lowest, min(counts.values()))
        assert lowest >= 2, f"an instance went below 2 live copies: {counts}"
        seen_surplus = max(seen_surplus, sum(1 for x in counts.values() if x > 2))
        if all(len(v) == 2 for v in replicas(a, uid).values()):
            break
        assert time.monotonic() < deadline, f"surplus not dropped: {counts}"
        time.sleep(0.3)
    assert seen_surplus > 0, "peerc's copies never counted again"
    dropped = sum(repair(p)["dropped"] for p in cluster_peers)
    assert dropped == surplus, (dropped, surplus)
    wait_until(lambda: files_on(a, b, c) == Counter({u: 2 for u in dn.dataset_hashes(files)}),
               60, 0.5, "2 files per instance on the disks")
    wait_until(lambda: len({get_json(p, "digest")["digest"] for p in cluster_peers}) == 1,
               60, 0.5, "catalogs converge")
    for p in cluster_peers:
        wait_until(lambda p=p: under(p)["instances"] == 0 and under(p)["surplus"] == 0,
                   60, 0.5, f"{p.name}: nothing under-replicated, no surplus")


# -- 3. the repair rate -----------------------------------------------------------------

def test_repair_rate_is_respected(cluster, tmp_path):
    rate = 1.0                                   # MB/s per repairing peer
    n = 300                                      # 256x256x16-bit: ~131 KB each
    # by rendezvous alone, both survivors hold copies whose other holder was peerc (with
    # the default, one copy where it arrives, peera would be the only repairer)
    a, b, c = cluster(rate=rate, first_copy="placement")
    files, uid = store_study(tmp_path, a, n, 256, "REPAIR03")
    kill_for_good(cluster, c, a, b)
    samples: dict[str, list] = {"peera": [], "peerb": []}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for p in (a, b):
            samples[p.name].append((time.monotonic(), repair(p)["bytes"]))
        if all(x == 2 for x in live(a, uid).values()):
            break
        time.sleep(0.25)
    else:
        pytest.fail("repair did not finish")
    for p in (a, b):
        samples[p.name].append((time.monotonic(), repair(p)["bytes"]))
    for name, s in samples.items():
        moving = [(t, n_) for t, n_ in s if n_ > 0]
        final = moving[-1][1]
        t0, b0 = moving[0]
        t1 = next(t for t, n_ in moving if n_ == final)
        assert final - b0 > 8e6, f"{name}: only {final - b0} bytes measured"
        measured = (final - b0) / (t1 - t0) / 1e6
        print(f"\n{name}: {(final - b0) / 1e6:.1f} MB in {t1 - t0:.1f} s = "
              f"{measured:.2f} MB/s (repair_rate {rate})")
        assert abs(measured - rate) <= 0.2 * rate, f"{name}: {measured:.2f} MB/s"


# -- 4. a repairing peer restarts: it resumes from the catalog -------------------------

def test_repair_resumes_after_the_repairing_peer_restarts(cluster, tmp_path):
    n = 150
    a, b, c = cluster(rate=1.0)
    files, uid = store_study(tmp_path, a, n, 256, "REPAIR04")
    kill_for_good(cluster, c, a, b)
    wait_until(lambda: repair(a)["done"] >= 10, 60, 0.2, "peera repairing")
    before = repair(a)
    assert a.kill9() == -9
    a.restart()
    after = repair(a)
    assert after["started"] == before["started"], (before, after)   # the same episode
    assert after["done"] >= before["done"] - 15, (before, after)     # saved every 1 s
    wait_until(lambda: all(x == 2 for x in live(b, uid).values()) and
               len(live(b, uid)) == n, WAIT, 0.5, "repaired after the restart")
    assert files_on(a, b) == Counter({u: 2 for u in dn.dataset_hashes(files)})
    for p in (a, b):
        wait_until(lambda p=p: under(p)["instances"] == 0, 60, 0.5,
                   f"{p.name}: under_replicated 0")
    end = repair(a)
    assert end["started"] == before["started"] and end["done"] > before["done"], (before, end)


# -- 5. an archive (not its peer) stops answering ---------------------------------------

def test_an_archive_down_for_repair_after_is_repaired_and_trimmed_when_back(cluster,
                                                                          tmp_path):
    n = 40
    a, b, c = cluster()
    files, uid = store_study(tmp_path, a, n, 32, "REPAIR05")
    on_c = sum(1 for v in replicas(a, uid).values() if "peerc" in dict(v))
    root = c.data_dir / "archives" / "local"
    away = root.with_name("local.away")
    root.rename(away)                        # peerc's health check fails: archive down
    try:
        wait_until(lambda: under(a)["instances"] == on_c, 30, 0.3,
                   "peera counts the copies on peerc's archive as not live")
        assert members(a)["peerc"] == "alive"
        wait_until(lambda: all(
            sum(1 for p, ok in v if ok and p != "peerc") == 2
            for v in replicas(a, uid).values()), WAIT, 0.5,
            "every instance has 2 copies on peera and peerb")
        assert sum(repair(p)["done"] for p in (a, b, c)) == on_c
    finally:
        away.rename(root)                    # back: its copies count again
    seen = []

    def trimmed():
        counts = live(a, uid)
        seen.append(min(counts.values()))
        return all(len(v) == 2 for v in replicas(a, uid).values())
    wait_until(trimmed, WAIT, 0.3, "surplus dropped back to 2 copies")
    assert min(seen) >= 2, "an instance went below 2 live copies"
    assert sum(repair(p)["dropped"] for p in (a, b, c)) == on_c
    wait_until(lambda: files_on(a, b, c) == Counter({u: 2 for u in dn.dataset_hashes(files)}),
               60, 0.5, "2 files per instance on the disks")
