"""Self-healing under injected faults (a fault-injection review, 2026-12-07): real peers
(separate `twistd pacsp2p` processes), real Orthanc archives, data stored with
/usr/bin/storescu (TCP_NODELAY=1), copies read from ``GET /where`` and the archives.

- R = 3 over 3 peers, peera's archive an Orthanc that loses every file behind the
  cluster's back (``DELETE /instances/{id}`` through its own REST API), then peerc is
  killed (-9): every instance must get its 3 live copies back. The repairer of an
  instance is its first live holder in placement order; where that is peera, its copy
  is gone: before, the repair failed every 30 s for ever ("repair of ... failed: ... is
  not in Orthanc archive"), the instance short until the weekly scrub, though peerb
  held a good copy. A failed repair now has its own copy checked (``Scrub.suspect``,
  as a failed drain move does): the copy is replaced from a good replica, and the next
  try copies it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, members, wait_until
from pacsp2p.testing.orthanc import ORTHANC_BIN, Orthanc
from pacsp2p.testing.procs import Process

pytestmark = pytest.mark.timeout(900)    # generous bounds of their own (wait_until)

PACSP2P = Path(sys.executable).parent / "pacsp2p"
REPAIR_AFTER = 5
N = 16
N2 = 40


def copies(peer, study: str) -> dict[str, set[tuple[str, str]]]:
    """{instance: {(peer, archive) of each available copy}} as *peer* lists them."""
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: {(x["peer"], x["archive"]) for x in r["replicas"]
                            if x["available"]} for r in rows}


def under(peer) -> dict:
    return get_json(peer, timeout=30)["under_replicated"]


def store_all(peer, files) -> None:
    proc = storescu(peer.port, peer.ae_title, files, extra=["-v"], timeout=600,
                    check=False)
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == len(files), out[-2000:]


def trio(cluster, archive: dict | None, per_peer=None, **cfg):
    """Three peers (peera's only archive *archive*, if given; *per_peer* configs),
    meshed; *cfg*: their [cluster] (R = W = 2 unless said)."""
    cluster.config = {"cluster": {"replicas": 2, "write_quorum": 2, **cfg}}
    per_peer = dict(per_peer or {})
    if archive:
        per_peer["peera"] = {"archives": [archive]}
    peers = cluster.start(3, per_peer=per_peer)
    cluster.wait_mesh(timeout=30)
    return peers


def stored(tmp_path, peer, pid: str, n: int, r: int = 2):
    """A study of *n* instances stored at *peer*, once each has *r* copies: (study
    UID, {uid: data set hash})."""
    files = datasets.make_study(tmp_path / pid, patient_id=pid, size=32,
                                series=[("CT", n, ExplicitVRLittleEndian)])
    store_all(peer, files)
    study = dn.study_of(files)
    wait_until(lambda: len(c := copies(peer, study)) == n and
               all(len(s) == r for s in c.values()), 120, 0.5, f"{r} copies of each")
    return study, dn.dataset_hashes(files)


def got_all(peer, study: str, sent: dict, out) -> None:
    """A C-GET (getscu) of *study* at *peer* brings every instance, byte-identical."""
    proc = dn.getscu(peer.port, peer.ae_title, out,
                     {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert dn.dataset_hashes(sorted(out.iterdir())) == sent


def kill_peerc_then_healed(a, b, c, study: str, n: int, r: int) -> None:
    """kill -9 peerc; then peera and peerb count nothing under-replicated and list *r*
    copies of each of the *n* instances outside peerc (generous bounds)."""
    assert c.kill9() == -9
    for p in (a, b):
        wait_until(lambda p=p: members(p).get("peerc") == "dead", 60, 0.2,
                   f"{p.name} sees peerc dead")
    for p in (a, b):
        wait_until(lambda p=p: under(p)["instances"] == 0 and
                   (under(p).get("at") or 0) > 0 and len(x := copies(p, study)) == n and
                   all(len(s - {("peerc", "local")}) >= r for s in x.values()),
                   240, 1.0, f"{p.name}: {r} live copies of every instance")


def orthanc_hashes(orthanc: Orthanc, tmp) -> dict[str, str]:
    """{SOP Instance UID: data set SHA-256} of what the Orthanc holds (its files)."""
    out = {}
    for oid in orthanc.get("/instances"):
        path = tmp / f"{oid}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{oid}/file"))
        out[dn.sop_uid(path)] = dn.dataset_sha256(path)
        path.unlink()
    return out


def test_a_repairer_whose_orthanc_lost_its_files_repairs_from_a_good_replica(cluster,
                                                                              tmp_path):
    with Orthanc(tmp_path / "orthanc", aet="ORTHA") as orthanc:
        cluster.config = {"cluster": {"replicas": 3, "write_quorum": 3,
                                      "repair_after": REPAIR_AFTER}}
        a, b, c = cluster.start(3, per_peer={
            "peera": {"archives": [{"name": "orth", "adapter": "orthanc",
                                    "url": orthanc.url}]},
            "peerb": {"archives": [{"name": "local", "adapter": "embedded"},
                                   {"name": "spare", "adapter": "embedded"}]}})
        cluster.wait_mesh(timeout=30)
        files = datasets.make_study(tmp_path / "HEAL1", patient_id="HEAL1", size=32,
                                    series=[("CT", N, ExplicitVRLittleEndian)])
        study, sent = dn.study_of(files), dn.dataset_hashes(files)
        store_all(b, files)
        wait_until(lambda: len(r := copies(b, study)) == N and
                   all(len(s) == 3 and {p for p, _ in s} == {"peera", "peerb", "peerc"}
                       for s in r.values()), 120, 0.5, "3 copies of every instance")
        # the Orthanc loses everything behind the cluster's back (it still answers)
        for oid in orthanc.get("/instances"):
            orthanc.request("DELETE", f"/instances/{oid}")
        assert orthanc.get("/statistics")["CountInstances"] == 0
        # every instance gets its 3 live copies back: peerb's spare, and peera's Orthanc
        # again where peera is the repairer (its copy replaced from peerb's first)
        kill_peerc_then_healed(a, b, c, study, N, 3)
        # a C-GET at each live peer: every instance, byte-identical (reads fail over
        # from the Orthanc's copies still lost: a scrub pass finds those)
        for p in (a, b):
            got_all(p, study, sent, tmp_path / f"get-{p.name}")
        proc = subprocess.run([str(PACSP2P), "scrub", "--config", str(a.config_path)],
                              capture_output=True, text=True, timeout=900)
        on_a = [u for u, s in copies(a, study).items() if ("peera", "orth") in s]
        held = orthanc_hashes(orthanc, tmp_path)
        assert {u: held.get(u) for u in on_a} == {u: sent[u] for u in on_a}, proc.stdout
        assert "replaced from" in a.log_path.read_text()


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MB tmpfs mounted for this test (unmounted after)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True,
                   timeout=10)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], timeout=10)


def test_a_disk_full_during_repair_sends_the_copies_to_an_archive_with_room(cluster,
                                                                            tmp_path,
                                                                            small_fs):
    """peerb's archive "spare" is on a 2 MB tmpfs that a filler (test_bad_input's) fills
    up; peerc is killed. The copies peerc held are made again: the full archive, holding
    the fewest copies, is ranked first by placement among peerb's; before, the copies
    went there every 30 s for ever ("No space left on device") though peerb's "local"
    had room."""
    a, b, c = trio(cluster, None, repair_after=REPAIR_AFTER, per_peer={
        "peerb": {"archives": [{"name": "local", "adapter": "embedded"},
                               {"name": "spare", "adapter": "embedded",
                                "path": str(small_fs / "archive")}]}})
    with open(small_fs / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    study, sent = stored(tmp_path, a, "HEAL2", N2)
    kill_peerc_then_healed(a, b, c, study, N2, 2)
    got_all(a, study, sent, tmp_path / "get")


def drain(peer, *args, **kw):
    return subprocess.Popen([str(PACSP2P), "drain", "--config", str(peer.config_path),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def restart_orthanc(orthanc: Orthanc) -> None:
    """Start *orthanc* again on its ports and storage (its config file as written)."""
    orthanc.process = Process([ORTHANC_BIN, orthanc.config_path], orthanc.log_path).start()
    orthanc._wait_ready()


def test_two_admins_drain_an_orthanc_killed_mid_drain_then_the_last_archive(cluster,
                                                                           tmp_path):
    """peera's only archive is an Orthanc. Two admins ask for its drain at once (at peera
    and at peerb); the Orthanc is killed (-9) after a few copies moved and started again
    on its storage: the drain ends "safe to remove", every instance has its 2 copies
    elsewhere, byte-identical, the Orthanc holds nothing. Then peerb is drained: only
    peerc's archive is left for R = 2, so `pacsp2p drain` must end (exit 1) saying so,
    and nothing is dropped."""
    with Orthanc(tmp_path / "orthanc", aet="ORTHA") as orthanc:
        a, b, c = trio(cluster, {"name": "orth", "adapter": "orthanc", "url": orthanc.url},
                       repair_after=120, repair_rate=0.05)
        study, sent = stored(tmp_path, b, "HEAL3", N2)
        on_orth = sum(1 for s in copies(b, study).values() if ("peera", "orth") in s)
        assert on_orth >= 10, on_orth
        first, second = drain(a, "--peer", "peera"), drain(b, "--peer", "peera")
        wait_until(lambda: (get_json(a)["drain"]["here"] or {}).get("moved", 0) >= 3,
                   120, 0.2, "a few copies moved off the Orthanc")
        orthanc.process.popen.kill()             # kill -9, by the PID we started
        orthanc.process.popen.wait(timeout=30)
        wait_until(lambda: members(b).get("peera") == "alive" and
                   "orth" in (get_json(a)["drain"]["here"] or {}).get("states", {}),
                   30, 0.2, "peera drains on")
        time.sleep(8)                            # the health loop sees it down
        restart_orthanc(orthanc)
        outs = [p.communicate(timeout=900) for p in (first, second)]
        for p, (out, err) in zip((first, second), outs):
            assert p.returncode == 0, out + err
            assert out.strip().splitlines()[-1].endswith("safe to remove"), out + err
        for p in (a, b, c):
            wait_until(lambda p=p: len(r := copies(p, study)) == N2 and
                       all(len(s) == 2 and ("peera", "orth") not in s
                           for s in r.values()), 120, 0.5,
                       f"{p.name}: 2 copies of every instance, none on the Orthanc")
        assert orthanc.get("/instances") == []
        for p in (b, c):
            got_all(p, study, sent, tmp_path / f"get-{p.name}")

        # the last archive that could hold a second copy: R cannot be met
        last = drain(c, "--peer", "peerb")
        out, err = last.communicate(timeout=900)
        assert last.returncode == 1, out + err
        assert "NOT safe to remove peer peerb" in err and "no other archive" in err, err
        for p in (b, c):
            r = copies(p, study)
            assert len(r) == N2 and all(len(s) == 2 for s in r.values())
        stop = drain(c, "--peer", "peerb", "--stop")
        assert stop.wait(timeout=120) == 0


def empty_orthanc_in_place_of(old: Orthanc, workdir) -> Orthanc:
    """An empty Orthanc on *old*'s ports (its storage and index new)."""
    new = Orthanc(workdir, aet=old.aet)
    new.http_port, new.dicom_port = old.http_port, old.dicom_port
    new.workdir.mkdir(parents=True, exist_ok=True)
    new.config_path.write_text(json.dumps(new._config(), indent=2))
    new.process = Process([ORTHANC_BIN, new.config_path], new.log_path).start()
    new._wait_ready()
    return new


def test_an_orthanc_replaced_by_an_empty_one_gets_its_copies_back(cluster, tmp_path):
    """peera's Orthanc is killed (-9) and an empty one takes its place (same URL: a disk
    replaced, a VM restored from an empty image) within one health period, or after
    the peer saw it down. Before, the cluster went on counting the lost copies as live:
    every instance on it one copy short (and read elsewhere) until the weekly scrub. Now
    an archive that answers again (or whose instance count falls) has a sample of its
    copies checked; a missing one starts a scrub pass that puts every copy back."""
    with Orthanc(tmp_path / "orthanc", aet="ORTHA") as orthanc:
        a, b, c = trio(cluster, {"name": "orth", "adapter": "orthanc", "url": orthanc.url},
                       repair_after=600)
        study, sent = stored(tmp_path, b, "HEAL4", N2)
        on_orth = sorted(u for u, s in copies(a, study).items() if ("peera", "orth") in s)
        assert len(on_orth) >= 10
        orthanc.process.popen.kill()             # kill -9, by the PID we started
        orthanc.process.popen.wait(timeout=30)
        fresh = empty_orthanc_in_place_of(orthanc, tmp_path / "orthanc2")
        try:
            assert fresh.get("/instances") == []

            def back():
                held = orthanc_hashes(fresh, tmp_path)
                return {u: held.get(u) for u in on_orth} == {u: sent[u] for u in on_orth}
            wait_until(back, 200, 2.0, "the empty Orthanc holds its copies again")
            for p in (a, b, c):
                r = copies(p, study)
                assert len(r) == N2 and all(len(s) == 2 for s in r.values())
            wait_until(lambda: len({get_json(p, "digest")["digest"] for p in (a, b, c)})
                       == 1, 60, 0.5, "every peer's catalog the same")
            got_all(a, study, sent, tmp_path / "get")
        finally:
            fresh.stop()


def test_a_dcmqrscp_copy_damaged_or_lost_behind_our_back_is_made_again_elsewhere(
        cluster, tmp_path):
    """peera's only archive is a DCMTK dcmqrscp (plain DIMSE: no delete, no restore).
    One of its files gets other bytes, another is removed from its directory (its index
    still lists it). `pacsp2p scrub` reports the damage it cannot replace (exit 1);
    before, the copy went on counting as live: the instance one good copy short for
    ever, and repair never ran (nothing *lost*). Now a copy found damaged on an archive
    that cannot restore it is made again elsewhere from a good replica and forgotten.
    So is the removed file's copy: dcmqrscp's C-GET of it answers a failed sub-operation
    and sends nothing (``adapters.dimse.Unreadable``), which the scrub counts "missing";
    before, "skipped", and the copy counted live."""
    from pacsp2p.testing.dcmqrscp import DcmQrScp
    with DcmQrScp(tmp_path / "qr") as qr:
        a, b, c = trio(cluster, {"name": "pacs", "adapter": "dimse", "ae_title": qr.ae_title,
                                 "host": "127.0.0.1", "port": qr.port},
                       scrub_sample=1.0, repair_after=REPAIR_AFTER)
        study, sent = stored(tmp_path, b, "HEAL5", N)
        # peera scrubs once it knows the other copies (a copy scrubbed before any good
        # replica is known is not made again until the next pass: an open item)
        wait_until(lambda: len(r := copies(a, study)) == N and
                   all(len(s) >= 2 for s in r.values()), 120, 0.5, "peera knows every copy")
        held = sorted((dn.sop_uid(f), f) for f in qr.files() if dn.sop_uid(f) in sent)
        assert len(held) >= 2, held
        (damaged, path), (lost, gone) = held[0], held[1]
        data = bytearray(path.read_bytes())
        data[-40] ^= 0xFF
        path.write_bytes(bytes(data))
        gone.unlink()
        proc = subprocess.run([str(PACSP2P), "scrub", "--config", str(a.config_path)],
                              capture_output=True, text=True, timeout=900, check=False)
        assert proc.returncode == 1 and damaged in proc.stdout, proc.stdout + proc.stderr
        assert lost in proc.stdout, proc.stdout      # listed as unrepaired (missing)
        for p in (a, b, c):
            wait_until(lambda p=p: len(r := copies(p, study)) == N and
                       all(len(s - {("peera", "pacs")}) >= 2
                           for u, s in r.items() if u in (damaged, lost)), 120, 0.5,
                       f"{p.name}: 2 good copies of the instances damaged and lost on "
                       "dcmqrscp")
        got_all(a, study, sent, tmp_path / "get")


def test_peers_and_an_orthanc_killed_mid_drain_and_mid_delete(cluster, tmp_path):
    """kill -9 of the draining peer after a few copies moved, then started again: the
    drain goes on from its saved state and ends "safe to remove" (every instance 2
    copies elsewhere, byte-identical). Then the study is deleted everywhere and, before
    the purge is done, peera's Orthanc is killed (-9) and peera too; both started again
    (same storage): the Orthanc ends empty, findscu at every peer finds nothing, every
    catalog is the same."""
    from pacsp2p.testing.dcmtk import findscu
    with Orthanc(tmp_path / "orthanc", aet="ORTHA") as orthanc:
        a, b, c = trio(cluster, {"name": "orth", "adapter": "orthanc", "url": orthanc.url},
                       repair_after=120, repair_rate=0.05)
        study, sent = stored(tmp_path, b, "HEAL6", N2)
        asked = drain(a, "--peer", "peerc")
        wait_until(lambda: (get_json(c)["drain"]["here"] or {}).get("moved", 0) >= 3,
                   120, 0.2, "a few copies moved off peerc")
        assert c.kill9() == -9
        out, err = asked.communicate(timeout=300)
        assert asked.returncode != 0, out + err      # the draining peer died first
        c.restart()
        cluster.wait_mesh(timeout=120)
        again = drain(a, "--peer", "peerc")
        out, err = again.communicate(timeout=900)
        assert again.returncode == 0 and out.strip().endswith("safe to remove"), out + err
        for p in (a, b, c):
            wait_until(lambda p=p: len(r := copies(p, study)) == N2 and
                       all(len(s) == 2 and all(q != "peerc" for q, _ in s)
                           for s in r.values()), 120, 0.5,
                       f"{p.name}: 2 copies of every instance, none on peerc")
        got_all(b, study, sent, tmp_path / "get")
        assert drain(a, "--peer", "peerc", "--stop").wait(timeout=120) == 0

        on_orth = sum(1 for s in copies(a, study).values() if ("peera", "orth") in s)
        assert on_orth and len(orthanc.get("/instances")) == on_orth
        gone = subprocess.run([str(PACSP2P), "delete", "--config", str(b.config_path),
                               "--study", study, "--reason", "fault test"],
                              capture_output=True, text=True, timeout=600, check=False)
        orthanc.process.popen.kill()             # kill -9, by the PID we started
        assert a.kill9() == -9
        assert gone.returncode == 0, gone.stdout + gone.stderr
        orthanc.process.popen.wait(timeout=30)
        restart_orthanc(orthanc)
        a.restart()
        cluster.wait_mesh(timeout=120)
        wait_until(lambda: orthanc.get("/instances") == [], 120, 1.0,
                   "the Orthanc holds nothing of the deleted study")
        for p in (a, b, c):
            wait_until(lambda p=p: not copies(p, study), 120, 0.5, f"{p.name}: nothing left")
            rows, proc = findscu(p.port, p.ae_title, {"QueryRetrieveLevel": "STUDY",
                                                      "StudyInstanceUID": study})
            assert proc.returncode == 0 and rows == [], proc.stderr[-2000:]
        wait_until(lambda: len({get_json(p, "digest")["digest"] for p in (a, b, c)}) == 1,
                   120, 0.5, "every peer's catalog the same")
