"""IHE IOCM rejection notes for tests: a Key Object Selection document built with pydicom.

``rejection_note(path, study, rejected)`` writes a note (113001 Rejected for Quality
Reasons unless *code* says otherwise) in the study of *study*'s files, rejecting the
instances of the files *rejected*, grouped by series in its Current Requested
Procedure Evidence Sequence.
"""
from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from . import datasets

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def rejection_note(path: Path, study: list[Path], rejected: list[Path],
                   code=("113001", "Rejected for Quality Reasons")) -> Path:
    """A Key Object Selection document rejecting *rejected* (IHE IOCM)."""
    first = dcmread(study[0], stop_before_pixels=True)
    ds = Dataset()
    ds.SOPClassUID = KOS_SOP_CLASS
    ds.SOPInstanceUID = datasets.uid("kos", str(path))
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = datasets.uid("kos-series", str(path))
    ds.PatientID, ds.PatientName = first.PatientID, first.PatientName
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "KO", 99, 1
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = \
        code[0], "DCM", code[1]
    ds.ConceptNameCodeSequence = Sequence([concept])
    by_series: dict[str, list] = {}
    for p in rejected:
        r = dcmread(p, stop_before_pixels=True)
        by_series.setdefault(str(r.SeriesInstanceUID), []).append(r)
    series_items = []
    for series_uid, items in by_series.items():
        refs = []
        for r in items:
            ref = Dataset()
            ref.ReferencedSOPClassUID = r.SOPClassUID
            ref.ReferencedSOPInstanceUID = r.SOPInstanceUID
            refs.append(ref)
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedSOPSequence = Sequence(refs)
        series_items.append(s)
    evidence = Dataset()
    evidence.StudyInstanceUID = first.StudyInstanceUID
    evidence.ReferencedSeriesSequence = Sequence(series_items)
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.ContentSequence = Sequence([])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = KOS_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
