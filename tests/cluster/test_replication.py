"""Replicated store (issue 5) with real peers: placement, write quorum, hinted hand-off,
strategy plugins and idempotent retries.

Every peer is a separate `twistd pacsp2p` process in overlay mode, so the defaults are
``[cluster] replicas = 2, write_quorum = 2``. Clients are DCMTK (by full path,
TCP_NODELAY=1) and, where the test must know exactly which C-STORE got which status, a
pynetdicom client. Replicas are read back with ``pacsp2p where`` and ``GET /where``.

Clusters:
- ``trio``  three default peers (tests 1, 2, 5; test 2 kills -9 and restarts peerb);
- a two-peer cluster for the write quorum (test 3, one peer down at a time);
- a three-peer cluster with plugins: peerb's two archives are labelled site "breast" and
  every peer pins MG there with plugins/pin_modality.py; peerc also loads a plugin that
  raises for US (test 4).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian,
                         DigitalMammographyXRayImageStorageForPresentation,
                         ExplicitVRLittleEndian, UltrasoundImageStorage)
from pynetdicom import build_context

from pacsp2p.adapters.layout import key
from pacsp2p.testing import dataset_sha256, datasets, echo, findscu, storescu, toml
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, members, wait_until
from pacsp2p.testing.plugins import BOOM_MESSAGE, boom_plugin

ROOT = Path(__file__).resolve().parents[2]
PIN_PLUGIN = ROOT / "plugins" / "pin_modality.py"
PACSP2P = Path(sys.executable).parent / "pacsp2p"
SIZE = 32                       # 32x32 images: the bytes are not what is tested here
N = 300
SUCCESS, OUT_OF_RESOURCES, PROCESSING_FAILURE = 0x0000, 0xA700, 0x0110
SYNC = 30.0                     # bound for catalogs to converge after a burst of stores


# -- helpers --------------------------------------------------------------------------

def where(peer, study: str | None = None, instance: str | None = None) -> dict:
    """{instance uid: [(peer, archive, available), ...]} from GET /where of *peer*."""
    q = f"study={study}" if study else f"instance={instance}"
    rows = get_json(peer, f"where?{q}", timeout=20)
    return {r["instance"]: [(x["peer"], x["archive"], x["available"]) for x in r["replicas"]]
            for r in rows}


def where_cli(peer, study: str) -> list:
    """`pacsp2p where --config <peer's config> --study UID --json` (the CLI)."""
    proc = subprocess.run([str(PACSP2P), "where", "--config", str(peer.config_path),
                           "--study", study, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def holders(replicas) -> set[str]:
    return {p for p, _a, _ok in replicas}


def store_one(peer, path: Path, sop_class=CTImageStorage) -> int:
    """One C-STORE of *path*'s bytes with pynetdicom; the response status."""
    with dn.association(peer.port, peer.ae_title,
                        [build_context(sop_class, [ExplicitVRLittleEndian])]) as assoc:
        rsp = assoc.send_c_store(path)
    assert "Status" in rsp, f"no C-STORE response from {peer.name}"
    return int(rsp.Status)


def count_images(peer, study: str) -> int:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": ""},
        timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return len(rows)


def log_text(peer) -> str:
    return peer.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Factory for clusters built peer by peer (own per-peer config); stopped by PID."""
    made: list[Cluster] = []

    def factory(name: str) -> Cluster:
        c = Cluster(tmp_path_factory.mktemp(name))
        made.append(c)
        return c

    yield factory
    for c in made:
        c.stop()


# -- 1. placement over three peers -----------------------------------------------------

def test_300_instances_land_on_two_distinct_peers_each(trio, tmp_path):
    a, _b, c = trio
    files = datasets.make_study(tmp_path / "s1", patient_id="REPL0001", size=SIZE,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    proc = storescu(a.port, a.ae_title, files, extra=["-v"], timeout=300)
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == N, out[-3000:]

    sent = {dn.sop_uid(p) for p in files}

    def placed():
        w = where(a, study)
        return set(w) == sent and all(len(r) == 2 for r in w.values())
    wait_until(placed, SYNC, interval=0.5, what="every instance with 2 replicas at peera")

    rows = where_cli(a, study)                 # the CLI says the same
    assert {r["instance"] for r in rows} == sent
    per_peer: Counter = Counter()
    for r in rows:
        peers = [x["peer"] for x in r["replicas"]]
        assert len(peers) == 2 and len(set(peers)) == 2, r
        assert all(x["available"] for x in r["replicas"]), r
        per_peer.update(peers)
    print(f"\ncopies per peer: {dict(per_peer)}")
    assert sum(per_peer.values()) == 2 * N
    assert set(per_peer) == {p.name for p in trio}
    assert all(140 <= n <= 260 for n in per_peer.values()), per_peer

    # the copies are really on the archives' disks
    for p in trio:
        on_disk = {dn.sop_uid(f) for f in dn.archive_files(p.data_dir)} & sent
        assert len(on_disk) == per_peer[p.name], p.name

    # a third peer finds them all
    wait_until(lambda: count_images(c, study) == N, SYNC, interval=1.0,
               what=f"peerc finds all {N} instances")


def test_pushed_and_pulled_copies_are_byte_identical_on_both_holders(trio, tmp_path):
    """Most data sets are pushed to their remote holders while they arrive (placement on
    the first bytes); a deflated one cannot be read that way and is copied once complete
    from the bulk channel. Either way both holders keep exactly the bytes sent, whatever
    the transfer syntax."""
    a, _b, _c = trio
    before = get_json(a, "status")["ingest"]["copies"]
    files = list(datasets.sample_files(tmp_path / "samples", ct_size=256).values())
    files.append(datasets.write(datasets.make_image(
        "CT", size=128, seed=77, transfer_syntax=DeflatedExplicitVRLittleEndian,
        PatientID="SAMPLE01", StudyInstanceUID=datasets.uid("sample-study")),
        tmp_path / "deflated.dcm"))
    files.append(datasets.write(datasets.make_image(      # 800 KB: pushed in 4 boxes
        "CT", size=640, seed=78, PatientID="SAMPLE01",
        StudyInstanceUID=datasets.uid("sample-study")), tmp_path / "big.dcm"))
    # pynetdicom sends each file's own bytes in its own transfer syntax (DCMTK's storescu
    # would convert the implicit and deflated ones to explicit VR)
    kinds = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
             for m in (dcmread(p, stop_before_pixels=True).file_meta for p in files)}
    with dn.association(a.port, a.ae_title,
                        [build_context(cls, [ts]) for cls, ts in sorted(kinds)]) as assoc:
        statuses = [int(assoc.send_c_store(p).Status) for p in files]
    assert statuses == [SUCCESS] * len(files)
    sent = {dn.sop_uid(p): dataset_sha256(p) for p in files}
    wait_until(lambda: set(where(a, dn.study_of(files))) == set(sent) and all(
        len(r) == 2 for r in where(a, dn.study_of(files)).values()), SYNC, interval=0.5,
        what="every sample with 2 replicas")
    held: Counter = Counter()
    for p in trio:
        for f in dn.archive_files(p.data_dir):
            uid = dn.sop_uid(f)
            if uid in sent:
                assert dataset_sha256(f) == sent[uid], (p.name, f)
                held[uid] += 1
    assert held == {uid: 2 for uid in sent}
    # one holder at least is another peer: 7 copies pushed, the deflated one fetched
    after = get_json(a, "status")["ingest"]["copies"]
    assert after["pushed"] - before["pushed"] >= len(files) - 1, (before, after)
    assert after["fetched"] - before["fetched"] >= 1, (before, after)
    proc = subprocess.run([str(PACSP2P), "status", "--config", str(a.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"{after['pushed']} pushed to other peers as they arrived" in proc.stdout, \
        proc.stdout


# -- 2. kill -9 of a replica holder while a stream is being stored ---------------------

def test_kill_9_of_a_peer_mid_stream_loses_no_acknowledged_instance(trio, dest, tmp_path):
    a, b, c = trio
    files = datasets.make_study(tmp_path / "s2", patient_id="REPL0002", size=SIZE,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    sent = dn.dataset_hashes(files)
    acked: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    halfway = threading.Event()

    def send_all():
        try:
            with dn.association(a.port, a.ae_title,
                                [build_context(CTImageStorage, [ExplicitVRLittleEndian])],
                                timeout=30) as assoc:
                for path in files:
                    rsp = assoc.send_c_store(path)
                    if "Status" in rsp and rsp.Status == SUCCESS:
                        acked.append(dn.sop_uid(path))
                        if len(acked) == N // 3:
                            halfway.set()
                    else:
                        failed.append(f"{path.name}: {rsp.get('Status')}")
        except Exception as e:
            errors.append(repr(e))
        finally:
            halfway.set()

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    assert halfway.wait(120), "sender stalled"
    assert b.kill9() == -9                      # SIGKILL by PID, mid-stream
    sender.join(240)
    assert not sender.is_alive(), "sender hung after peerb was killed"
    print(f"\nacknowledged {len(acked)}, failed {len(failed)}: {failed[:5]} {errors}")
    assert not errors, errors
    # only the stores in flight at the kill may fail: the others are re-placed on peerc
    assert len(acked) + len(failed) == N
    assert len(acked) >= N - 10, failed

    # while peerb is down (R-1 = 1 archive lost) every acknowledged instance still has an
    # available replica, and those stored after the kill were placed on peera + peerc
    acked_set = set(acked)
    wait_until(lambda: members(a).get("peerb") == "dead", 15, what="peera sees peerb dead")

    def available(w, u):
        return {p for p, _a, ok in w.get(u, []) if ok}

    def survived():
        w = where(a, study)
        return all(available(w, u) for u in acked_set) and all(
            available(w, u) == {"peera", "peerc"} for u in acked[-N // 3:])
    wait_until(survived, SYNC, interval=0.5, what="acknowledged instances available (b down)")

    # peerb returns: hand-off/sync; afterwards 2 (or 3: the stand-in stays) replicas each
    b.restart()
    trio.wait_mesh(timeout=30)

    def settled():
        w = where(c, study)
        return acked_set <= set(w) and all(
            2 <= len(holders(w[u])) <= 3 and all(ok for _p, _a, ok in w[u])
            for u in acked_set)
    wait_until(settled, 60, interval=1.0, what="acknowledged instances settled after restart")

    # nothing lost: a C-MOVE at peerc delivers every acknowledged instance byte-identical
    proc = dn.movescu(c.port, c.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                      timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {u: h for u, h in dn.dataset_hashes(dest.files()).items() if u in sent}
    assert acked_set <= set(got), f"{len(acked_set - set(got))} acknowledged not retrieved"
    assert all(got[u] == sent[u] for u in got), "retrieved bytes differ from those sent"
    # the copies in flight to peerb when it died: made again by hinted hand-off, so no
    # ERROR line for their commits (a warning each says so)
    lines = a.log_path.read_text(errors="replace").splitlines()
    assert not [x for x in lines if "#error] commit of" in x], lines[-40:]


# -- 3. write quorum -------------------------------------------------------------------

def test_write_quorum_refuses_alone_and_hands_off_with_w1(clusters, tmp_path):
    cluster = clusters("quorum")
    a, b = cluster.start(2, per_peer={"peera": {"cluster": {"write_quorum": 1}}})
    # peera: W=1, R=2; peerb: the defaults R=2, W=2
    cluster.wait_mesh()
    assert get_json(b)["peer"] == "peerb"
    f1 = datasets.write(datasets.make_image("CT", size=SIZE, seed=31,
                                            PatientID="QUORUM01"), tmp_path / "one.dcm")
    f2 = datasets.write(datasets.make_image("CT", size=SIZE, seed=32,
                                            PatientID="QUORUM01"), tmp_path / "two.dcm")
    uid1, uid2 = dn.sop_uid(f1), dn.sop_uid(f2)

    # peera down: peerb alone cannot make 2 copies -> 0xA700 and nothing recorded
    a.stop()
    wait_until(lambda: members(b).get("peera") == "dead", 15, what="peerb sees peera dead")
    assert store_one(b, f1) == OUT_OF_RESOURCES
    assert where(b, instance=uid1) == {}
    assert get_json(b)["catalog"]["instances"] == 0
    assert dn.archive_files(b.data_dir) == [], "a refused instance was left in the archive"
    assert "C-STORE " + uid1 in log_text(b)

    # peera back, peerb down: peera has W=1 -> Success with one copy, a hint for peerb
    a.restart()
    cluster.wait_mesh(timeout=30)
    b.stop()
    wait_until(lambda: members(a).get("peerb") == "dead", 15, what="peera sees peerb dead")
    assert store_one(a, f2) == SUCCESS
    assert [(p, ok) for p, _a, ok in where(a, instance=uid2)[uid2]] == [("peera", True)]
    assert get_json(a)["catalog"]["hints"] >= 1

    # peerb returns: hinted hand-off makes the second copy (bounded)
    b.restart()
    took = wait_until(lambda: holders(where(a, instance=uid2).get(uid2, [])) ==
                      {"peera", "peerb"}, 30, interval=0.5, what="second copy on peerb")
    print(f"\nsecond copy made {took:.1f} s after peerb answered C-ECHO")
    assert uid2 in {dn.sop_uid(p) for p in dn.archive_files(b.data_dir)}
    wait_until(lambda: get_json(a)["catalog"]["hints"] == 0, 15, what="hint dropped")
    # one summary line per hand-off batch, not one per instance (issue 16.3)
    assert "hinted hand-off: 1 copied to local@peerb" in log_text(a), log_text(a)[-3000:]
    assert f"{uid2} copied to" not in log_text(a)


# -- 4. strategy plugins ---------------------------------------------------------------

def test_pin_modality_plugin_and_a_plugin_that_raises(clusters, tmp_path):
    boom = boom_plugin(tmp_path)
    pin = {"strategies": {"plugins": [str(PIN_PLUGIN)],
                          "options": {"pin-modality": {"MG": "breast"}}}}
    cluster = clusters("plugins")
    a, _b, c = cluster.start(3, per_peer={
        "peera": pin,
        "peerb": toml.deep_merge(pin, {"archives": [
            {"name": "local", "adapter": "embedded", "site": "breast"},
            {"name": "breast2", "adapter": "embedded", "site": "breast"}]}),
        "peerc": toml.deep_merge(pin, {"strategies": {
            "plugins": [str(PIN_PLUGIN), str(boom)]}})})
    cluster.wait_mesh()

    files = datasets.make_study(tmp_path / "s4", patient_id="PIN0001", size=SIZE,
                                series=[("MG", 20, ExplicitVRLittleEndian),
                                        ("CT", 60, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    modality = {dn.sop_uid(p): dcmread(p, stop_before_pixels=True).Modality for p in files}
    proc = storescu(a.port, a.ae_title, files, extra=["-v"])
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == len(files), out[-3000:]

    def placed():
        w = where(a, study)
        return set(w) == set(modality) and all(len(r) == 2 for r in w.values())
    wait_until(placed, SYNC, interval=0.5, what="80 instances with 2 replicas each")
    w = where(a, study)
    ct_peers: Counter = Counter()
    for u, reps in w.items():
        if modality[u] == "MG":       # pinned: both copies on peerb's "breast" archives
            assert sorted((p, ar) for p, ar, _ok in reps) == [
                ("peerb", "breast2"), ("peerb", "local")], (u, reps)
        else:                         # as usual: 2 distinct peers, the first where sent
            assert len(holders(reps)) == 2, (u, reps)
            ct_peers.update(holders(reps))
    print(f"\nCT copies per peer: {dict(ct_peers)}")
    # the plugin left CT to rendezvous, so first_copy = "auto" (the default) kept one
    # copy where it arrived (peera) and spread the others (peerb has 2 of 3 archives)
    assert ct_peers["peera"] == 60, ct_peers
    assert ct_peers["peerb"] >= 20 and ct_peers["peerc"] >= 8, ct_peers

    # a plugin that raises: 0x0110, the peer keeps answering, the log names it
    us = datasets.write(datasets.make_image("US", size=SIZE, seed=41, PatientID="PIN0001"),
                        tmp_path / "us.dcm")
    assert store_one(c, us, UltrasoundImageStorage) == PROCESSING_FAILURE
    assert echo(c.port, c.ae_title)
    assert where(c, instance=dn.sop_uid(us)) == {}
    text = log_text(c)
    line = next((ln for ln in text.splitlines() if BOOM_MESSAGE in ln), "")
    assert line, text[-3000:]
    assert "RuntimeError" in line and "boom-placement" in line, line
    # and that peer still stores what the plugin leaves alone (CT) and MG at peerb
    mg = datasets.write(datasets.make_image(
        "MG", size=SIZE, seed=42, PatientID="PIN0001"), tmp_path / "mg.dcm")
    assert store_one(c, mg, DigitalMammographyXRayImageStorageForPresentation) == SUCCESS
    wait_until(lambda: sorted((p, ar) for p, ar, _ in where(c, instance=dn.sop_uid(mg)).get(
        dn.sop_uid(mg), [])) == [("peerb", "breast2"), ("peerb", "local")], SYNC,
        interval=0.5, what="MG stored via peerc is on peerb's two archives")


# -- 5. idempotent retries and conflicts -----------------------------------------------

def test_same_instance_twice_is_one_and_different_bytes_are_a_conflict(trio, tmp_path):
    a = trio[0]
    ds = datasets.make_image("CT", size=SIZE, seed=51, PatientID="IDEM0001",
                             PatientName="IDEM^FIRST")
    first = datasets.write(ds, tmp_path / "first.dcm")
    uid = dn.sop_uid(first)
    assert store_one(a, first) == SUCCESS
    assert store_one(a, first) == SUCCESS             # a retry: same UID, same bytes
    wait_until(lambda: len(where(a, instance=uid).get(uid, [])) == 2, SYNC, interval=0.5,
               what="2 replicas")
    w = where(a, instance=uid)
    assert list(w) == [uid] and len(holders(w[uid])) == 2, w
    rows, _ = findscu(a.port, a.ae_title, {"QueryRetrieveLevel": "IMAGE",
                                          "StudyInstanceUID": str(ds.StudyInstanceUID),
                                          "SOPInstanceUID": ""})
    assert [r.SOPInstanceUID for r in rows] == [uid]
    held_by = sorted(holders(w[uid]))
    peers = {p.name: p for p in trio}
    for name in held_by:
        copies = [f for f in dn.archive_files(peers[name].data_dir) if dn.sop_uid(f) == uid]
        assert [f.name for f in copies] == [f"{key(uid)}.dcm"], copies

    # same UID, other bytes: both kept, the conflict logged and counted
    before = {p.name: get_json(p)["catalog"]["conflicts"] for p in trio}
    ds.PatientName = "IDEM^SECOND"
    second = datasets.write(ds, tmp_path / "second.dcm")
    assert dn.sop_uid(second) == uid
    h1, h2 = dataset_sha256(first), dataset_sha256(second)
    assert h1 != h2
    status = store_one(a, second)
    assert status == SUCCESS or 0xB000 <= status <= 0xBFFF, hex(status)
    for name in held_by:
        p = peers[name]
        wait_until(lambda: get_json(p)["catalog"]["conflicts"] >= before[name] + 1, SYNC,
                   interval=0.5, what=f"conflict counted at {name}")
        versions = {dataset_sha256(f) for f in dn.archive_files(p.data_dir)
                    if f.name.startswith(key(uid))}
        assert versions == {h1, h2}, f"{name} does not keep both byte versions"
        assert "conflict: " + uid in log_text(p)
    assert len(where(a, instance=uid)) == 1           # still one instance
