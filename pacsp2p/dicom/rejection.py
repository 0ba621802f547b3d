"""IHE IOCM rejection notes: a Key Object Selection document that rejects instances.

A rejection note (IHE RAD TF-3 "Imaging Object Change Management", DICOM PS3.16 CID
7011 "Rejected for Quality Reasons" and its siblings) is a Key Object Selection Document
(SOP class 1.2.840.10008.5.1.4.1.1.88.59) whose Concept Name Code Sequence is one of

    113001 Rejected for Quality Reasons          113038 Incorrect Modality Worklist Entry
    113037 Rejected for Patient Safety Reasons   113039 Data Retention Policy Expired

(coding scheme DCM). The instances it rejects are listed in its Current Requested
Procedure Evidence Sequence: study -> Referenced Series Sequence -> Referenced SOP
Sequence -> Referenced SOP Instance UID. ``read_rejection`` reads that from a stored
file; any other Key Object Selection document (e.g. 113000 "Of Interest") is not one.
Wire-level knowledge only: what is done with a rejection is the cluster's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError

from pacsp2p.dicom.header import MAX_DEFLATED_HEADER
from pacsp2p.dicom.part10 import BadFile, read_header
from pacsp2p.validate import is_uid

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
REJECTION_CODES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
MAX_REFERENCES = 100_000          # instances one note may reject


class BadRejection(ValueError):
    """A rejection note that cannot be acted on (no valid reference, too many, ...)."""


@dataclass(frozen=True)
class Rejection:
    code: str                     # 113001, ...
    meaning: str                  # "Rejected for Quality Reasons", ...
    sop_instance_uid: str         # the note's own UID
    instances: tuple[str, ...]    # the SOP Instance UIDs it rejects
    studies: tuple[str, ...]      # their studies, as the note names them

    @property
    def reason(self) -> str:
        return f"{self.code} {self.meaning}"


def rejection_code(ds) -> str | None:
    """The rejection code of a Key Object Selection data set, or None if it is not one."""
    for item in getattr(ds, "ConceptNameCodeSequence", None) or ():
        code = str(getattr(item, "CodeValue", "")).strip()
        scheme = str(getattr(item, "CodingSchemeDesignator", "")).strip()
        if code in REJECTION_CODES and scheme == "DCM":
            return code
    return None


def read_rejection(path: Path) -> Rejection | None:
    """The rejection a stored Key Object Selection file makes, None if it makes none
    (another kind of KOS, another SOP class). Raises BadRejection for a rejection note
    that names no valid instance, or too many."""
    try:
        ds = read_header(path, MAX_DEFLATED_HEADER)    # as much as the store read
    except (InvalidDicomError, OSError, ValueError, EOFError, RecursionError, BadFile) as e:
        raise BadRejection(f"unreadable: {e}") from e
    if str(getattr(ds, "SOPClassUID", "")) != KOS_SOP_CLASS:
        return None
    code = rejection_code(ds)
    if code is None:
        return None
    instances, studies, bad = [], [], 0
    for study in getattr(ds, "CurrentRequestedProcedureEvidenceSequence", None) or ():
        study_uid = str(getattr(study, "StudyInstanceUID", ""))
        if is_uid(study_uid) and study_uid not in studies:
            studies.append(study_uid)
        for series in getattr(study, "ReferencedSeriesSequence", None) or ():
            for ref in getattr(series, "ReferencedSOPSequence", None) or ():
                uid = str(getattr(ref, "ReferencedSOPInstanceUID", ""))
                if is_uid(uid):
                    instances.append(uid)
                else:
                    bad += 1
                if len(instances) > MAX_REFERENCES:
                    raise BadRejection(f"references more than {MAX_REFERENCES} instances")
    own = str(getattr(ds, "SOPInstanceUID", ""))
    instances = [u for u in dict.fromkeys(instances) if u != own]
    if not instances:
        raise BadRejection("its Current Requested Procedure Evidence Sequence names no "
                           f"valid SOP Instance UID ({bad} invalid)")
    return Rejection(code, REJECTION_CODES[code], own, tuple(instances), tuple(studies))
