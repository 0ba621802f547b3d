"""Storage Commitment Push Model (PS3.4 annex J) on the wire: the N-ACTION-RQ's data set
read and checked, the N-EVENT-REPORT-RQ that answers it built.

``request(ds)`` turns a decoded N-ACTION data set into a ``Request`` (Transaction UID,
the (SOP class, SOP instance) pairs) or raises ``BadRequest``: every UID valid (PS3.5
§9.1), at least one and at most ``MAX_ITEMS`` referenced instances — anything a
requestor sends is hostile and never reaches the cluster unchecked. ``report`` builds
the event's data set (Event Type 1: all committed, 2: some failed) and
``event_report_rq`` its command set. Knows nothing of the cluster: who decides what is
committed is the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from pacsp2p.dicom import dimse
from pacsp2p.validate import InvalidUID, check_uid

SOP_CLASS = "1.2.840.10008.1.20.1"            # Storage Commitment Push Model
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"       # its well-known instance
REQUEST_COMMITMENT = 1                        # the one Action Type ID (J.3.2)
ALL_COMMITTED, SOME_FAILED = 1, 2             # Event Type IDs (J.3.3)
MAX_ITEMS = 10_000                            # referenced instances in one request
MAX_BYTES = 4 << 20       # its data set: 10,000 pairs of 64-character UIDs take ~1.7 MB

# N-ACTION-RSP statuses (PS3.7 annex C) and Failure Reasons (PS3.3 C.14.1.1)
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213
PROCESSING_FAILURE = 0x0110
CLASS_INSTANCE_CONFLICT = 0x0119


class BadRequest(ValueError):
    """An N-ACTION data set that cannot be a storage commitment request."""


@dataclass(frozen=True)
class Request:
    transaction: str
    refs: tuple[tuple[str, str], ...]          # (SOP class UID, SOP instance UID)


def request(ds: Dataset) -> Request:
    """The commitment request of a decoded N-ACTION data set (``BadRequest`` if none)."""
    try:
        transaction = str(ds.get("TransactionUID", "") or "")
        items = ds.get("ReferencedSOPSequence")
        if items is None or not len(items):
            raise BadRequest("no Referenced SOP Sequence")
        if len(items) > MAX_ITEMS:
            raise BadRequest(f"{len(items)} referenced instances: more than {MAX_ITEMS}")
        check_uid(transaction, "Transaction UID")
        refs = []
        for item in items:
            cls = str(item.get("ReferencedSOPClassUID", "") or "")
            inst = str(item.get("ReferencedSOPInstanceUID", "") or "")
            check_uid(cls, "Referenced SOP Class UID")
            check_uid(inst, "Referenced SOP Instance UID")
            refs.append((cls, inst))
    except (BadRequest, InvalidUID):
        raise
    except Exception as e:              # a data set pydicom cannot read as one
        raise BadRequest(f"unreadable data set ({type(e).__name__})") from None
    return Request(transaction, tuple(refs))


def report(req: Request, failures: dict, retrieve_ae: str = "") -> tuple[int, Dataset]:
    """(Event Type ID, data set) of the N-EVENT-REPORT answering *req*; *failures*:
    {(SOP class UID, SOP instance UID): Failure Reason} of those not committed."""
    ds = Dataset()
    ds.TransactionUID = req.transaction
    if retrieve_ae:
        ds.RetrieveAETitle = retrieve_ae
    good, bad = [], []
    for cls, inst in req.refs:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
        reason = failures.get((cls, inst))
        if reason:
            item.FailureReason = reason
            bad.append(item)
        else:
            good.append(item)
    if good:
        ds.ReferencedSOPSequence = good
    if bad:
        ds.FailedSOPSequence = bad
    return (SOME_FAILED if bad else ALL_COMMITTED), ds


def event_report_rq(msg_id: int, event_type: int) -> bytes:
    """N-EVENT-REPORT-RQ command set (PS3.7 10.3.1.1) of the commitment instance."""
    return dimse.command([
        (dimse.AFFECTED_SOP_CLASS, SOP_CLASS.encode()),
        (dimse.COMMAND_FIELD, dimse.N_EVENT_REPORT_RQ), (dimse.MESSAGE_ID, msg_id),
        (dimse.DATA_SET_TYPE, 0), (dimse.AFFECTED_SOP_INSTANCE, SOP_INSTANCE.encode()),
        (dimse.EVENT_TYPE_ID, event_type)])
