"""Data sets with items or delimiters where no sequence is, or a value of undefined
length that is no sequence, are refused at a C-STORE since 3e18d84
(tests/integration/test_misplaced_items.py) -- but an archive may hold such files
already: stored and acknowledged before (each was answered 0x0000), or crawled. Those
are still read (``read_meta`` unbounded, ``dataset_uid``), as 7708c2b keeps reading data
sets of odd length: a catalog rebuild or a crawl skipped them (gone from the cluster's
view), and the copies that repair, hinted hand-off and drain make of them were refused
at their target (``read_meta`` there: 'cannot' copy an instance that lost a copy), a
retrieval's check of a copy without a catalog hash called it 'not a whole Part-10
file'. Real Part-10 files (pydicom's file meta writer, the cases' own bytes)."""
from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsp2p.dicom.header import BadDataset, dataset_uid, read_meta
from test_misplaced_items import REFUSED, base

CASES = sorted(n for n in REFUSED if "odd length" not in n)


def part10(tmp_path, sop: str, explicit: bool, tail: bytes):
    syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
    meta.TransferSyntaxUID = syntax
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    head = out.getvalue()
    path = tmp_path / f"{sop}.dcm"
    path.write_bytes(head + base(sop, explicit) + tail)
    return path, len(head), syntax


@pytest.mark.parametrize("name", CASES)
def test_a_file_held_already_is_read_and_refused_only_at_a_c_store(tmp_path, name):
    sop = f"1.2.826.0.1.3680043.10.1406.16.9.{CASES.index(name) + 1}"
    path, offset, syntax = part10(tmp_path, sop, *REFUSED[name])
    assert read_meta(path).sop_instance_uid == sop              # before: BadDataset
    assert dataset_uid(path.read_bytes(), offset, syntax) == sop
    with pytest.raises(BadDataset):
        read_meta(path, bounded=True)                            # a C-STORE: refused
