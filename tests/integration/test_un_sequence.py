"""A C-STORE whose data set holds a sequence as VR UN of undefined length, at a real peer
(sixteenth hostile-input session).

PS3.5 6.2.2: a UN value of undefined length is a sequence whose items are encoded in
Implicit VR Little Endian, whatever the transfer syntax; it is what an Explicit VR
data set holds when a private sequence first received in Implicit VR passed through a
system that did not know its VR (dcm4che writes them so; DCMTK's dcmdump reads one as
a sequence). The header walk read the items in the transfer syntax's Explicit VR: at
1a343bf such a data set was refused 0xC000 ("an element runs past the end of the file").
Now it is kept as sent, returned byte-equal by a C-GET in its syntax, converted for one
in Implicit VR, and found by C-FIND.
"""
from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

from pacsp2p.testing import LOOPBACK, Peer, datasets, echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.fuzz import client

STUDY = "1.2.826.0.1.3680043.10.1406.16.1"
SOP = STUDY + ".1.1"


def implicit(group: int, elem: int, value: bytes) -> bytes:
    value += b" " * (len(value) % 2)
    return struct.pack("<HHI", group, elem, len(value)) + value


def un_sequence_data_set(sop: str) -> bytes:
    """Explicit VR LE: a private creator and (0009,1010) UN of undefined length holding
    one item (Code Value, Code Meaning) in Implicit VR LE."""
    a = Dataset()
    a.SOPClassUID, a.SOPInstanceUID, a.Modality = CTImageStorage, sop, "CT"
    b = Dataset()
    b.PatientID, b.PatientName = "UNSEQ", "UN^SEQUENCE"
    b.StudyInstanceUID, b.SeriesInstanceUID = STUDY, STUDY + ".1"
    creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"PACSP2P "
    items = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
             + implicit(0x0008, 0x0100, b"T-1") + implicit(0x0008, 0x0104, b"a code")
             + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
    un = (struct.pack("<HH2sHI", 0x0009, 0x1010, b"UN", 0, 0xFFFFFFFF) + items
          + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return datasets.explicit_le(a) + creator + un + datasets.explicit_le(b)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("unseq"), name="unseq") as peer:
        data = un_sequence_data_set(SOP)
        statuses = client.raw_store(LOOPBACK, peer.port, peer.ae_title, SOP, data, "UNSEQ")
        yield peer, data, statuses


def c_get(peer, syntax: str) -> list:
    """The data sets (raw bytes) a C-GET of the study delivers, on a CT context of
    *syntax* only."""
    got: list = []

    def on_store(e):
        got.append(e.request.DataSet.getvalue())
        return 0x0000
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", STUDY
    with dn.association(peer.port, peer.ae_title, [
            build_context(GET), build_context(CTImageStorage, [syntax])],
            ext_neg=[build_role(CTImageStorage, scp_role=True)],
            evt_handlers=[(evt.EVT_C_STORE, on_store)]) as a:
        final = list(a.send_c_get(query, GET))[-1][0]
    assert final.Status == 0x0000, hex(final.Status)
    return got


def test_a_un_sequence_of_undefined_length_is_kept(stored):
    peer, _, statuses = stored
    assert statuses == [0x0000], [hex(s) for s in statuses]
    assert echo(peer.port, peer.ae_title)
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log


def test_it_is_returned_byte_equal_and_converted(stored):
    peer, data, _ = stored
    assert c_get(peer, ExplicitVRLittleEndian) == [data]
    (converted,) = c_get(peer, ImplicitVRLittleEndian)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    ds = read_dataset(DicomBytesIO(converted), True, True)
    item = ds[0x0009, 0x1010].value[0]
    assert str(item.CodeValue) == "T-1" and str(ds.SOPInstanceUID) == SOP


def test_it_is_found(stored):
    peer, _, _ = stored
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID, query.PatientID = "STUDY", STUDY, ""
    with dn.association(peer.port, peer.ae_title, [build_context(FIND)]) as a:
        rows = [ds for status, ds in a.send_c_find(query, FIND)
                if status and status.Status in (0xFF00, 0xFF01)]
    assert [str(r.PatientID) for r in rows] == ["UNSEQ"]
