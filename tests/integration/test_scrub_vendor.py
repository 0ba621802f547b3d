"""Scrub through vendor adapters (issue 13.3): ONE peer managing a real Orthanc and an
embedded archive (``replicas = write_quorum = 2``: a copy on each) scrubs the Orthanc
copies with Orthanc's own MD5 check and its files; bytes flipped in Orthanc's storage
and a file removed from it are found and the copies stored again from the embedded
archive, byte for byte; a DCMTK dcmqrscp archive (read over DIMSE only) is scrubbed by
sample, and a damaged copy there, which DIMSE cannot replace, is reported (exit 1).

Orthanc runs with its storage cache off (``MaximumStorageCacheSize`` = 0): with the
cache, a file it read recently is served from memory, and damage on disk shows only
once it leaves the cache (docs/cluster.md).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Orthanc, Peer, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dataset_sha256_of

PACSP2P = Path(sys.executable).parent / "pacsp2p"
N = 6


def scrub(peer) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), "scrub", "--config", str(peer.config_path)],
                          capture_output=True, text=True, timeout=600)


def summary(proc) -> str:
    return next((ln for ln in proc.stdout.splitlines() if ln.startswith("scrub: ")),
                proc.stdout + proc.stderr)


def stored_file(orthanc: Orthanc, oid: str) -> Path:
    uuid = orthanc.get(f"/instances/{oid}/attachments/dicom/info")["Uuid"]
    return next((orthanc.workdir / "storage").rglob(uuid))


@pytest.fixture
def world(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc", config={"MaximumStorageCacheSize": 0}).start()
    try:
        peer = Peer(tmp_path / "peer", config={
            "cluster": {"replicas": 2, "write_quorum": 2},
            "archives": [{"name": "vendor", "adapter": "orthanc", "url": orthanc.url},
                         {"name": "local", "adapter": "embedded"}]}).start()
        try:
            files = datasets.make_study(tmp_path / "study", patient_id="SCRUBV1", size=64,
                                        series=[("CT", N, ExplicitVRLittleEndian)])
            storescu(peer.port, peer.ae_title, files, timeout=120)
            yield peer, orthanc, dn.dataset_hashes(files)
        finally:
            peer.stop()
    finally:
        orthanc.stop()


def test_orthanc_copies_are_scrubbed_and_stored_again(world):
    peer, orthanc, sent = world
    ids = orthanc.instances()
    assert len(ids) == N
    proc = scrub(peer)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc) == f"scrub: {2 * N} copies checked, 0 damaged, 0 repaired, 0 missing"

    # flipped bytes in one Orthanc file, another file gone from Orthanc's storage
    damaged = stored_file(orthanc, ids[0])
    data = bytearray(damaged.read_bytes())
    data[-40] ^= 0xFF
    damaged.write_bytes(bytes(data))
    stored_file(orthanc, ids[1]).unlink()
    proc = scrub(peer)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc) == f"scrub: {2 * N} copies checked, 1 damaged, 2 repaired, 1 missing"
    # Orthanc holds every instance again, its data set as sent, its MD5 good
    now = orthanc.instances()
    assert len(now) == N
    for oid in now:
        orthanc.request("POST", f"/instances/{oid}/attachments/dicom/verify-md5", b"",
                        content_type="text/plain")
        body = orthanc.get(f"/instances/{oid}/file")
        uid = orthanc.get(f"/instances/{oid}")["MainDicomTags"]["SOPInstanceUID"]
        assert dataset_sha256_of(body) == sent[uid]
    log = peer.log_path.read_text()
    assert "on archive vendor is damaged" in log and "on archive vendor is missing" in log
    proc = scrub(peer)
    assert summary(proc).endswith(" 0 damaged, 0 repaired, 0 missing"), proc.stdout


def test_dimse_archive_is_scrubbed_by_sample_and_damage_there_is_reported(tmp_path):
    from pacsp2p.testing.dcmqrscp import DcmQrScp
    files = datasets.make_study(tmp_path / "study", patient_id="SCRUBV2", size=64,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    with DcmQrScp(tmp_path / "qr") as qr:
        with Peer(tmp_path / "peer", config={
                "cluster": {"replicas": 2, "write_quorum": 2, "scrub_sample": 1.0},
                "archives": [{"name": "pacs", "adapter": "dimse", "ae_title": qr.ae_title,
                              "host": "127.0.0.1", "port": qr.port},
                             {"name": "local", "adapter": "embedded"}]}) as peer:
            storescu(peer.port, peer.ae_title, files, timeout=120)
            proc = scrub(peer)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert summary(proc) == \
                f"scrub: {2 * N} copies checked, 0 damaged, 0 repaired, 0 missing"
            # damage dcmqrscp's copy of one instance (its file on disk)
            held = {dn.sop_uid(f): f for f in qr.files()}
            uid, path = sorted(held.items())[0]
            data = bytearray(path.read_bytes())
            data[-40] ^= 0xFF
            path.write_bytes(bytes(data))
            proc = scrub(peer)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert summary(proc) == \
                f"scrub: {2 * N} copies checked, 1 damaged, 0 repaired, 0 missing"
            assert uid in proc.stdout and "could NOT be repaired" in proc.stdout
            assert "archive pacs cannot replace a copy" in peer.log_path.read_text()
