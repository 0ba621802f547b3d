"""Two copies of one instance on two archives of the SAME peer, in a cluster (real peers:
separate `twistd pacsp2p` processes; real /usr/bin/storescu, TCP_NODELAY=1).

Placement puts two copies on one peer's archives whenever there are more copies than
live peers (``strategies.placement.distinct``). The writer's first local copy is kept by
the thread that wrote the file (``Forward``: the archive takes the received file); a
second local copy then opened the received path that was gone: "copy ... to spare@peera
failed: [Errno 2] No such file or directory: .../incoming/...", then "1 of the 2 copies
required could be made" (0xA700) — an instance the archives could take was refused.

- 2 peers, peera with two embedded archives, replicas = 3, write_quorum = 3: every
  instance stored at peera (and at peerb) is on the 3 archives, byte-identical;
- 3 peers, peerb and peerc stopped, peera with two archives, R = 2, W = 2: stored at
  peera on both its archives; when peerb and peerc return, hinted hand-off moves the
  stand-in copies to them: 2 copies each in the end, byte-identical;
- 2 peers, peera's second archive a real Orthanc, R = 3, W = 3: the same as the first;
- 2 peers, R = 3, W = 2, peera's spare archive down while peera stores: the copy owed
  there (a hint on the writer's own archive) is made once it answers again (before:
  hinted hand-off asked the overlay for a link to peera itself, "no link to peer peera"
  every 3 s, for ever).
"""
from __future__ import annotations

from collections import Counter

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, members, wait_until
from pacsp2p.testing.orthanc import Orthanc

N = 12
TWO = {"archives": [{"name": "local", "adapter": "embedded"},
                    {"name": "spare", "adapter": "embedded"}]}


def copies(peer, study: str) -> dict[str, set[tuple[str, str]]]:
    """{instance: {(peer, archive) of each available copy}} as *peer* lists them."""
    rows = get_json(peer, f"where?study={study}", timeout=30)
    return {r["instance"]: {(x["peer"], x["archive"]) for x in r["replicas"]
                            if x["available"]} for r in rows}


def store_all(peer, files) -> None:
    """storescu every file to *peer*: each one answered Success (else its log's end)."""
    proc = storescu(peer.port, peer.ae_title, files, extra=["-v"], timeout=600,
                    check=False)
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == len(files), \
        out[-2000:] + peer.log_path.read_text()[-3000:]


def not_said(peer) -> None:
    log = peer.log_path.read_text()
    for words in ("No such file or directory", "copies required could be made"):
        assert words not in log, [line for line in log.splitlines() if words in line][:3]


def on_disk(peer, archive: str, sent: dict) -> Counter:
    """Instances of *sent* the embedded *archive* of *peer* holds, each checked
    byte-identical."""
    held = Counter()
    for f in dn.archive_files(peer.data_dir, archive):
        if dn.sop_uid(f) not in sent:
            continue                          # another test's study
        assert dn.dataset_sha256(f) == sent[dn.sop_uid(f)], f
        held[dn.sop_uid(f)] += 1
    return held


def study(tmp_path, pid: str):
    files = datasets.make_study(tmp_path / pid, patient_id=pid, size=32,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    return files, dn.study_of(files), dn.dataset_hashes(files)


def test_three_copies_on_two_peers_one_with_two_archives(cluster, tmp_path):
    cluster.config = {"cluster": {"replicas": 3, "write_quorum": 3}}
    a, b = cluster.start(2, per_peer={"peera": TWO})
    cluster.wait_mesh()
    everywhere = {("peera", "local"), ("peera", "spare"), ("peerb", "local")}
    for writer, pid in ((a, "TWOLOC1"), (b, "TWOLOC2")):
        files, uid, sent = study(tmp_path, pid)
        store_all(writer, files)
        # a C-FIND or C-MOVE at the writer right after must find every copy it recorded
        wait_until(lambda: all(len(v) == N and all(s == everywhere for s in v.values())
                               for v in (copies(a, uid), copies(b, uid))), 60, 0.5,
                   f"stored at {writer.name}: every instance on the 3 archives, as both "
                   "peers list them")
        for p, arch in everywhere:
            held = on_disk(cluster[0] if p == "peera" else cluster[1], arch, sent)
            assert held == Counter({u: 1 for u in sent}), (p, arch, held)
    not_said(a)
    not_said(b)


def test_a_peer_whose_neighbours_are_down_keeps_both_copies_itself(cluster, tmp_path):
    a, b, c = cluster.start(3, per_peer={"peera": TWO})
    cluster.wait_mesh()
    for p in (b, c):
        p.stop()
    wait_until(lambda: {members(a).get(n) for n in ("peerb", "peerc")} == {"dead"}, 30,
               what="peera sees peerb and peerc dead")
    files, uid, sent = study(tmp_path, "TWOLOC3")
    store_all(a, files)
    both = {("peera", "local"), ("peera", "spare")}
    assert all(v == both for v in copies(a, uid).values()) and len(copies(a, uid)) == N
    assert on_disk(a, "local", sent) == on_disk(a, "spare", sent) == Counter(
        {u: 1 for u in sent})
    assert get_json(a)["catalog"]["hints"] > 0, "no copy owed to peerb or peerc"
    not_said(a)

    for p in (b, c):
        p.restart()
    cluster.wait_mesh(timeout=60)

    def moved():
        r = copies(a, uid)
        return len(r) == N and all(len(v) == 2 for v in r.values()) and \
            get_json(a)["catalog"]["hints"] == 0 and \
            any(p != "peera" for v in r.values() for p, _ in v)
    wait_until(moved, 120, 0.5, "stand-in copies handed off: 2 copies each, hints done")

    def files():
        return sum((on_disk(p, "local", sent) for p in (a, b, c)), Counter()) + \
            on_disk(a, "spare", sent)
    wait_until(lambda: files() == Counter({u: 2 for u in sent}), 60, 0.5,
               "2 files per instance on the disks, the stand-ins' removed")
    assert on_disk(b, "local", sent) or on_disk(c, "local", sent)


def test_the_second_archive_an_orthanc(cluster, tmp_path):
    with Orthanc(tmp_path / "orthanc", aet="SPARE") as orthanc:
        cluster.config = {"cluster": {"replicas": 3, "write_quorum": 3}}
        a, b = cluster.start(2, per_peer={"peera": {"archives": [
            {"name": "local", "adapter": "embedded"},
            {"name": "spare", "adapter": "orthanc", "url": orthanc.url}]}})
        cluster.wait_mesh()
        files, uid, sent = study(tmp_path, "TWOLOC4")
        store_all(a, files)
        everywhere = {("peera", "local"), ("peera", "spare"), ("peerb", "local")}
        wait_until(lambda: len(r := copies(a, uid)) == N and
                   all(s == everywhere for s in r.values()), 60, 0.5,
                   "every instance on the 3 archives")
        assert orthanc.get("/statistics")["CountInstances"] == N
        for p in (a, b):
            assert on_disk(p, "local", sent) == Counter({u: 1 for u in sent})
        not_said(a)


def test_a_copy_owed_to_the_writers_own_archive_is_made_when_it_is_back(cluster,
                                                                         tmp_path):
    """peera's spare archive is down while peera stores (R = 3 on 2 peers, W = 2): the
    copy placement wanted there is owed (a hint on peera's own archive); once the archive
    answers again hinted hand-off makes it, like any other peer's."""
    cluster.config = {"cluster": {"replicas": 3, "write_quorum": 2}}
    a, b = cluster.start(2, per_peer={"peera": TWO})
    cluster.wait_mesh()
    spare = a.data_dir / "archives" / "spare"
    away = spare.with_name("spare.away")
    spare.rename(away)                   # the embedded archive's root is gone: down
    wait_until(lambda: "archive spare stopped answering" in a.log_path.read_text(), 60,
               0.5, "peera's health loop sees spare down")
    files, uid, sent = study(tmp_path, "TWOLOC5")
    store_all(a, files)
    two = {("peera", "local"), ("peerb", "local")}
    wait_until(lambda: len(r := copies(a, uid)) == N and all(v == two for v in r.values()),
               60, 0.5, "every instance on local@peera and local@peerb")
    assert get_json(a)["catalog"]["hints"] > 0, "no copy owed to spare@peera"
    away.rename(spare)
    wait_until(lambda: "archive spare is back" in a.log_path.read_text(), 60, 0.5,
               "peera's health loop sees spare back")
    everywhere = two | {("peera", "spare")}
    wait_until(lambda: len(r := copies(a, uid)) == N and
               all(s == everywhere for s in r.values()) and
               get_json(a)["catalog"]["hints"] == 0, 120, 0.5,
               "every owed copy made on spare@peera, hints done")
    assert on_disk(a, "spare", sent) == Counter({u: 1 for u in sent})
