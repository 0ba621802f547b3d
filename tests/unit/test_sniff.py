"""header.sniff: the catalog attributes of a data set from its first bytes (early
placement for forwarding, pacsp2p/transfer/forward.py), against read_meta of the whole."""
from __future__ import annotations

import pytest
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless)

from pacsp2p.dicom.header import BadDataset, file_meta, read_meta, sniff
from pacsp2p.testing import datasets


def data_set(path):
    raw = path.read_bytes()
    offset, ts = file_meta(raw)
    return raw[offset:], ts


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                ExplicitVRBigEndian, RLELossless])
def test_prefix_gives_the_same_attributes_as_the_whole_file(tmp_path, ts):
    ds = datasets.make_image("CT", size=64, seed=3, transfer_syntax=ts, private=True,
                             PatientName="PREFIX^TEST", PatientID="SNIFF01")
    path = datasets.write(ds, tmp_path / "one.dcm")
    body, syntax = data_set(path)
    whole = read_meta(path).attributes
    answers = [sniff(body[:n], syntax) for n in range(0, len(body), 97)]
    first = next(i for i, a in enumerate(answers) if a is not None)
    assert all(a is None for a in answers[:first])
    assert all(a == whole for a in answers[first:])
    assert whole["PatientID"] == "SNIFF01" and whole["Modality"] == "CT"
    assert first * 97 < len(body) - 64 * 64      # known before the pixel data arrived


def test_deflated_and_foreign_character_sets_are_left_to_read_meta(tmp_path):
    deflated = datasets.write(datasets.make_image(
        "CT", size=16, seed=4, transfer_syntax=DeflatedExplicitVRLittleEndian),
        tmp_path / "deflated.dcm")
    body, ts = data_set(deflated)
    with pytest.raises(BadDataset):
        sniff(body, ts)
    jis = datasets.make_image("MR", size=16, seed=5)
    jis.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    body, ts = data_set(datasets.write(jis, tmp_path / "jis.dcm"))
    with pytest.raises(BadDataset):
        sniff(body, ts)


def test_a_header_without_its_uids_is_refused(tmp_path):
    ds = datasets.make_image("CT", size=16, seed=6)
    del ds.StudyInstanceUID
    body, ts = data_set(datasets.write(ds, tmp_path / "nouid.dcm"))
    with pytest.raises(BadDataset, match="StudyInstanceUID"):
        sniff(body, ts)


def test_a_transfer_syntax_is_read_as_pydicom_reads_it_once():
    """``header._syntax`` (cached per UID) says what pydicom's ``UID`` says of each
    transfer syntax a data set may name, and raises as it does for one that is not."""
    import pytest
    from pydicom.uid import UID

    from pacsp2p.dicom.header import _syntax
    for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
               "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5"):
        u = UID(ts)
        want = (True, None, None) if u.is_deflated else (False, u.is_implicit_VR,
                                                         u.is_little_endian)
        assert _syntax(ts) == want == _syntax(ts)
    with pytest.raises(ValueError):
        _syntax("1.2.840.10008.5.1.4.1.1.4")     # a SOP class, not a transfer syntax
