"""C-STORE data sets whose items and delimiters are where no sequence is, at a real peer
(sixteenth hostile-input session).

An item (FFFE,E000) or a sequence delimiter outside any sequence, an item delimiter or
an element straight in a sequence (outside its items), a value of undefined length that
is no sequence (an LT in Implicit VR, a UT in Explicit VR): at 1a343bf each was kept and
answered 0x0000 -- the header walk skipped what it did not expect -- while DCMTK reads
no further ("Invalid tag", "larger than remaining bytes"): DCMTK's storescp aborts the
association that sends one, and a C-GET, C-MOVE or replica of it to a DCMTK or Orthanc
node would fail. Now each is refused 0xC000 and nothing is kept; valid sequences of
undefined length (a private one in Implicit VR, an SQ with items) are kept. So is, since
3e18d84, a data set of odd length (PS3.5 7.1: values are of even length; DCMTK's
storescp aborts the association, "Odd Fragment Length"): kept 0x0000 before.
"""
from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import LOOPBACK, Peer, echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.fuzz import client, wire

STUDY = "1.2.826.0.1.3680043.10.1406.16.2"
UNDEFINED = 0xFFFFFFFF


def el(group: int, elem: int, value: bytes, length: int | None = None, vr: bytes | None = None):
    """An element: Implicit VR LE (no *vr*) or Explicit VR LE."""
    n = len(value) if length is None else length
    if vr is None:
        return struct.pack("<HHI", group, elem, n) + value
    if vr in (b"SQ", b"UT", b"UN", b"OB"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


ITEM, ITEM_END, SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)


def delim(tag, length: int = 0) -> bytes:
    return struct.pack("<HHI", *tag, length)


def base(sop: str, explicit: bool) -> bytes:
    """The attributes the catalog needs, then room for the case's elements at the end."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, sop, "CT"
    ds.PatientID, ds.PatientName = "MISPLACED", "MIS^PLACED"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, STUDY + ".1"
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, not explicit
    write_dataset(out, ds)
    return out.getvalue()


TEXT = (0x0040, 0xA160)           # Text Value (UT), in Content Sequence items
SEQ = (0x0040, 0xA730)            # Content Sequence

REFUSED = {       # name: (explicit VR?, the bytes after the base)
    "an item outside a sequence": (True, delim(ITEM, 0) + el(0x0040, 0xA160, b"after ",
                                                             vr=b"UT")),
    "a sequence delimiter outside a sequence": (True, delim(SEQ_END)),
    "an item delimiter in a sequence": (True, el(*SEQ, b"", UNDEFINED, b"SQ")
                                        + delim(ITEM_END) + delim(SEQ_END)),
    "an element in a sequence, outside its items": (
        True, el(*SEQ, b"", UNDEFINED, b"SQ") + el(*TEXT, b"loose ", vr=b"UT")
        + delim(SEQ_END)),
    "a UT of undefined length": (True, el(*TEXT, b"", UNDEFINED, b"UT") + delim(ITEM, 0)
                                 + delim(SEQ_END)),
    "an LT of undefined length (implicit VR)": (
        False, el(0x0040, 0xA160, b"", UNDEFINED) + delim(ITEM, UNDEFINED)
        + el(0x0008, 0x0100, b"T-1 ") + delim(ITEM_END) + delim(SEQ_END)),
    "a data set of odd length": (False, el(0x0040, 0xA160, b"odd")),
}
KEPT = {
    "an SQ of undefined length": (True, el(*SEQ, b"", UNDEFINED, b"SQ")
                                  + delim(ITEM, UNDEFINED) + el(*TEXT, b"inside", vr=b"UT")
                                  + delim(ITEM_END) + delim(SEQ_END)),
    "a private sequence of undefined length (implicit VR)": (
        False, el(0x0041, 0x0010, b"PACSP2P ") + el(0x0041, 0x1010, b"", UNDEFINED)
        + delim(ITEM, UNDEFINED) + el(0x0008, 0x0100, b"T-1 ") + delim(ITEM_END)
        + delim(SEQ_END)),
}


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("misplaced"), name="misplaced") as p:
        yield p


def store(peer, sop: str, explicit: bool, tail: bytes) -> list:
    return client.raw_store(LOOPBACK, peer.port, peer.ae_title, sop, base(sop, explicit) + tail,
                            "MISPLACED", wire.EXPLICIT if explicit else wire.IMPLICIT)


def held(peer) -> set:
    return {read_meta(p).sop_instance_uid for p in dn.archive_files(peer.data_dir)}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_misplaced_items_are_refused(peer, name):
    sop = f"{STUDY}.1.{sorted(REFUSED).index(name) + 1}"
    assert store(peer, sop, *REFUSED[name]) == [0xC000]
    assert sop not in held(peer)
    assert echo(peer.port, peer.ae_title)


@pytest.mark.parametrize("name", sorted(KEPT))
def test_sequences_of_undefined_length_are_kept(peer, name):
    sop = f"{STUDY}.2.{sorted(KEPT).index(name) + 1}"
    assert store(peer, sop, *KEPT[name]) == [0x0000]
    assert sop in held(peer)
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log
