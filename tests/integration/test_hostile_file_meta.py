"""A C-STORE data set that carries File Meta Information elements (group 0002), at a real
peer (twelfth hostile-input session).

Group 0002 belongs to the Part-10 file's meta header, never to a data set (PS3.10 7.1,
PS3.5 7.1). The facade writes its own file meta before the data set as received, so the
data set's group 0002 elements became part of the stored file's: before, an Explicit VR
data set starting with (0002,0003) naming another instance was kept (0x0000) and then
never retrievable (C-GET: "the stored file holds 9.9.9.9"), and with any other group
0002 element it was kept and sent back without them (not as sent). Now each is refused
0xC000 and nothing is kept; the same data set without them is kept and retrieved.
"""
from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import LOOPBACK, Peer, datasets, echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.fuzz import wire
from pacsp2p.testing.fuzz import client

STUDY = "1.2.826.0.1.3680043.10.1406.12.88"


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("filemeta"), name="filemeta") as p:
        yield p


def meta(elem: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element of group 0002."""
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def data_set(sop: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, STUDY + ".1"
    ds.PatientID, ds.PatientName, ds.Modality = "FILEMETA", "FILE^META", "CT"
    return datasets.explicit_le(ds)


def raw_store(peer, sop: str, data: bytes) -> list:
    return client.raw_store(LOOPBACK, peer.port, peer.ae_title, sop, data, "FILEMETA")


def held(peer) -> set:
    return {read_meta(p).sop_instance_uid for p in dn.archive_files(peer.data_dir)}


CASES = {
    "another instance's media UID": [(0x0003, b"UI", b"9.9.9.9")],
    "the same transfer syntax": [(0x0010, b"UI", wire.EXPLICIT.encode())],
    "a group length": [(0x0000, b"UL", struct.pack("<I", 0))],
    "a media SOP class and instance": [(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.4"),
                                       (0x0003, b"UI", b"{sop}")],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_data_set_with_file_meta_elements_is_refused(peer, name):
    sop = f"{STUDY}.1.{sorted(CASES).index(name) + 1}"
    head = b"".join(meta(e, vr, v.replace(b"{sop}", sop.encode()))
                    for e, vr, v in CASES[name])
    assert raw_store(peer, sop, head + data_set(sop)) == [0xC000]
    assert sop not in held(peer)
    assert echo(peer.port, peer.ae_title)
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log


def test_the_same_data_set_without_them_is_kept_and_retrieved(peer):
    sop = f"{STUDY}.1.99"
    assert raw_store(peer, sop, data_set(sop)) == [0x0000]
    got = []
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", STUDY
    with dn.association(peer.port, peer.ae_title, [
            build_context(GET), build_context(CTImageStorage, [ExplicitVRLittleEndian])],
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, lambda e: got.append(e.dataset) or 0)]) as a:
        final = list(a.send_c_get(query, GET))[-1][0]
    assert final.Status == 0x0000, hex(final.Status)
    assert [str(d.SOPInstanceUID) for d in got] == [sop]
