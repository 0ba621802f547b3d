"""Delete through vendor archives (issue 13, item 5), with a real peer and real archives.

- Orthanc (``orthanc`` adapter, capability ``delete``): ``pacsp2p delete --study``
  removes every instance of the study from Orthanc itself (REST DELETE; Orthanc's own
  REST API no longer finds them); C-FIND at the peer finds nothing; sending the study
  again through the peer stores it in Orthanc again.
- DCMTK dcmqrscp (``dimse`` adapter: DIMSE cannot delete): the study, joined from the
  archive by a crawl, is hidden from the view and listed in ``pacsp2p status`` as
  retained by that archive, which still holds the files; after a restart of the peer
  its change feed lists the study again (dated today) and it still does not come back.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Orthanc, Peer, findscu, storescu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.dcmqrscp import DcmQrScp
from pacsp2p.testing.ports import LOOPBACK

PACSP2P = Path(sys.executable).parent / "pacsp2p"


def images(peer: Peer, study: str) -> set[str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": ""},
        timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.SOPInstanceUID) for r in rows}


def delete(peer: Peer, study: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), "delete", "--config", str(peer.config_path),
                           "--study", study], capture_output=True, text=True, timeout=600)


def status_text(peer: Peer) -> str:
    return subprocess.run([str(PACSP2P), "status", "--config", str(peer.config_path)],
                          capture_output=True, text=True, timeout=120).stdout


def in_orthanc(orthanc: Orthanc, uids) -> set[str]:
    """Those of *uids* Orthanc holds (its own REST API, not the adapter)."""
    return {u for u in uids if any(r["Type"] == "Instance" for r in
                                   orthanc.post("/tools/lookup", u.encode()))}


def test_delete_through_an_orthanc_archive_removes_it_from_orthanc(tmp_path):
    files = datasets.make_study(tmp_path / "in", patient_id="ORTHDEL1", size=16,
                                series=[("CT", 6, ExplicitVRLittleEndian),
                                        ("MR", 3, ExplicitVRLittleEndian)])
    study, uids = dn.study_of(files), {dn.sop_uid(p) for p in files}
    with Orthanc(tmp_path / "orthanc") as orthanc:
        peer = Peer(tmp_path / "peer", config={"archives": [
            {"name": "pacs", "adapter": "orthanc", "url": orthanc.url}]})
        try:
            peer.start()
            storescu(peer.port, peer.ae_title, files)
            assert in_orthanc(orthanc, uids) == uids
            assert images(peer, study) == uids

            done = delete(peer, study)
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"deleted 9 instance(s) of study {study}" in done.stdout
            assert images(peer, study) == set()
            wait_until(lambda: not in_orthanc(orthanc, uids), 120, 0.5,
                       "Orthanc no longer holds the study")
            assert orthanc.get("/statistics")["CountInstances"] == 0
            deletions = get_json(peer)["deletions"]
            assert deletions["purge_pending"] == 0 and not deletions["retained"], deletions

            # the change feed (Orthanc's /changes) brings nothing back
            time.sleep(12)
            assert images(peer, study) == set()

            storescu(peer.port, peer.ae_title, files)       # sent again: stored again
            assert in_orthanc(orthanc, uids) == uids
            assert images(peer, study) == uids
        finally:
            peer.stop()


def test_a_dimse_archive_cannot_delete_the_instance_is_hidden_and_retained(tmp_path):
    today = time.strftime("%Y%m%d")
    files = datasets.make_study(tmp_path / "in", patient_id="DIMSEDEL1", size=16,
                                series=[("CT", 5, ExplicitVRLittleEndian)], StudyDate=today)
    study, uids = dn.study_of(files), {dn.sop_uid(p) for p in files}
    with DcmQrScp(tmp_path / "dcmqr", ae_title="DCMQR") as archive:
        storescu(archive.port, archive.ae_title, files)     # behind the cluster's back
        held = len(archive.files())
        assert held == 5
        peer = Peer(tmp_path / "peer", config={"archives": [
            {"name": "pacs", "adapter": "dimse", "ae_title": "DCMQR", "host": LOOPBACK,
             "port": archive.port}]})
        try:
            peer.start()
            wait_until(lambda: images(peer, study) == uids, 120, 0.5, "the crawl found it")

            done = delete(peer, study)
            assert done.returncode == 0, done.stdout + done.stderr
            assert images(peer, study) == set()
            wait_until(lambda: get_json(peer)["deletions"]["retained"] == {"pacs": 5}, 120,
                       0.5, "listed as retained by archive pacs")
            text = status_text(peer)
            assert "retained by archive pacs: 5 deleted instance(s)" in text, text
            assert len(archive.files()) == held          # DIMSE cannot delete: still there

            peer.restart()       # its change feed lists today's studies again: not back
            wait_until(lambda: get_json(peer)["crawls"][0]["follows"] >= 2, 120, 0.5,
                       "two rounds of the change feed since the restart")
            assert images(peer, study) == set()
            assert get_json(peer)["deletions"]["retained"] == {"pacs": 5}
            assert "new instance(s) found" not in peer.log_path.read_text()
        finally:
            peer.stop()

