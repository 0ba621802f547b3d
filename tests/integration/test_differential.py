"""The same data in a pacsp2p peer and in DCMTK's dcmqrscp, the same requests to both:
where DICOM leaves no choice, the peer answers as the reference archive does.

The data: one study of mixed SOP classes (an MR series of 3 sent in two associations,
an SR, a Presentation State and a Key Object Selection) and a CT kept in Implicit VR.
Each test sends one request to both archives with pynetdicom and compares:

* C-FIND asking Retrieve AE Title (0008,0054): dcmqrscp names itself, the AE where the
  match can be retrieved (PS3.4 C.4.1.1.3.2); the peer answered it empty.
* C-GET whose requestor proposes the MR storage class only: the same Pending counts
  and the same final Warning (0xB000) with the same Failed SOP Instance UID List
  (PS3.4 C.4.3.3.1); one in a transfer syntax the archive cannot make: 0xA702 and the
  instance listed.
* C-MOVE by SERIES and IMAGE level UID lists: the same counts, and every C-STORE
  sub-operation names the requestor as Move Originator with its Message ID
  (PS3.4 C.4.2.2, PS3.7 9.3.1.1).
* Association: every standard storage SOP class dcmqrscp accepts, the peer accepts
  (it took pynetdicom's 120 default contexts only: 51 standard classes refused).

The differences a differential review found legitimate are in docs/README.md
("Checked against the reference archives").
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import (AE, AllStoragePresentationContexts, StoragePresentationContexts,
                        build_context, build_role, evt)
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from pacsp2p.testing import LOOPBACK, Peer, datasets, free_port, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmqrscp import DcmQrScp

U = datasets.uid
STUDY, MR_SERIES = U("diff-study"), U("diff-mr")
MR = [U("diff-mr", i) for i in (1, 2, 3)]
OTHER = {"SR": ("1.2.840.10008.5.1.4.1.1.88.11", U("diff-sr")),       # Basic Text SR
         "PR": ("1.2.840.10008.5.1.4.1.1.11.1", U("diff-pr")),        # GSPS
         "KO": ("1.2.840.10008.5.1.4.1.1.88.59", U("diff-ko"))}       # Key Object Selection
CT_STUDY, CT_SERIES, CT_SOP = U("diff-ct-study"), U("diff-ct-series"), U("diff-ct")
DEST = "DIFFDEST"


def _non_image(modality: str, number: int) -> Dataset:
    sop_class, series = OTHER[modality]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, U(series, 1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.PatientName, ds.PatientID = "DIFF^MIXED", "DIFF1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20200202", "235900", "DIFFACC"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, number, 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, U(series, 1)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_data(directory: Path) -> list[list[Path]]:
    """The files, in the groups sent one association each."""
    first, second = directory / "first", directory / "second"
    for i, uid in enumerate(MR, 1):
        ds = datasets.make_image("MR", size=16, seed=3, PatientName="DIFF^MIXED",
                                 PatientID="DIFF1", StudyInstanceUID=STUDY,
                                 SeriesInstanceUID=MR_SERIES, SOPInstanceUID=uid,
                                 InstanceNumber=i, StudyDate="20200202", StudyTime="235900",
                                 AccessionNumber="DIFFACC")
        datasets.write(ds, (first if i < 3 else second) / f"mr{i}.dcm")
    for number, modality in enumerate(OTHER, 10):
        datasets.write(_non_image(modality, number), first / f"{modality}.dcm")
    ct = datasets.make_image("CT", size=16, seed=4, transfer_syntax=ImplicitVRLittleEndian,
                             PatientName="DIFF^IMPLICIT", PatientID="DIFF2",
                             StudyInstanceUID=CT_STUDY, SeriesInstanceUID=CT_SERIES,
                             SOPInstanceUID=CT_SOP)
    datasets.write(ct, second / "ct.dcm")
    return [sorted(first.glob("*.dcm")), sorted(second.glob("*.dcm"))]


@pytest.fixture(scope="module")
def dest_port():
    return free_port()


@pytest.fixture(scope="module")
def archives(tmp_path_factory, dest_port):
    """{"peer": (port, AE title), "dcmqrscp": (port, AE title)}, the same files stored
    into each by DCMTK storescu, two associations each."""
    groups = write_data(tmp_path_factory.mktemp("diff-data"))
    peer = Peer(tmp_path_factory.mktemp("diff-peer"), name="diff",
                destinations={DEST: f"{LOOPBACK}:{dest_port}"})
    qr = DcmQrScp(tmp_path_factory.mktemp("diff-dcmqr"), peers={DEST: (LOOPBACK, dest_port)})
    with peer, qr:
        for port, aet in ((peer.port, peer.ae_title), (qr.port, qr.ae_title)):
            for group in groups:
                storescu(port, aet, group)
        yield {"peer": (peer.port, peer.ae_title), "dcmqrscp": (qr.port, qr.ae_title)}
    print(f"peer log: {peer.log_path}")


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def _identifier(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def _counts(status) -> tuple:
    return (f"{status.Status:#06x}",) + tuple(
        status.get(f"NumberOf{n}Suboperations") for n in
        ("Remaining", "Completed", "Failed", "Warning"))


def find(where, level: str, **keys) -> list[Dataset]:
    with dn.association(*where, [build_context(FIND)], aet="DIFFSCU") as assoc:
        answers = list(assoc.send_c_find(_identifier(level, **keys), FIND))
    assert answers[-1][0].Status == 0x0000, answers[-1]
    return [ident for status, ident in answers if status.Status in (0xFF00, 0xFF01)]


def get(where, level: str, contexts, **keys) -> tuple[list, list[str], set[str]]:
    """(counts of every response, UIDs received, the final Failed SOP Instance UID
    List) of a C-GET whose requestor takes the storage *contexts* [(class, syntaxes)]."""
    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    cxs = [build_context(GET)] + [build_context(c, ts) for c, ts in contexts]
    roles = [build_role(sop_class, scp_role=True) for sop_class, _ in contexts]
    with dn.association(*where, cxs, aet="DIFFGET", ext_neg=roles,
                        evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        answers = list(assoc.send_c_get(_identifier(level, **keys), GET))
    final_ident = answers[-1][1]
    failed = set()
    if final_ident is not None and "FailedSOPInstanceUIDList" in final_ident:
        value = final_ident.FailedSOPInstanceUIDList
        failed = {value} if isinstance(value, str) else set(value)
    return [_counts(s) for s, _ in answers], received, failed


def test_retrieve_ae_title_names_the_archive_asked(archives):
    """Asked for Retrieve AE Title, dcmqrscp names itself at every level; the peer
    answered it empty, though the match can be retrieved from it (PS3.4 C.4.1.1.3.2:
    the AE 'from which the Instance may be retrieved on the network')."""
    queries = [("STUDY", {"StudyInstanceUID": STUDY}),
               ("SERIES", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": MR_SERIES}),
               ("IMAGE", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": MR_SERIES,
                          "SOPInstanceUID": MR[0]})]
    for level, keys in queries:
        for name, where in archives.items():
            answers = find(where, level, RetrieveAETitle="", **keys)
            assert [a.RetrieveAETitle for a in answers] == [where[1]], (name, level)


def test_cget_sub_operations_as_dcmqrscp(archives):
    """The study by C-GET from a requestor that takes MR only: 3 stored, the SR, PR and
    KO failed; every Pending's counts add up, the final response is 0xB000 listing the
    three, as dcmqrscp answers (only the order of the sub-operations may differ)."""
    outcome = {}
    for name, where in archives.items():
        counts, received, failed = get(
            where, "STUDY", [(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
            StudyInstanceUID=STUDY)
        assert sorted(received) == sorted(MR), name
        assert failed == {uid for _, uid in ((c, U(s, 1)) for c, s in OTHER.values())}, name
        for status, remaining, *done in counts[:-1]:
            assert status == "0xff00" and remaining + sum(done) == 6, (name, counts)
        outcome[name] = counts[-1]
    assert outcome["peer"] == outcome["dcmqrscp"] == ("0xb000", None, 3, 3, 0)


def test_cget_in_a_syntax_the_archive_cannot_make(archives):
    """A CT kept in Implicit VR asked for by a requestor that takes JPEG-LS only: no
    sub-operation can be made, 0xA702 and the instance listed failed, as dcmqrscp."""
    for name, where in archives.items():
        counts, received, failed = get(
            where, "IMAGE", [(CTImageStorage, [JPEGLSLossless])], StudyInstanceUID=CT_STUDY,
            SeriesInstanceUID=CT_SERIES, SOPInstanceUID=CT_SOP)
        assert (counts[-1], received, failed) == (("0xa702", None, 0, 1, 0), [], {CT_SOP}), name


@pytest.mark.parametrize("level, keys, expected", [
    ("SERIES", {"SeriesInstanceUID": f"{MR_SERIES}\\{OTHER['KO'][1]}"},
     set(MR) | {U(OTHER["KO"][1], 1)}),
    ("IMAGE", {"SeriesInstanceUID": MR_SERIES, "SOPInstanceUID": f"{MR[0]}\\{MR[2]}"},
     {MR[0], MR[2]}),
])
def test_cmove_of_uid_lists_names_the_move_originator(archives, dest_port, level, keys,
                                                     expected):
    """C-MOVE by a list of UIDs to a destination that takes every class: the instances
    listed, the same final counts as dcmqrscp, and each C-STORE sub-operation carries
    the requestor's AE title and Message ID as Move Originator."""
    stored = []

    def on_store(event):
        rq = event.request
        stored.append((rq.AffectedSOPInstanceUID, rq.MoveOriginatorApplicationEntityTitle,
                       rq.MoveOriginatorMessageID))
        return 0x0000

    scp = _ae(DEST)
    for sop_class in (MRImageStorage, *(c for c, _ in OTHER.values())):
        scp.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = scp.start_server((LOOPBACK, dest_port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    finals = {}
    try:
        for name, (port, aet) in archives.items():
            stored.clear()
            with dn.association(port, aet, [build_context(MOVE)], aet="DIFFMOVE") as assoc:
                answers = list(assoc.send_c_move(
                    _identifier(level, StudyInstanceUID=STUDY, **keys), DEST, MOVE,
                    msg_id=4321))
            assert {uid for uid, _, _ in stored} == expected, name
            assert {(ae_title, msg) for _, ae_title, msg in stored} == {("DIFFMOVE", 4321)}, name
            finals[name] = _counts(answers[-1][0])
    finally:
        server.shutdown()
    assert finals["peer"] == finals["dcmqrscp"] == ("0x0000", None, len(expected), 0, 0)


def _newer_storage_classes() -> list[str]:
    """Standard storage SOP classes pynetdicom knows beyond its 120 default contexts
    (Breast Projection X-Ray, Parametric Map, the radiation dose SRs, ...)."""
    default = {cx.abstract_syntax for cx in StoragePresentationContexts}
    return sorted({cx.abstract_syntax for cx in AllStoragePresentationContexts} - default)


def _accepted(where, classes) -> set[str]:
    """The storage SOP classes an archive accepts of *classes* (one association)."""
    ae = _ae("DIFFSTORE")
    for uid in classes:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian])
    assoc = ae.associate(LOOPBACK, where[0], ae_title=where[1])
    try:                        # pynetdicom aborts an association without any context
        return {cx.abstract_syntax for cx in assoc.accepted_contexts} \
            if assoc.is_established else set()
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def test_storage_classes_dcmqrscp_takes_are_taken(archives):
    """Every standard storage SOP class dcmqrscp accepts (51 of the 64 beyond
    pynetdicom's defaults with DCMTK 3.6.7) the facade accepts too, and keeps: it took
    pynetdicom's 120 default storage contexts only and refused e.g. Breast Projection
    X-Ray and the Patient Radiation Dose SR at association (no context accepted)."""
    accepted = {name: _accepted(where, _newer_storage_classes())
                for name, where in archives.items()}
    assert len(accepted["dcmqrscp"]) >= 40, accepted["dcmqrscp"]
    assert accepted["dcmqrscp"] - accepted["peer"] == set()
    default = [cx.abstract_syntax for cx in StoragePresentationContexts]
    assert _accepted(archives["peer"], default) == set(default)    # the retired ones too

    dose_sr = "1.2.840.10008.5.1.4.1.1.88.73"            # Patient Radiation Dose SR
    ds = _non_image("SR", 13)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = dose_sr
    ds.StudyInstanceUID, ds.SeriesInstanceUID = U("diff-dose-study"), U("diff-dose")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = U("diff-dose", 1)
    with dn.association(*archives["peer"], [build_context(dose_sr, ExplicitVRLittleEndian)],
                        aet="DIFFSTORE") as assoc:
        assert assoc.send_c_store(ds).Status == 0x0000
    answers = find(archives["peer"], "IMAGE", StudyInstanceUID=U("diff-dose-study"),
                   SeriesInstanceUID=U("diff-dose"), SOPInstanceUID="", SOPClassUID="")
    assert [(a.SOPInstanceUID, a.SOPClassUID) for a in answers] == \
        [(U("diff-dose", 1), dose_sr)]
