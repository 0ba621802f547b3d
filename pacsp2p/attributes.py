"""Which DICOM attributes the catalog keeps, at which level, and how they match.

The choice follows the attributes a C-FIND SCP must support (PS3.4 C.6.1.1 / C.6.2.1
required and unique keys) plus the common optional ones, much like Orthanc's "main DICOM
tags". Computed attributes (counts, ModalitiesInStudy) are derived at query time.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
TABLES = {"PATIENT": "patients", "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
ALIAS = {"PATIENT": "p", "STUDY": "st", "SERIES": "se", "IMAGE": "i"}
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
          "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
PARENT = {"STUDY": ("PATIENT", "PatientID"), "SERIES": ("STUDY", "StudyInstanceUID"),
          "IMAGE": ("SERIES", "SeriesInstanceUID")}


@dataclass(frozen=True)
class Attr:
    keyword: str
    level: str
    vr: str


_STORED = {
    "PATIENT": [("PatientID", "LO"), ("PatientName", "PN"), ("PatientBirthDate", "DA"),
                ("PatientSex", "CS"), ("IssuerOfPatientID", "LO"), ("OtherPatientIDs", "LO")],
    "STUDY": [("StudyInstanceUID", "UI"), ("StudyDate", "DA"), ("StudyTime", "TM"),
              ("AccessionNumber", "SH"), ("StudyID", "SH"), ("StudyDescription", "LO"),
              ("ReferringPhysicianName", "PN"), ("PatientAge", "AS"),
              ("InstitutionName", "LO")],
    "SERIES": [("SeriesInstanceUID", "UI"), ("Modality", "CS"), ("SeriesNumber", "IS"),
               ("SeriesDescription", "LO"), ("SeriesDate", "DA"), ("SeriesTime", "TM"),
               ("BodyPartExamined", "CS"), ("ProtocolName", "LO"), ("StationName", "SH"),
               ("Manufacturer", "LO")],
    "IMAGE": [("SOPInstanceUID", "UI"), ("SOPClassUID", "UI"), ("InstanceNumber", "IS"),
              ("ContentDate", "DA"), ("ContentTime", "TM"), ("AcquisitionNumber", "IS"),
              ("NumberOfFrames", "IS"), ("ImageType", "CS")],
}

STORED: dict[str, Attr] = {
    kw: Attr(kw, level, vr) for level, attrs in _STORED.items() for kw, vr in attrs
}

# computed attribute -> (level it describes, VR)
COMPUTED = {
    "NumberOfPatientRelatedStudies": ("PATIENT", "IS"),
    "NumberOfPatientRelatedSeries": ("PATIENT", "IS"),
    "NumberOfPatientRelatedInstances": ("PATIENT", "IS"),
    "NumberOfStudyRelatedSeries": ("STUDY", "IS"),
    "NumberOfStudyRelatedInstances": ("STUDY", "IS"),
    "ModalitiesInStudy": ("STUDY", "CS"),
    "SOPClassesInStudy": ("STUDY", "UI"),
    "NumberOfSeriesRelatedInstances": ("SERIES", "IS"),
}

# every keyword read from a stored file's header to fill the catalog
HEADER_KEYWORDS = sorted(set(STORED) | {"SpecificCharacterSet"})


def columns(level: str) -> list[str]:
    return [kw for kw, _ in _STORED[level]]
