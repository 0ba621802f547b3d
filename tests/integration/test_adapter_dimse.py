"""The ``dimse`` adapter against REAL archives: DCMTK dcmqrscp and Orthanc, DIMSE only.

A peer whose only archive is a dimse adapter pointing at the archive: what a modality
stores through the peer lands in the archive byte-identical, is found and moved back
byte-identical (fetched by C-GET from the archive); the archive's health is followed
(down, logged, no crash; back). Join: content preloaded behind the cluster's back is
crawled into the catalog, and a restart in mid-crawl resumes. Two archives of different
vendors holding one study are two replicas of each instance and both serve a retrieval.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from pacsp2p.testing import Orthanc, Peer, StoreSCP, dataset_sha256, findscu, storescu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, wait_until
from pacsp2p.testing.dcmqrscp import DcmQrScp
from pacsp2p.testing.dcmtk import dcmtk, echo
from pacsp2p.testing.ports import LOOPBACK
from pacsp2p.testing.procs import Process

SERIES = (("CT", 3, ExplicitVRLittleEndian), ("MR", 2, ImplicitVRLittleEndian))


def status(peer: Peer, what: str = "status") -> dict:
    with urllib.request.urlopen(f"{peer.admin_url}/{what}", timeout=10) as r:
        return json.load(r)


class Archive:
    """A started real archive of one kind, seen through DIMSE."""

    def __init__(self, kind: str, workdir: Path, peers: dict):
        self.kind = kind
        if kind == "dcmqrscp":
            self.server = DcmQrScp(workdir, ae_title="DCMQR",
                                   peers={ae: (LOOPBACK, port) for ae, port in peers.items()})
        else:
            self.server = Orthanc(workdir, aet="ORTHANC", modalities={
                ae: [ae, LOOPBACK, port] for ae, port in peers.items()})

    def start(self):
        self.server.start()
        return self

    @property
    def ae_title(self):
        return self.server.ae_title if self.kind == "dcmqrscp" else self.server.aet

    @property
    def port(self):
        return self.server.port if self.kind == "dcmqrscp" else self.server.dicom_port

    def block(self, name="pacs", **extra):
        return {"name": name, "adapter": "dimse", "ae_title": self.ae_title,
                "host": LOOPBACK, "port": self.port, **extra}

    def preload(self, paths):
        storescu(self.port, self.ae_title, paths)

    def hashes(self) -> dict:
        """{SOP Instance UID: dataset sha256} of what the archive keeps."""
        if self.kind == "dcmqrscp":
            return dn.dataset_hashes(self.server.files())
        out = {}
        for oid in self.server.get("/instances"):
            data = self.server.request("GET", f"/instances/{oid}/file")
            path = self.server.workdir / "dl.dcm"
            path.write_bytes(data if isinstance(data, bytes) else data.read())
            out[dn.sop_uid(path)] = dataset_sha256(path)
        return out

    def stop(self):
        self.server.stop()

    def restart_same_ports(self):
        if self.kind == "dcmqrscp":
            self.server.start()
        else:                       # same config file: same ports, same storage
            o = self.server
            o.process = Process([o.process.argv[0], o.config_path], o.log_path).start()
            o._wait_ready()


@pytest.fixture(params=["dcmqrscp", "orthanc"])
def kind(request):
    return request.param


def test_a_compressed_syntax_is_kept_only_where_the_archive_takes_it(tmp_path, kind):
    """dcmsend offers an RLE file in RLE and, as it can decompress, uncompressed: the
    facade takes RLE. A DCMTK dcmqrscp with its defaults takes no compressed syntax: the
    adapter sends it decompressed (same content) instead of being refused; Orthanc keeps
    RLE."""
    files = datasets.make_study(tmp_path / "in", series=(("CT", 2, ExplicitVRLittleEndian),),
                                size=64, patient_id="DIMSE02", seed=9)
    rle = []
    for f in files:
        rle.append(tmp_path / "rle" / f.name)
        rle[-1].parent.mkdir(exist_ok=True)
        dcmtk("dcmcrle", f, rle[-1], check=True)
    peer = Peer(tmp_path / "peer")
    archive = Archive(kind, tmp_path / kind, {}).start()
    try:
        peer.overrides = {"archives": [archive.block()]}
        peer.start()
        proc = dcmtk("dcmsend", "-v", "-aec", peer.ae_title, LOOPBACK, peer.port, *rle,
                     timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        held = archive.hashes()
        assert sorted(held) == sorted(dn.by_sop_uid(rle)), proc.stdout + proc.stderr
        if kind == "orthanc":
            assert held == dn.dataset_hashes(rle)          # RLE, byte-identical
        else:
            assert {dn.transfer_syntax(f) for f in archive.server.files()} == {
                ExplicitVRLittleEndian}
            for uid, path in dn.by_sop_uid(archive.server.files()).items():
                assert dn.content_differences(dn.by_sop_uid(rle)[uid], path) == []
    finally:
        peer.stop()
        archive.stop()


def test_store_find_move_health(tmp_path, kind):
    files = datasets.make_study(tmp_path / "in", series=SERIES, size=64,
                                patient_id="DIMSE01", seed=7)
    want = dn.dataset_hashes(files)
    with StoreSCP(tmp_path / "out", ae_title="STORESCP") as scp:
        peer = Peer(tmp_path / "peer", destinations={"STORESCP": scp.address})
        archive = Archive(kind, tmp_path / kind, {}).start()
        try:
            peer.overrides = {"archives": [archive.block()]}
            peer.start()
            dn.store_unconverted(peer.port, peer.ae_title, files)
            # in the archive, byte-identical
            assert archive.hashes() == want
            # found through the peer
            rows, _ = findscu(peer.port, peer.ae_title, {
                "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "",
                "SOPInstanceUID": "", "PatientID": "DIMSE01"})
            assert {str(r.SOPInstanceUID) for r in rows} == set(want)
            # moved back through the peer (C-GET from the archive), byte-identical
            proc = dn.movescu(peer.port, peer.ae_title, "STORESCP", {
                "QueryRetrieveLevel": "STUDY", "PatientID": "DIMSE01",
                "StudyInstanceUID": str(datasets.uid("study", "DIMSE01", 7))})
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert dn.dataset_hashes(scp.files()) == want
            # health: up; archive stopped -> down, logged once, no crash; back -> up
            assert status(peer)["archives"]["pacs"]["up"] is True
            archive.stop()
            wait_until(lambda: "archive pacs stopped answering" in peer.log_path.read_text(),
                       30, what="down logged")
            assert status(peer)["archives"]["pacs"]["up"] is False
            assert peer.alive and echo(peer.port, peer.ae_title)     # no crash
            archive.restart_same_ports()
            wait_until(lambda: "archive pacs is back" in peer.log_path.read_text(), 30,
                       what="back logged")
            assert status(peer)["archives"]["pacs"]["up"] is True
            assert peer.log_path.read_text().count("archive pacs stopped answering") == 1
        finally:
            peer.stop()
            archive.stop()


def test_join_crawl_resumes_after_restart(tmp_path, kind):
    files = []
    for i in range(8):
        files += datasets.make_study(tmp_path / "in" / str(i), series=SERIES, size=16,
                                     patient_id=f"JOIN{i:02d}", seed=100 + i)
    want = {dn.sop_uid(p) for p in files}
    archive = Archive(kind, tmp_path / kind, {}).start()
    peer = Peer(tmp_path / "peer")
    try:
        archive.preload(files)
        peer.overrides = {"archives": [archive.block(crawl_qps=3)]}
        peer.start()
        wait_until(lambda: status(peer)["crawls"][0]["done"] >= 10, 60, what="crawl going")
        first = status(peer)["crawls"][0]
        assert not first["finished"]
        peer.restart()
        wait_until(lambda: status(peer)["crawls"][0]["done"] > 0, 20, what="state read")
        again = status(peer)["crawls"][0]
        assert again["done"] >= first["done"]            # resumed, not from 0
        wait_until(lambda: status(peer)["crawls"][0]["finished"], 120, what="crawl done")
        crawl = status(peer)["crawls"][0]
        assert crawl["done"] == len(want)                  # each instance once
        if kind == "orthanc":
            assert crawl["total"] == len(want)
        assert crawl["rate"] > 0
        rows, _ = findscu(peer.port, peer.ae_title, {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "", "SOPInstanceUID": ""})
        uids = [str(r.SOPInstanceUID) for r in rows]
        assert sorted(uids) == sorted(want)                # no duplicates
        assert "resuming after" in peer.log_path.read_text()
    finally:
        peer.stop()
        archive.stop()


def test_two_vendors_two_replicas(tmp_path):
    files = datasets.make_study(tmp_path / "in", series=(("CT", 6, ExplicitVRLittleEndian),
                                                         ("MR", 6, ExplicitVRLittleEndian)),
                                size=128, patient_id="TWOV", seed=9)
    study = str(datasets.uid("study", "TWOV", 9))
    want = dn.dataset_hashes(files)
    orthanc = Archive("orthanc", tmp_path / "orthanc", {}).start()
    dcmqr = Archive("dcmqrscp", tmp_path / "dcmqr", {}).start()
    cluster = Cluster(tmp_path / "cluster")
    with StoreSCP(tmp_path / "out", ae_title="STORESCP") as scp:
        cluster.destinations = {"STORESCP": scp.address}
        try:
            orthanc.preload(files)
            dcmqr.preload(files)
            cluster.config = {"archives": [orthanc.block("orthanc")]}
            a = cluster.add("peera")
            cluster.config = {"archives": [dcmqr.block("dcmqr")]}
            cluster.add("peerb")
            cluster.wait_mesh()

            def two_replicas():
                rows = status(a, f"where?study={study}")
                return len(rows) == len(want) and all(
                    {loc["archive"] for loc in r["replicas"]} == {"orthanc", "dcmqr"}
                    for r in rows)
            wait_until(two_replicas, 90, interval=0.5, what="two replicas of every instance")
            proc = dn.movescu(a.port, a.ae_title, "STORESCP", {
                "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert dn.dataset_hashes(scp.files()) == want
            retrievals = status(a)["retrievals"]
            assert retrievals, "no retrieval in status"
            sources = retrievals[-1]["sources"]
            # both archives' peers were sources of the retrieval; which one served how
            # many is the balancer's choice (a slow first C-GET may leave one with none)
            assert {s["peer"] for s in sources.values()} == {"peera", "peerb"}, sources
            assert all(s["alive"] and not s["failed"] for s in sources.values()), sources
            assert sum(s["completed"] for s in sources.values()) == len(want), sources
        finally:
            cluster.stop()
            orthanc.stop()
            dcmqr.stop()


def rle_study(tmp_path: Path, patient_id: str, seed: int):
    """(RLE files made by dcmcrle of a 5-instance CT/MR study, its Study Instance UID,
    {SOP Instance UID: decoded pixel array})."""
    src = datasets.make_study(tmp_path / "in", series=(("CT", 3, ExplicitVRLittleEndian),
                                                       ("MR", 2, ExplicitVRLittleEndian)),
                              size=64, patient_id=patient_id, seed=seed)
    rle = []
    for f in src:
        rle.append(tmp_path / "rle" / f"{len(rle)}.dcm")
        rle[-1].parent.mkdir(exist_ok=True)
        dcmtk("dcmcrle", f, rle[-1], check=True)
    assert {dn.transfer_syntax(f) for f in rle} == {RLELossless}
    want = {uid: dcmread(p).pixel_array for uid, p in dn.by_sop_uid(rle).items()}
    return rle, str(datasets.uid("study", patient_id, seed)), want


def store_rle(peer: Peer, rle) -> None:
    """storescu -R -xr +C: one context per SOP class proposing RLE and the uncompressed
    syntaxes (the facade takes RLE); every C-STORE must succeed."""
    proc = storescu(peer.port, peer.ae_title, rle, extra=["+C", "-v"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("Received Store Response (Success)") == len(rle), out


def two_copies(peer: Peer, study: str, n: int) -> bool:
    """*peer* lists *n* instances of *study*, each on peera's embedded archive and on
    peerb's dcmqrscp."""
    rows = status(peer, f"where?study={study}")
    return len(rows) == n and all(
        {(r["peer"], r["archive"]) for r in row["replicas"]} ==
        {("peera", "local"), ("peerb", "dcmqr")} for row in rows)


def assert_converted(dcmqr: Archive, rle) -> None:
    """dcmqrscp holds each instance of *rle* uncompressed, with the same content."""
    held = dn.by_sop_uid(dcmqr.server.files())
    assert sorted(held) == sorted(dn.by_sop_uid(rle))
    assert {dn.transfer_syntax(p) for p in held.values()} <= {
        ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    for uid, path in held.items():
        assert dn.content_differences(dn.by_sop_uid(rle)[uid], path) == []


def assert_pixels(files, want: dict) -> None:
    """*files* are the instances of *want* ({uid: pixel array}), each with its pixels."""
    served = dn.by_sop_uid(files)
    assert sorted(served) == sorted(want)
    for uid, path in served.items():
        assert (dcmread(path).pixel_array == want[uid]).all(), uid


def got_by_cget(peer: Peer, outdir: Path, study: str, want: dict) -> None:
    """getscu of *study* from *peer* brings each instance of *want* with its pixels."""
    got = dn.getscu(peer.port, peer.ae_title, outdir, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
    assert got.returncode == 0, got.stdout + got.stderr
    assert_pixels(outdir.iterdir(), want)


def test_a_compressed_instance_reaches_an_archive_taking_only_uncompressed(tmp_path):
    """Peer A keeps what a modality sends in RLE (embedded archive); its replica goes to
    peer B, whose archive is a DCMTK dcmqrscp with its default config: no compressed
    syntax accepted. The dimse adapter sends it decompressed, as dcmsend does, and
    records the hash of what dcmqrscp holds: every C-STORE succeeds with both copies
    (before: B's copy refused, 1 of 2 copies, 0xA700), a second sending is a duplicate
    on B (not a conflict), and with A stopped (and B restarted) B serves each instance by
    C-GET and C-MOVE with the same pixel data."""
    rle, study, want = rle_study(tmp_path, "CONV01", 11)
    dcmqr = Archive("dcmqrscp", tmp_path / "dcmqr", {}).start()
    cluster = Cluster(tmp_path / "cluster")
    with StoreSCP(tmp_path / "out", ae_title="STORESCP") as scp:
        cluster.destinations = {"STORESCP": scp.address}
        try:
            a = cluster.add("peera")                       # embedded archive "local"
            cluster.config = {"archives": [dcmqr.block("dcmqr")]}
            b = cluster.add("peerb")
            cluster.wait_mesh()
            store_rle(a, rle)
            store_rle(a, rle)                              # again: duplicates
            assert_converted(dcmqr, rle)
            wait_until(lambda: two_copies(a, study, len(want)) and two_copies(
                b, study, len(want)), 60, interval=0.5, what="two copies of every instance")
            assert status(b)["catalog"]["conflicts"] == 0
            assert "already holds other bytes" not in b.log_path.read_text()
            a.stop()
            b.restart()        # B's adapter forgets where and how it stored them: the
            # catalog says RLE, the C-GET proposes RLE and uncompressed: dcmqrscp's bytes
            got_by_cget(b, tmp_path / "got", study, want)
            proc = dn.movescu(b.port, b.ae_title, "STORESCP", {
                "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert_pixels(scp.files(), want)
        finally:
            cluster.stop()
            dcmqr.stop()


def test_a_hinted_copy_reaches_an_archive_taking_only_uncompressed(tmp_path):
    """Peer A alone (W=1) keeps 5 RLE instances, one copy each, owing the second; peer B
    joins with a default dcmqrscp: hinted hand-off copies each there, decompressed by
    B's adapter (before: refused for ever, the hints stayed). A damaged copy on A is
    replaced by scrub from B's converted one, and B's copy of each serves a C-GET from
    A, whose own files are gone, with the same pixel data."""
    rle, study, want = rle_study(tmp_path, "CONV02", 12)
    dcmqr = Archive("dcmqrscp", tmp_path / "dcmqr", {}).start()
    cluster = Cluster(tmp_path / "cluster", config={"cluster": {"write_quorum": 1}})
    try:
        a = cluster.add("peera")
        store_rle(a, rle)
        assert status(a)["catalog"]["hints"] == len(want)
        cluster.config = {**cluster.config, "archives": [dcmqr.block("dcmqr")]}
        b = cluster.add("peerb")
        cluster.wait_mesh()
        wait_until(lambda: two_copies(a, study, len(want)) and two_copies(
            b, study, len(want)) and status(a)["catalog"]["hints"] == 0, 90, interval=0.5,
            what="the copy owed of every instance made on peerb's dcmqrscp")
        assert_converted(dcmqr, rle)
        assert status(b)["catalog"]["conflicts"] == 0
        # a damaged copy on peera is replaced from the only other replica, dcmqrscp's
        # converted one: peera then keeps it uncompressed, under its hash (before: 'no
        # other replica', unrepaired for ever)
        path = dn.archive_files(a.data_dir)[0]
        path.write_bytes(path.read_bytes()[:-8] + bytes(8))
        for damaged in (1, 0):                 # the second pass finds the new hash right
            proc = subprocess.run([str(Path(sys.executable).parent / "pacsp2p"), "scrub",
                                   "--config", str(a.config_path)], capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            # (the copy recorded anew in the pass is checked once more: 6 of 5 then)
            assert f" copies checked, {damaged} damaged, {damaged} repaired, 0 missing" \
                in proc.stdout, proc.stdout + proc.stderr
        assert dn.transfer_syntax(path) == ExplicitVRLittleEndian
        assert dn.content_differences(dn.by_sop_uid(rle)[dn.sop_uid(path)], path) == []
        # only dcmqrscp's copies can serve (fetched from peerb, checked against the hash
        # of the converted copy): the files of peera's own copies are removed
        files = dn.archive_files(a.data_dir)
        assert sorted(dn.by_sop_uid(files)) == sorted(want)
        for f in files:
            f.unlink()
        got_by_cget(a, tmp_path / "got", study, want)
    finally:
        cluster.stop()
        dcmqr.stop()


def test_a_conversion_over_max_dataset_is_refused_before_decoding(tmp_path):
    """An RLE CT of 512x512 (265 KiB) decodes to 512 KiB more: with ``max_dataset`` 512
    KiB, the dimse adapter in front of a default dcmqrscp refuses to decompress it (the
    C-STORE fails naming max_dataset, nothing stays in incoming) while a 64x64 one is
    converted."""
    small, _, _ = rle_study(tmp_path / "small", "CONV03", 13)
    big = tmp_path / "big.dcm"
    src = datasets.make_study(tmp_path / "bigin", series=(("CT", 1, ExplicitVRLittleEndian),),
                              size=512, patient_id="CONV04", seed=14)
    dcmtk("dcmcrle", src[0], big, check=True)
    dcmqr = Archive("dcmqrscp", tmp_path / "dcmqr", {}).start()
    peer = Peer(tmp_path / "peer")
    try:
        peer.overrides = {"archives": [dcmqr.block("dcmqr", max_dataset=512 << 10)]}
        peer.start()
        store_rle(peer, small[:1])
        proc = storescu(peer.port, peer.ae_title, [big], extra=["+C", "-v"], check=False)
        assert "Received Store Response (Success)" not in proc.stdout + proc.stderr
        log = peer.log_path.read_text()
        assert "bytes once decompressed, over 524288 (max_dataset)" in log, log[-3000:]
        assert sorted(dn.by_sop_uid(dcmqr.server.files())) == sorted(dn.by_sop_uid(small[:1]))
        assert not list((peer.data_dir / "incoming").glob("converted-*"))
    finally:
        peer.stop()
        dcmqr.stop()
