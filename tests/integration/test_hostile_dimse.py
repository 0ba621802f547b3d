"""Hostile DIMSE requests from real clients (pynetdicom, DCMTK) against one real peer,
where the fuzzer (``test_fuzz.py``) does not look: each test names what broke before.

- A C-STORE whose catalog attribute (Patient Name, ...) is longer than
  ``validate.VALUE_MAX`` (1024) characters is refused 0xC000 and not kept. Before it was
  kept: a 70 MB Patient Name (implicit VR) grew the catalog by 440 MB, and in a cluster
  every sync answer of its peer was past the 64 MB bound, so the other peers' catalog
  sync from it stopped for good (``sync from peera stopped: an answer over 67108864
  bytes`` every 3 s). 1024 characters are still kept.
- A C-FIND with a list of 1,000 values or more (a RIS asking for 2,000 accession numbers)
  finds what it names; before, 0xC001 (SQLite: 'Expression tree is too large').
"""
from __future__ import annotations

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from pacsp2p.testing import Peer, datasets, findscu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.validate import VALUE_MAX


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("hostile-dimse"), name="hostile") as p:
        yield p


def store(peer, ds) -> int:
    """The status of one C-STORE of *ds* (pynetdicom, implicit VR little endian)."""
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, ImplicitVRLittleEndian)]) as assoc:
        return assoc.send_c_store(ds).Status


def patient_names(peer, patient_id: str) -> list[str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": patient_id, "PatientName": ""},
        model="P")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [str(r.PatientName) for r in rows]


@pytest.mark.parametrize("length, kept", [(VALUE_MAX, True), (VALUE_MAX + 1, False),
                                          (200_000, False)])
def test_a_catalog_value_past_its_bound_is_refused_and_not_kept(peer, length, kept):
    patient = f"LONG{length}"
    ds = datasets.make_image("CT", size=8, seed=length, PatientID=patient,
                             PatientName="N" * length,
                             transfer_syntax=ImplicitVRLittleEndian)
    status = store(peer, ds)
    assert status == (0x0000 if kept else 0xC000)
    assert patient_names(peer, patient) == (["N" * length] if kept else [])
    held = [dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)]
    assert (ds.SOPInstanceUID in held) == kept


@pytest.mark.parametrize("key, values", [
    ("AccessionNumber", [f"ACC{i}" for i in range(2000)]),            # a RIS prefetch
    ("PatientName", [f"NOBODY{i}*" for i in range(1500)] + ["LIST^*"]),
    ("StudyDate", [f"2001{i % 12 + 1:02d}01-2001{i % 12 + 1:02d}02" for i in range(1200)]
     + ["20240115"])])
def test_a_list_of_thousands_of_values_is_matched(peer, key, values):
    """Before: a list of 1,000 values or more was a chain of ORs SQLite refused ('Expression
    tree is too large (maximum depth 1000)'): 0xC001, nothing found."""
    ds = datasets.make_image("CT", size=8, seed=7, PatientID="LIST1",
                             PatientName="LIST^ONE", AccessionNumber="ACC1999",
                             transfer_syntax=ImplicitVRLittleEndian)
    assert store(peer, ds) == 0x0000
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", key: "\\".join(values), "PatientID": "LIST1",
        "StudyInstanceUID": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [str(r.StudyInstanceUID) for r in rows] == [ds.StudyInstanceUID]
