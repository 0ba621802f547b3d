"""Sequences nested hundreds deep, stored by a real client, then retrieved in another
transfer syntax from one real peer (eleventh hostile-input session).

A C-STORE of a few KB whose Content Sequence nests 300 deep (defined lengths, valid
DICOM) is kept as sent, as any other. A C-GET proposing only the other uncompressed
syntax makes the peer re-encode it (``part10.convert``: pydicom). Before, that grew the
peer by gigabytes a second (19 GB in 60 s, then the kernel's OOM killer; here it stops at
the address-space limit the test sets so the host is spared); now the sub-operation
fails at once (``nesting.MAX_DEPTH``), the rest of the C-GET is delivered, the peer stays
small and answers. 100 deep is still re-encoded and delivered.

Where pydicom reads a data set at store time (a header in an ISO 2022 character set, an
IOCM rejection note), sequences of undefined length 300 deep made its reader's recursion
fail, and the C-STORE was answered 0xA700 "out of resources" (a modality retries it for
ever) with an error line: now the first is refused 0xC000 (as the same data set in
another character set past the header walk's own bound), the second kept, its rejection
not acted on (a warning), 0x0000.
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from pacsp2p.dicom.header import read_meta
from pacsp2p.dicom.nesting import MAX_DEPTH
from pacsp2p.testing import LOOPBACK, Peer, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dcmtk
from pacsp2p.testing.fuzz import wire
from pacsp2p.testing.fuzz.cases import Case
from pacsp2p.testing.fuzz.watch import cap_address_space, status_kib
from pacsp2p.testing.fuzz.client import send_case
from pacsp2p.testing.iocm import KOS_SOP_CLASS

STUDY = datasets.uid("nesting-study")
HEADROOM = 3 << 30        # address space the peer may take past its size at start


def nested(depth: int) -> bytes:
    """(0040,A730) Content Sequences, one item each, *depth* deep, defined lengths
    (implicit VR little endian)."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HHI", 0x0040, 0xA730, len(item)) + item
    return inner


def deep_file(directory: Path, depth: int) -> Path:
    ds = datasets.make_image("CT", size=8, seed=depth, PatientID="NEST", PatientName="NEST",
                             StudyInstanceUID=STUDY, SOPInstanceUID=datasets.uid("nest", depth),
                             SeriesInstanceUID=datasets.uid("nesting-series"),
                             InstanceNumber=depth, transfer_syntax=ImplicitVRLittleEndian)
    path = datasets.write(ds, directory / f"{depth}.dcm")
    data = path.read_bytes()
    pixels = data.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    path.write_bytes(data[:pixels] + nested(depth) + data[pixels:])
    return path


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("nesting"), name="nesting") as p:
        cap_address_space(p.pid, HEADROOM)
        yield p


def test_a_deeply_nested_instance_fails_its_sub_operation_not_the_peer(peer, tmp_path):
    files = [deep_file(tmp_path, MAX_DEPTH), deep_file(tmp_path, 300)]
    storescu(peer.port, peer.ae_title, files)           # DCMTK keeps them, defined lengths
    held = {dn.sop_uid(p): dn.transfer_syntax(p) for p in dn.archive_files(peer.data_dir)}
    assert set(held) == {dn.sop_uid(p) for p in files}
    stored = set(held.values())
    assert len(stored) == 1
    other = (ExplicitVRLittleEndian if stored == {ImplicitVRLittleEndian}
             else ImplicitVRLittleEndian)

    received = []

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY
    before = status_kib(peer.pid, "VmHWM")
    with dn.association(peer.port, peer.ae_title,
                        [build_context(GET), build_context(CTImageStorage, [other])],
                        ext_neg=[role], evt_handlers=[(evt.EVT_C_STORE, on_store)],
                        timeout=300) as assoc:
        final = list(assoc.send_c_get(query, GET))[-1][0]
    grown = status_kib(peer.pid, "VmHWM") - before
    assert grown < 300 * 1024, f"the peer grew by {grown} KiB"
    assert final.Status == 0xB000, hex(final.Status)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert received == [datasets.uid("nest", MAX_DEPTH)]
    answered = dcmtk("echoscu", "-aec", peer.ae_title, "-to", "60", "-ta", "60", "-td", "60",
                     "127.0.0.1", peer.port)
    assert answered.returncode == 0, answered.stderr
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log


def undefined(depth: int, tag=(0x0040, 0xA730)) -> bytes:
    """Sequences of undefined length, one item each, *depth* deep (implicit VR)."""
    return (struct.pack("<HHI", *tag, 0xFFFFFFFF) +
            struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)) * depth + (
        struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * depth


def implicit(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def held(peer) -> set:
    """The SOP Instance UIDs the peer's archive holds (its own header walk: pydicom's
    reader cannot read them all)."""
    return {read_meta(p).sop_instance_uid for p in dn.archive_files(peer.data_dir)}


def raw_store(peer, sop_class: str, sop_instance: str, data: bytes) -> list:
    """The statuses of one C-STORE of the data set bytes *data*, as they are."""
    case = Case(0, "nesting", wait=120)
    case.send(wire.associate_rq(calling="NESTING", contexts=[(1, sop_class, [wire.IMPLICIT])]))
    case.steps.append(("recv", 60))
    case.send(wire.message(1, wire.c_store(1, sop_class, sop_instance), data))
    result = send_case(LOOPBACK, peer.port, case, io_timeout=120)
    return result.statuses


def test_an_iso_2022_header_nested_past_what_pydicom_reads_is_refused_not_retried(peer):
    ds = datasets.make_image("CT", size=8, seed=2022, PatientID="NEST2022",
                             StudyInstanceUID=datasets.uid("nesting-2022"),
                             transfer_syntax=ImplicitVRLittleEndian)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    data = implicit(ds)
    pixels = data.rindex(struct.pack("<HH", 0x7FE0, 0x0010))
    statuses = raw_store(peer, ds.SOPClassUID, ds.SOPInstanceUID,
                         data[:pixels] + undefined(300) + data[pixels:])
    assert statuses == [0xC000]
    assert ds.SOPInstanceUID not in held(peer)


def test_a_rejection_note_nested_past_what_pydicom_reads_is_kept_not_acted_on(peer):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = KOS_SOP_CLASS, datasets.uid("nesting-kos")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, datasets.uid("nesting-kos-series")
    ds.PatientID, ds.PatientName, ds.Modality = "NEST", "NEST", "KO"
    ds.SeriesNumber, ds.InstanceNumber, ds.ValueType = 99, 1, "CONTAINER"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113001", "DCM"
    code.CodeMeaning = "Rejected for Quality Reasons"
    ds.ConceptNameCodeSequence = Sequence([code])
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = datasets.uid("nest", "not held")
    series = Dataset()
    series.SeriesInstanceUID = datasets.uid("nesting-series")
    series.ReferencedSOPSequence = Sequence([ref])
    evidence = Dataset()
    evidence.StudyInstanceUID = STUDY
    evidence.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    data = implicit(ds) + undefined(300, (0x0088, 0x0200))     # after every other tag
    assert raw_store(peer, KOS_SOP_CLASS, ds.SOPInstanceUID, data) == [0x0000]
    assert ds.SOPInstanceUID in held(peer)
    log = peer.log_path.read_text(errors="replace")
    assert f"rejection note {ds.SOPInstanceUID} stored but not acted on" in log
    assert "Traceback" not in log and "Unhandled" not in log
