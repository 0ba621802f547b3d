"""Synthetic, deterministic DICOM Part-10 files (pydicom + numpy; nothing downloaded).

make_image()       one image data set (CT/MR/US/CR/PT/DX/MG), any uncompressed TS or RLE
make_study()       one patient's study as files, several series/modalities/transfer syntaxes
sample_files()     a handful of typical files (CT 512x512, MR, implicit, RLE, private tags)
make_find_corpus() many patients/studies/series with varied attributes for C-FIND tests
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID, ComputedRadiographyImageStorage, CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation, DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage,
    PositronEmissionTomographyImageStorage, RLELossless, UltrasoundImageStorage,
    generate_uid)

__all__ = ["SOP_CLASSES", "ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "RLELossless",
           "uid", "make_image", "write", "make_study", "sample_files", "Corpus",
           "make_find_corpus"]

SOP_CLASSES = {
    "CT": CTImageStorage, "MR": MRImageStorage, "US": UltrasoundImageStorage,
    "CR": ComputedRadiographyImageStorage, "PT": PositronEmissionTomographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "MG": DigitalMammographyXRayImageStorageForPresentation,
}
DEFAULT_SIZE = {"CT": 512, "MR": 256}
PRIVATE_CREATOR = "PACSP2P TEST"


def uid(*parts: Any) -> UID:
    """A deterministic, valid UID (PS3.5 §9.1) derived from *parts*: same parts, same UID;
    different parts (compared by their ``str``), different UIDs. The parts are hashed as
    one JSON list, so no two sequences of parts run together into the same text
    (``uid("x", 1, 2, 15) != uid("x", 12, 1, 5)``; joined without a separator they did)."""
    return generate_uid(entropy_srcs=[json.dumps(["pacsp2p-testing", *map(str, parts)])])


def _pixels(modality: str, size: int, seed: int) -> tuple[np.ndarray, dict]:
    """A phantom: disc + gradient + seeded noise, in the modality's usual value range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    disc = ((yy - centre) ** 2 + (xx - centre) ** 2) < (0.4 * size) ** 2
    if modality == "CT":  # signed HU + 1024 offset via rescale
        arr = np.where(disc, 40, -1000) + (xx * 200 // max(size, 1)) + rng.integers(-20, 20, (size, size))
        return arr.astype(np.int16), {"BitsStored": 16, "PixelRepresentation": 1,
                                      "RescaleIntercept": "0", "RescaleSlope": "1",
                                      "WindowCenter": "40", "WindowWidth": "400"}
    arr = np.where(disc, 1800, 100) + (yy * 400 // max(size, 1)) + rng.integers(0, 50, (size, size))
    return arr.astype(np.uint16), {"BitsStored": 12, "PixelRepresentation": 0,
                                   "WindowCenter": "1000", "WindowWidth": "2000"}


def make_image(modality: str = "CT", *, size: int | None = None,
               transfer_syntax: str = ExplicitVRLittleEndian, private: bool = False,
               seed: int = 0, **attrs: Any) -> Dataset:
    """One single-frame 16-bit MONOCHROME2 image with file meta, ready for write().

    *attrs* (DICOM keywords) override defaults, e.g. PatientName="DOE^JOHN",
    StudyInstanceUID=..., InstanceNumber=3. *transfer_syntax* may be Implicit/Explicit
    VR Little Endian or RLELossless (pydicom's native RLE encoder).
    """
    size = size or DEFAULT_SIZE.get(modality, 64)
    key = (modality, seed, attrs.get("SOPInstanceUID"), attrs.get("InstanceNumber"),
           attrs.get("SeriesInstanceUID"))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = uid("sop", *key)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "PACSP2P SYNTHETIC"
    ds.InstitutionName = "Test Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.StudyDescription = f"{modality} STUDY"
    ds.SeriesDescription = f"{modality} SERIES"
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TEST001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.SliceThickness = "5"
    ds.StudyInstanceUID = uid("study", seed)
    ds.SeriesInstanceUID = uid("series", modality, seed)
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = uid("for", seed)
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.7", "0.7"]
    for k, v in attrs.items():
        setattr(ds, k, v)
    if ds.get("ImagePositionPatient") and "ImagePositionPatient" not in attrs:
        ds.ImagePositionPatient = ["0", "0", str(5 * int(ds.InstanceNumber))]
    arr, pix = _pixels(modality, size, hash((seed, int(ds.InstanceNumber))) & 0xFFFF)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = pix.pop("BitsStored")
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = pix.pop("PixelRepresentation")
    for k, v in pix.items():
        setattr(ds, k, v)
    if ds.PixelRepresentation == 0:
        arr = np.clip(arr, 0, (1 << ds.BitsStored) - 1).astype(np.uint16)
    ds.PixelData = arr.tobytes()
    if private:
        add_private_tags(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, arr, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = transfer_syntax
    return ds


def add_private_tags(ds: Dataset, group: int = 0x0009) -> None:
    """Add a private creator block (PACSP2P TEST) with LO, US, DS, OB and SQ elements."""
    block = ds.private_block(group, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "private text value")
    block.add_new(0x02, "US", 4242)
    block.add_new(0x03, "DS", "3.14159")
    block.add_new(0x04, "OB", bytes(range(16)))
    item = Dataset()
    item.CodeValue = "T-0001"
    item.CodingSchemeDesignator = "99PACS"
    block.add_new(0x05, "SQ", [item])


def write(ds: Dataset, path: Path | str) -> Path:
    """Write *ds* as a Part-10 file in its file meta's transfer syntax."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def explicit_le(ds: Dataset) -> bytes:
    """*ds*'s elements encoded in Explicit VR Little Endian (no preamble, no File Meta
    Information): the bytes of a C-STORE's data set as a test sends them raw."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def make_study(directory: Path | str, *, patient_name: str = "TEST^PATIENT",
               patient_id: str = "TEST001",
               series: Sequence[tuple[str, int, str]] = (("CT", 3, ExplicitVRLittleEndian),
                                                         ("MR", 2, ExplicitVRLittleEndian)),
               size: int | None = None, private: bool = False, seed: int = 0,
               **attrs: Any) -> list[Path]:
    """Write one study; *series* is [(modality, n_instances, transfer_syntax), ...].

    Files go to <directory>/<series number>_<modality>/<instance number>.dcm.
    *attrs* apply to every instance (e.g. StudyDate, AccessionNumber).
    """
    directory = Path(directory)
    study_uid = attrs.pop("StudyInstanceUID", None) or uid("study", patient_id, seed)
    paths = []
    for s_no, (modality, count, ts) in enumerate(series, start=1):
        series_uid = uid("series", study_uid, s_no)
        for i_no in range(1, count + 1):
            ds = make_image(modality, size=size, transfer_syntax=ts, private=private,
                            seed=seed, PatientName=patient_name, PatientID=patient_id,
                            StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                            SOPInstanceUID=uid("sop", series_uid, i_no), SeriesNumber=s_no,
                            InstanceNumber=i_no, FrameOfReferenceUID=uid("for", study_uid),
                            **attrs)
            paths.append(write(ds, directory / f"{s_no:02d}_{modality}" / f"{i_no:04d}.dcm"))
    return paths


def sample_files(directory: Path | str, *, ct_size: int = 512) -> dict[str, Path]:
    """Typical files, one each: ct (512x512 explicit), ct_implicit, mr (256x256),
    rle (RLE Lossless CT), private (private tags, explicit), private_implicit."""
    d = Path(directory)
    common = dict(PatientName="SAMPLE^FILES", PatientID="SAMPLE01",
                  StudyInstanceUID=uid("sample-study"))
    specs = {
        "ct": ("CT", ct_size, ExplicitVRLittleEndian, False),
        "ct_implicit": ("CT", ct_size, ImplicitVRLittleEndian, False),
        "mr": ("MR", 256, ExplicitVRLittleEndian, False),
        "rle": ("CT", ct_size, RLELossless, False),
        "private": ("MR", 64, ExplicitVRLittleEndian, True),
        "private_implicit": ("MR", 64, ImplicitVRLittleEndian, True),
    }
    out = {}
    for n, (name, (modality, size, ts, private)) in enumerate(specs.items(), start=1):
        ds = make_image(modality, size=size, transfer_syntax=ts, private=private, seed=n,
                        SeriesInstanceUID=uid("sample-series", name), SeriesNumber=n,
                        SOPInstanceUID=uid("sample-sop", name), **common)
        out[name] = write(ds, d / f"{name}.dcm")
    return out


# -- C-FIND corpus ---------------------------------------------------------------------

PATIENTS = [  # name, id, birth date, sex
    ("DOE^JOHN", "PID0001", "19600101", "M"),
    ("Doe^Jane", "PID0002", "19751231", "F"),
    ("SMITH^ANNA^MARIE", "PID0003", "19800229", "F"),
    ("SMITHSON^BOB", "PID0004", "19451111", "M"),
    ("VAN DER BERG^JAN", "PID0005", "19901010", "M"),
    ("O'BRIEN^PAT^^DR", "PID0006", "20000505", "O"),
    ("lee^min", "PID0007", "19550315", "F"),
    ("NGUYEN^THI^MAI", "PID0008", "19880808", "F"),
    ("MILLER^TOM", "PID0009", "", "M"),
    ("Miller^Tim", "PID0010", "19700707", "M"),
    ("GARCIA^LUIS", "PID-0011", "19620620", "M"),
    ("DOE^JOHNNY", "PID0012", "20100101", "M"),
]
STUDY_KINDS = {  # kind: (description, series modalities)
    "CT": ("CT CHEST W/O CONTRAST", ["CT"]),
    "CT2": ("CT ABDOMEN PELVIS", ["CT", "CT"]),
    "MR": ("MRI BRAIN", ["MR", "MR"]),
    "MRK": ("Knee MRI left", ["MR"]),
    "US": ("US ABDOMEN", ["US"]),
    "CR": ("CR CHEST 2 VIEWS", ["CR", "CR"]),
    "PETCT": ("PET-CT WHOLE BODY", ["CT", "PT", "CT"]),
    "MG": ("MAMMO SCREENING", ["MG"]),
    "DX": ("DX HAND", ["DX"]),
}
SERIES_DESCRIPTIONS = {"CT": ["AXIAL 5mm", "Axial 1.25mm", "SCOUT"], "MR": ["T1 SAG", "T2 AX", "FLAIR"],
                       "US": ["ABDOMEN"], "CR": ["PA", "LAT"], "PT": ["PET AC", "PET NAC"],
                       "MG": ["L CC", "R MLO"], "DX": ["HAND AP"]}
REFERRING = ["HOUSE^GREGORY", "Wilson^James", "", "CUDDY^LISA", "FOREMAN^ERIC^^DR"]
STUDY_ATTRS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
               "StudyDescription", "ReferringPhysicianName", "StudyID")
PATIENT_ATTRS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
SERIES_ATTRS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
INSTANCE_ATTRS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")


@dataclass
class Corpus:
    """Files written by make_find_corpus and one flat record (keyword -> str) per instance."""
    directory: Path
    paths: list[Path] = field(default_factory=list)
    records: list[dict[str, str]] = field(default_factory=list)

    def patients(self) -> dict[str, dict]:
        return {r["PatientID"]: r for r in self.records}

    def studies(self) -> dict[str, dict]:
        return {r["StudyInstanceUID"]: r for r in self.records}

    def series(self) -> dict[str, dict]:
        return {r["SeriesInstanceUID"]: r for r in self.records}


def make_find_corpus(directory: Path | str, n_patients: int = 12, *, seed: int = 1234,
                     size: int = 8) -> Corpus:
    """Many small images over varied patients/studies/series, deterministic for a seed.

    Patient 0 (DOE^JOHN) always has a PET-CT study with CT, PT and CT series and an MR
    study; other patients get 1-3 studies of random kinds spread over 1995-2024. Some
    series are written Implicit VR LE, the rest Explicit VR LE. Files go to
    <directory>/<PatientID>/<study n>/<series n>_<modality>/<instance n>.dcm.
    """
    rng = random.Random(seed)
    corpus = Corpus(Path(directory))
    study_no = 0
    for p in range(n_patients):
        if p < len(PATIENTS):
            name, pid, birth, sex = PATIENTS[p]
        else:
            name, pid = f"PATIENT{p:03d}^TEST", f"PID{p + 1:04d}"
            birth, sex = f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}", rng.choice("MFO")
        kinds = ["PETCT", "MR"] if p == 0 else [rng.choice(list(STUDY_KINDS)) for _ in range(rng.randint(1, 3))]
        for s, kind in enumerate(kinds, start=1):
            study_no += 1
            description, modalities = STUDY_KINDS[kind]
            study_uid = uid("corpus-study", seed, pid, s)
            study = {
                "StudyInstanceUID": study_uid,
                "StudyDate": f"{rng.randint(1995, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                "StudyTime": f"{rng.randint(6, 20):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}",
                "AccessionNumber": "" if study_no == 5 else f"ACC{study_no:05d}",
                "StudyDescription": description,
                "ReferringPhysicianName": rng.choice(REFERRING),
                "StudyID": str(study_no),
            }
            for se, modality in enumerate(modalities, start=1):
                series_uid = uid("corpus-series", study_uid, se)
                ts = ImplicitVRLittleEndian if rng.random() < 0.3 else ExplicitVRLittleEndian
                series = {"SeriesInstanceUID": series_uid, "Modality": modality,
                          "SeriesNumber": str(se),
                          "SeriesDescription": rng.choice(SERIES_DESCRIPTIONS[modality])}
                for i in range(1, rng.randint(1, 4) + 1):
                    sop_uid = uid("corpus-sop", series_uid, i)
                    ds = make_image(
                        modality, size=size, transfer_syntax=ts, seed=seed + i,
                        PatientName=name, PatientID=pid, PatientBirthDate=birth, PatientSex=sex,
                        SeriesDate=study["StudyDate"], SeriesTime=study["StudyTime"],
                        ContentDate=study["StudyDate"], ContentTime=study["StudyTime"],
                        SOPInstanceUID=sop_uid, InstanceNumber=i, FrameOfReferenceUID=uid("for", study_uid),
                        **{k: v for k, v in study.items()},
                        **{k: v for k, v in series.items() if k != "Modality"})
                    path = write(ds, corpus.directory / pid / f"{s:02d}" / f"{se:02d}_{modality}" / f"{i:04d}.dcm")
                    corpus.paths.append(path)
                    record = {k: str(ds.get(k, "")) for k in
                              PATIENT_ATTRS + STUDY_ATTRS + SERIES_ATTRS + INSTANCE_ATTRS}
                    corpus.records.append(record)
    return corpus
