"""The C-FIND response identifier written directly (``identifiers.fast_identifier``) is
byte for byte what pydicom writes for the same row (``to_dataset`` + pynetdicom's
encode), in implicit and explicit VR little endian; rows it leaves to pydicom
(non-ASCII values, odd IS values, sequences) go the pydicom way."""

import random

import pytest
from pynetdicom.dsutils import encode

from pacsp2p.dicom.identifiers import encode_row, fast_identifier, to_dataset

KEYS = {
    "PatientName": ["DOE^JOHN", "SMITH^G^^^", "A^B ", " x ", "O'NEIL^P", "ONE\\TWO", "X" * 64],
    "PatientID": ["P1", "ABC-123 ", "123456789012345678901234567890", ""],
    "PatientBirthDate": ["19700101", "1970", "bad-date", ""],
    "PatientSex": ["M", "F", "O", ""],
    "StudyDate": ["20200101", "2020-01-01", ""],
    "StudyTime": ["1212", "121212.123456", "12", ""],
    "AccessionNumber": ["ACC1", "A" * 16, "a b c", ""],
    "StudyDescription": ["CT HEAD", "brain w/o \\ contrast", "X" * 65, ""],
    "StudyID": ["1", "S01", ""],
    "ReferringPhysicianName": ["DR^WHO", ""],
    "ModalitiesInStudy": ["CT", "CT\\MR", "ct", "CT\\MR\\SR", ""],
    "NumberOfStudyRelatedInstances": ["0", "12", "012", " 12", "abc", "1\\2", "999999999", ""],
    "NumberOfStudyRelatedSeries": ["1", "4", ""],
    "StudyInstanceUID": ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.03", ""],
    "SeriesInstanceUID": ["1.2.3.4", ""],
    "SeriesNumber": ["1", "-1", ""],
    "Modality": ["MR", ""],
    "SOPInstanceUID": ["1.2.3.4.5", ""],
    "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.4", ""],
    "InstanceNumber": ["1", "100", ""],
    "OtherPatientIDsSequence": [""],
    "InstitutionName": ["HOSP", "Hôpital", ""],
    "PixelSpacing": ["0.5\\0.5"],
    # VRs not written verbatim, asked and not kept by the catalog: written empty
    "Rows": [""], "SliceThickness": [""], "ReferencedStudySequence": [""],
    "EncapsulatedDocument": [""], "SmallestImagePixelValue": [""], "SelectorUNValue": [""],
    "ReferencedFrameNumber": [""], "RealWorldValueLUTData": [""],
}


def pydicom_bytes(row, requested, level, implicit):
    blanked = []
    data = encode(to_dataset(row, requested, level, blanked), implicit, True, False)
    return data


@pytest.mark.parametrize("implicit", [True, False])
def test_fast_path_is_byte_identical(implicit):
    rnd = random.Random(15)
    fast = 0
    for _ in range(3000):
        requested = rnd.sample(list(KEYS), rnd.randint(1, 10))
        row = {k: rnd.choice(KEYS[k]) for k in requested if rnd.random() < 0.9}
        level = rnd.choice(["PATIENT", "STUDY", "SERIES", "IMAGE"])
        got = fast_identifier(row, requested, level, implicit)
        if got is None:
            continue
        fast += 1
        want = pydicom_bytes(row, requested, level, implicit)
        assert got == want, (row, requested)
        assert encode_row(row, requested, level, lambda ds: encode(ds, implicit, True, False),
                          (implicit, True, False)) == (got, [])
    assert fast > 500


def test_left_to_pydicom():
    requested = ["PatientName", "NumberOfStudyRelatedInstances"]
    assert fast_identifier({"PatientName": "Dürer^A"}, requested, "STUDY", True) is None
    assert fast_identifier({"NumberOfStudyRelatedInstances": " 12"}, requested, "STUDY",
                           True) is None
    assert fast_identifier({"Rows": "512"}, ["Rows"], "STUDY", True) is None
    assert fast_identifier({}, ["LUTData"], "STUDY", True) is None     # US or OW
    row = {"PatientName": "Dürer^A", "NumberOfStudyRelatedInstances": "abc"}
    data, blanked = encode_row(row, requested, "STUDY",
                               lambda ds: encode(ds, True, True, False), (True, True, False))
    assert blanked == ["NumberOfStudyRelatedInstances"]
    assert b"ISO_IR 192" in data and "Dürer".encode() in data


def test_a_row_left_to_pydicom_with_many_empty_keys_is_byte_identical():
    """A non-ASCII value and 100-400 keys asked empty: pydicom writes the valued keys, the
    empty ones are written directly (``_valued_by_pydicom``), the same bytes."""
    from pydicom.datadict import DicomDictionary
    every = sorted(v[4] for t, v in DicomDictionary.items() if v[4] and " or " not in v[0]
                   and t >> 16 not in (0x0000, 0x0002, 0xFFFE, 0x7FE0, 0xFFFC)
                   and t >> 16 < 0x6000)
    rnd = random.Random(16)
    for implicit in (True, False):
        for _ in range(40):
            requested = list(dict.fromkeys(rnd.sample(list(KEYS), 5) + rnd.sample(every, 300)))
            row = {k: rnd.choice(KEYS[k]) for k in requested if k in KEYS}
            row["PatientName"] = rnd.choice(["Dürer^A", "山田^太郎", "ASCII^ONLY"])
            requested.append("PatientName")
            level = rnd.choice(["PATIENT", "STUDY", "SERIES", "IMAGE"])
            want = encode(to_dataset(row, requested, level, []), implicit, True, False)
            if want is None:
                continue
            got, _ = encode_row(row, requested, level,
                                lambda ds: encode(ds, implicit, True, False),
                                (implicit, True, False))
            assert got == want, (row, level)
