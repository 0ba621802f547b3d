"""A modality asking for storage commitment (PS3.4 annex J), with pynetdicom: its AE,
the N-ACTION's data set, the report read from an N-EVENT-REPORT event."""
from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from . import datasets
from .cluster import patience

COMMIT_INSTANCE = "1.2.840.10008.1.20.1.1"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def images(n: int, tag: str) -> list[Dataset]:
    """*n* small CT images of one study."""
    return [datasets.make_image("CT", size=16, PatientID="SC001",
                                StudyInstanceUID=datasets.uid("sc-study", tag),
                                SOPInstanceUID=datasets.uid("sc", tag, i), InstanceNumber=i)
            for i in range(1, n + 1)]


def request(refs, transaction=None) -> Dataset:
    """The N-ACTION data set asking commitment of (SOP class, SOP instance) *refs*."""
    ds = Dataset()
    ds.TransactionUID = transaction or datasets.uid("sc-tx", len(refs))
    items = []
    for cls, inst in refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def modality_ae(title: str = "MODALITY") -> AE:
    """A requestor proposing CT storage, storage commitment and verification."""
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = patience(60)
    ae.add_requested_context(CTImageStorage, SYNTAXES)
    ae.add_requested_context(StorageCommitmentPushModel, SYNTAXES)
    ae.add_requested_context(Verification)
    return ae


def report(event) -> tuple[int, Dataset]:
    """(Event Type ID, data set) of an EVT_N_EVENT_REPORT event."""
    return event.request.EventTypeID, event.event_information
