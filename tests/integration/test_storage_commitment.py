"""Storage Commitment Push Model (PS3.4 annex J) on a real peer's facade, pynetdicom as
the modality: C-STOREs, then an N-ACTION for them and one never stored; the
N-EVENT-REPORT comes on the same association while the modality holds it open, else on
a new association to the modality's own SCP ([destinations]); hostile requests get a
failure status, never a traceback."""
from __future__ import annotations

import json
import queue
import time
from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacsp2p.testing import commitment as sc
from pacsp2p.testing import datasets, free_port
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.ports import LOOPBACK

SYNTAXES = sc.SYNTAXES
COMMIT_INSTANCE = sc.COMMIT_INSTANCE
_images, _request, _modality_ae, _report = sc.images, sc.request, sc.modality_ae, sc.report


@pytest.fixture
def modality_scp():
    """The modality's own SCP: (port, queue of (event type, data set, AE that sent))."""
    got: queue.Queue = queue.Queue()

    def on_report(event):
        got.put((*_report(event), event.assoc.requestor.ae_title))
        return 0x0000, None

    ae = AE(ae_title="MODALITY")
    ae.add_supported_context(StorageCommitmentPushModel, SYNTAXES, scu_role=True,
                             scp_role=True)
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    yield port, got
    server.shutdown()


def _store_and_commit(peer, images, extra_ref, keep_open: bool, extra=()):
    """C-STORE *images*, N-ACTION for them, *extra_ref* and the *extra* refs;
    (N-ACTION status, the report heard on this association if *keep_open*)."""
    heard: queue.Queue = queue.Queue()

    def on_report(event):
        heard.put(_report(event))
        return 0x0000, None

    ae = _modality_ae()
    assoc = ae.associate(LOOPBACK, peer.port, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, dn._nodelay),
                                       (evt.EVT_N_EVENT_REPORT, on_report)])
    assert assoc.is_established
    try:
        for ds in images:
            assert assoc.send_c_store(ds).Status == 0
        refs = [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in images] + [extra_ref,
                                                                          *extra]
        status, _ = assoc.send_n_action(_request(refs), 1, StorageCommitmentPushModel,
                                        COMMIT_INSTANCE)
        report = heard.get(timeout=patience(60)) if keep_open else None
    finally:
        assoc.release()
    return status.Status, report


def _check(report, images, unknown, also=()):
    event_type, ds = report
    assert event_type == 2
    assert sorted(i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence) == \
        sorted(d.SOPInstanceUID for d in images)
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in ds.FailedSOPSequence] \
        == [(unknown, 0x0112), *also]


def _delivered(peer, ae: str) -> None:
    """Wait for the peer to say it delivered a report to *ae* (its response read)."""
    deadline = time.monotonic() + patience(60)
    while f"report delivered to '{ae}'" not in (text := peer.log_path.read_text()):
        assert "not delivered" not in text, text[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_report_on_a_new_association(make_peer, modality_scp):
    port, got = modality_scp
    peer = make_peer(destinations={"MODALITY": f"{LOOPBACK}:{port}"},
                     config={"facade": {"commitment_wait": 3}})
    images = _images(3, "new")
    unknown = datasets.uid("sc-never-stored", 1)
    status, _ = _store_and_commit(peer, images, (CTImageStorage, unknown), keep_open=False)
    assert status == 0
    event_type, ds, sender = got.get(timeout=patience(90))
    assert sender == peer.ae_title
    _check((event_type, ds), images, unknown)
    _delivered(peer, "MODALITY")         # the N-EVENT-REPORT-RSP read


def test_report_on_the_same_association(make_peer, modality_scp):
    port, got = modality_scp
    peer = make_peer(destinations={"MODALITY": f"{LOOPBACK}:{port}"},
                     config={"facade": {"commitment_wait": 3}})
    images = _images(2, "same")
    unknown = datasets.uid("sc-never-stored", 2)
    wrong_class = ("1.2.840.10008.5.1.4.1.1.4", images[0].SOPInstanceUID)   # MR, held as CT
    status, report = _store_and_commit(peer, images, (CTImageStorage, unknown),
                                       keep_open=True, extra=[wrong_class])
    assert status == 0
    _check(report, images, unknown, [(images[0].SOPInstanceUID, 0x0119)])
    assert got.empty()                  # not sent again on a new association


def _raw_action(assoc, data: bytes, instance=COMMIT_INSTANCE, action=1,
                sop_class=StorageCommitmentPushModel, context=StorageCommitmentPushModel):
    req = N_ACTION()
    req.MessageID = 7
    req.RequestedSOPClassUID = sop_class
    req.RequestedSOPInstanceUID = instance
    req.ActionTypeID = action
    req.ActionInformation = BytesIO(data)
    cid = next(cx.context_id for cx in assoc.accepted_contexts
               if cx.abstract_syntax == context)
    return dn.send_request(assoc, req, cid)


def _encoded(ds: Dataset) -> bytes:
    from pynetdicom.dsutils import encode
    return encode(ds, False, True)       # explicit VR little endian (accepted first)


def test_hostile_requests_get_a_failure_status(make_peer):
    peer = make_peer(destinations={"MODALITY": f"{LOOPBACK}:9"},
                     config={"facade": {"commitment_wait": 0}})
    good = (CTImageStorage, datasets.uid("sc-hostile", 1))
    many = [(CTImageStorage, f"1.2.3.{i}") for i in range(10_001)]
    cases = [
        (b"\x08\x00\x95\x11UI\x40\x00abc", 0x0110),                 # cut short
        (_encoded(_request([good], transaction="1.2.03.4")), 0x0110),   # bad UID
        (_encoded(_request([(CTImageStorage, "1.2.x")])), 0x0110),
        (_encoded(_request(many)), 0x0110),                          # 10,001 items
        (b"\x08\x00\x99\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff", 0x0110),  # torn item
    ]
    ae = _modality_ae()
    assoc = ae.associate(LOOPBACK, peer.port, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, dn._nodelay)])
    assert assoc.is_established
    try:
        for data, status in cases:
            assert _raw_action(assoc, data) == [status], data[:40]
        assert _raw_action(assoc, _encoded(_request([good])), instance="1.2.3.4") == \
            [0x0112]
        assert _raw_action(assoc, _encoded(_request([good])), action=2) == [0x0123]
        assert _raw_action(assoc, _encoded(_request([good])), context=CTImageStorage) == \
            [0x0122]                  # (on the CT storage context)
        assert _raw_action(assoc, _encoded(_request([good])), sop_class=CTImageStorage) \
            == [0x0122]
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    # 10,000 instances of 64-character UIDs (1.6 MB, past the 1 MiB of an identifier):
    # taken, all 10,000 reported failed (never stored)
    longest = [(CTImageStorage, f"1.2.{10 ** 59 + i}") for i in range(10_000)]
    assoc = _modality_ae().associate(LOOPBACK, peer.port, ae_title=peer.ae_title)
    try:
        status, _ = assoc.send_n_action(_request(longest), 1, StorageCommitmentPushModel,
                                        COMMIT_INSTANCE)
        assert status.Status == 0
    finally:
        assoc.release()
    # a modality the peer has no address for: refused at N-ACTION time (as dcm4chee)
    stranger = _modality_ae()
    stranger.ae_title = "STRANGER"
    assoc = stranger.associate(LOOPBACK, peer.port, ae_title=peer.ae_title)
    try:
        status, _ = assoc.send_n_action(_request([good]), 1, StorageCommitmentPushModel,
                                        COMMIT_INSTANCE)
        assert status.Status == 0x0110
    finally:
        assoc.release()
    deadline = time.monotonic() + patience(60)
    while "from 'MODALITY': 0 committed, 10000 failed" not in peer.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "Traceback" not in peer.log_path.read_text()


def test_orthanc_store_job_with_storage_commitment(make_orthanc, make_peer, tmp_path):
    """Orthanc 1.10 sends to pacsp2p with "StorageCommitment": true: the job succeeds
    and Orthanc's report says every instance committed (before: the job failed, the
    commitment context refused)."""
    orthanc = make_orthanc()
    peer = make_peer(destinations={orthanc.aet: f"{LOOPBACK}:{orthanc.dicom_port}"},
                     config={"facade": {"commitment_wait": 5}})
    orthanc.request("PUT", "/modalities/pacs", json.dumps(
        {"AET": peer.ae_title, "Host": LOOPBACK, "Port": peer.port}).encode())
    ids = [orthanc.upload(datasets.write(ds, tmp_path / f"o{i}.dcm"))["ID"]
           for i, ds in enumerate(_images(3, "orthanc"))]
    job = orthanc.post("/modalities/pacs/store", {
        "Resources": ids, "StorageCommitment": True, "Synchronous": False})["ID"]
    deadline = time.monotonic() + patience(120)
    while (state := orthanc.get(f"/jobs/{job}"))["State"] not in ("Success", "Failure"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["State"] == "Success", state
    tx = state["Content"].get("StorageCommitmentTransactionUID")
    assert tx, state
    while (report := orthanc.get(f"/storage-commitment/{tx}"))["Status"] == "Pending":
        assert time.monotonic() < deadline, report
        time.sleep(0.2)
    assert report["Status"] == "Success", report
    assert len(report["Success"]) == 3 and not report["Failures"], report
    _delivered(peer, orthanc.aet)


def test_a_report_that_cannot_be_delivered_is_logged_and_audited(make_peer):
    """The modality left and nothing listens at its address: one log line, one audit
    record, the peer serves on."""
    peer = make_peer(destinations={"MODALITY": f"{LOOPBACK}:{free_port()}"},
                     config={"facade": {"commitment_wait": 2}})
    unknown = datasets.uid("sc-never-stored", 3)
    status, _ = _store_and_commit(peer, [], (CTImageStorage, unknown), keep_open=False)
    assert status == 0
    deadline = time.monotonic() + patience(60)
    while "report to 'MODALITY' not delivered" not in peer.log_path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    audit_log = peer.data_dir / "audit.log"
    while "storage commitment report not delivered to MODALITY" not in (
            audit_log.read_text() if audit_log.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "Traceback" not in peer.log_path.read_text()


def test_requests_waiting_are_bounded(make_peer):
    """32 requests being decided at once (instances never stored, waited for): the 33rd
    is refused 0x0213 (Resource limitation, as dcm4chee), not kept."""
    peer = make_peer(destinations={"MODALITY": f"{LOOPBACK}:{free_port()}"},
                     config={"facade": {"commitment_wait": 60}})
    ref = (CTImageStorage, datasets.uid("sc-never-stored", 4))
    assoc = _modality_ae().associate(LOOPBACK, peer.port, ae_title=peer.ae_title)
    try:
        statuses = [assoc.send_n_action(_request([ref]), 1, StorageCommitmentPushModel,
                                        COMMIT_INSTANCE)[0].Status for _ in range(33)]
    finally:
        assoc.abort()
    assert statuses == [0] * 32 + [0x0213]
