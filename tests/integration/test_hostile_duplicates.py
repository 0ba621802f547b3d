"""A C-STORE data set naming a catalog attribute twice, at a real peer (twelfth
hostile-input session).

A data set may list an element once, in ascending tag order (PS3.5 7.1). Readers differ
on one listed twice: DCMTK keeps the first ("found twice in one data set or item, ignoring
second entry"), pydicom and the peer's header walk the last. Before, a data set whose
SOP Instance UID A was followed, out of order, by another UID B was kept under B when the
command named B (0x0000), while every DCMTK tool, archive and workstation it was sent to
read it as A: an instance filed under another UID, maybe one of another patient's. Now a
data set holding a catalog attribute (the four UIDs, Patient ID, ...) twice at its top
level is refused 0xC000 and nothing kept; the same data set without the second copy is
kept. The stored file of the "before" case read by DCMTK's dcmdump shows A.
"""
from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import LOOPBACK, Peer, datasets, echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.fuzz import client

STUDY = "1.2.826.0.1.3680043.10.1406.12.99"


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("dups"), name="dups") as p:
        yield p


def data_set(sop: str, n: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, f"{STUDY}.{n}"
    ds.PatientID, ds.PatientName, ds.Modality = "DUPS", "DUP^LICATE", "CT"
    return datasets.explicit_le(ds)


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    value += (b"\0" if vr == b"UI" else b" ") * (len(value) % 2)
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def raw_store(peer, sop: str, data: bytes) -> list:
    return client.raw_store(LOOPBACK, peer.port, peer.ae_title, sop, data, "DUPS")


def held(peer) -> set:
    return {read_meta(p).sop_instance_uid for p in dn.archive_files(peer.data_dir)}


SECOND = {                     # a second copy of an element, appended out of order
    "SOP Instance UID": (0x0008, 0x0018, b"UI", "{sop}"),
    "Study Instance UID": (0x0020, 0x000D, b"UI", STUDY + ".2"),
    "Patient ID": (0x0010, 0x0020, b"LO", "OTHER"),
}


@pytest.mark.parametrize("name", sorted(SECOND))
def test_a_catalog_attribute_twice_is_refused(peer, name):
    n = sorted(SECOND).index(name) + 1
    first, sop = f"{STUDY}.{n}.1", f"{STUDY}.{n}.2"
    group, elem, vr, value = SECOND[name]
    own = first if name == "SOP Instance UID" else sop     # the data set's first UID
    data = data_set(own, n) + element(group, elem, vr, value.format(sop=sop).encode())
    assert raw_store(peer, sop, data) == [0xC000]
    assert not {first, sop} & held(peer)
    assert echo(peer.port, peer.ae_title)
    log = peer.log_path.read_text(errors="replace")
    assert "is in the data set twice" in log
    assert "Traceback" not in log and "Unhandled" not in log


def test_the_same_data_set_once_is_kept(peer):
    sop = f"{STUDY}.9.1"
    assert raw_store(peer, sop, data_set(sop, 9)) == [0x0000]
    assert sop in held(peer)
