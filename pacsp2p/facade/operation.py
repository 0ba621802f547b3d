"""One DIMSE request on an association, as the facade answers it (PS3.7 9.1).

Every request is an operation object run in the reactor by its association
(``dicom.acceptor``): ``start()`` when it is the association's current request,
``cancel()`` on C-CANCEL, ``lost()`` when the association ends first, and a final response
ends it (``finish``), which also tells the services' ``observer`` (``facade.observe``:
the audit record and the metrics of the operation). Operations call the cluster API
(``pacsp2p.cluster``) only; file work runs in thread pools. C-ECHO is here; the other
services have a module each.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from twisted.logger import Logger, LogLevel

from pacsp2p.dicom import dimse
from pacsp2p.dicom.deflate import inflate
from pacsp2p.dicom.identifiers import IdentifierError
from pacsp2p.dicom.messages import MAX_IDENTIFIER, DiscardSink, MemorySink
from pacsp2p.dicom.status import NOT_AUTHORIZED, SUCCESS, UNABLE_TO_PROCESS
from pacsp2p.validate import InvalidUID, check_uid

log = Logger()


def failed_list(uids) -> Dataset:
    """The identifier of a final C-MOVE/C-GET response: Failed SOP Instance UID List."""
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = list(uids)
    return ds


class Operation:
    """One DIMSE request on an association, answered from the reactor."""

    RSP = 0

    def __init__(self, svc, assoc, cx, fields):
        self.svc, self.assoc, self.cx, self.fields = svc, assoc, cx, fields
        self.cid = cx.context_id
        self.ts = cx.transfer_syntax[0]
        self.msg_id = dimse.us(fields, dimse.MESSAGE_ID)
        self.sop_class = fields.get(dimse.AFFECTED_SOP_CLASS, b"")
        self.sink = MemorySink()
        self.data: bytes | None = None
        self.started = self.cancelled = self.gone = self.finished = False
        self.pendings = 0                     # Pending responses sent
        self.answered = False                 # the final response sent by a thread
        clock = getattr(svc, "reactor", None)
        self.arrived = clock.seconds() if clock is not None else None   # command complete

    # -- called by the association --------------------------------------------------------
    def data_complete(self, sink) -> None:
        self.data = bytes(sink.data) if isinstance(sink, MemorySink) else None

    def start(self) -> None:
        self.started = True
        try:
            self.run()
        except Exception:
            log.failure("DIMSE operation failed")
            self.finish(UNABLE_TO_PROCESS)

    def run(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        self.cancelled = True

    def store_response(self, fields) -> bool:
        return False

    def lost(self) -> None:
        self.gone = True
        if self.started and not self.finished and not self.finishes_after_loss():
            self.finished = True         # no final response now: audit what was done
            self._observe(None, self.lost_counts(),
                          "the association ended before the final response")

    def finishes_after_loss(self) -> bool:
        """Does this operation still reach ``finish`` once its association is gone (a
        C-STORE being kept, a C-MOVE's delivery being cancelled)?"""
        return False

    def lost_counts(self):
        """Sub-operation counts so far, for the record of an operation cut short."""
        return None

    def _observe(self, status, counts, comment) -> None:
        observer = getattr(self.svc, "observer", None)
        if observer is not None:
            try:
                observer.finished(self, status, counts, comment)
            except Exception:
                log.failure("observing a DIMSE operation failed")

    # -- helpers ----------------------------------------------------------------------------
    def warn(self, kind: str, fmt: str, **kw) -> None:
        """A warning about what the requestor sent, rate-limited (``note``)."""
        self.note(kind, LogLevel.warn, fmt, **kw)

    def note(self, kind: str, level: LogLevel, fmt: str, **kw) -> None:
        """A line a requestor can make the peer write, once per request or more: each
        *kind* at most the acceptor's ``LogLimit`` burst per window, then one line
        counting the rest (one association refused 500 C-STOREs a second, a line each;
        a loop of tiny C-GETs wrote a summary line each: a flood filled the disk)."""
        limit = getattr(getattr(self.assoc, "factory", None), "log_limit", None)
        if limit is None:
            log.emit(level, fmt, **kw)
        else:
            limit(kind, level, fmt, **kw)

    def encode(self, ds: Dataset) -> bytes:
        ts = self.ts
        return encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)

    def identifier(self) -> Dataset:
        ts = self.ts
        if self.data is None:
            raise IdentifierError("the request has no identifier")
        if ts.is_deflated:           # inflated with the bound of a plain identifier
            return decode(BytesIO(inflate(self.data, MAX_IDENTIFIER)), False, True)
        return decode(BytesIO(self.data), ts.is_implicit_VR, ts.is_little_endian)

    def respond(self, status: int, data: bytes | None = None, counts=None,
                instance: bytes = b"", comment: str = "") -> None:
        if status in (0xFF00, 0xFF01):
            self.pendings += 1                # C-FIND: the matches sent
        if self.answered:               # sent already, from a thread (``Store``)
            if status != SUCCESS:
                log.error("DIMSE response 0x{status:04X} not sent: Success was", status=status)
            if not self.gone:
                self.assoc.sent()
        elif not self.gone:             # a final response goes out at once
            self.assoc.send(self.cid, dimse.response(
                self.RSP, self.msg_id, status, self.sop_class, instance, data is not None,
                counts, comment), data, now=status not in (0xFF00, 0xFF01))

    def finish(self, status: int, data: bytes | None = None, counts=None,
               instance: bytes = b"", comment: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        self.respond(status, data, counts, instance, comment)
        self._observe(status, counts, comment)
        if not self.gone:
            self.assoc.done(self)


class Echo(Operation):
    """C-ECHO (PS3.7 9.1.5): Success."""

    RSP = dimse.C_ECHO_RSP

    def run(self):
        self.finish(SUCCESS)


class NotAuthorized(Operation):
    """A request the association has no right to (``facade.policy``): 0x0124 (Refused:
    Not Authorized) with an Error Comment; a C-STORE's data set is discarded as it
    arrives, an identifier read (bounded) and dropped."""

    def __init__(self, svc, assoc, cx, fields, rsp: int, right: str):
        super().__init__(svc, assoc, cx, fields)
        self.RSP = rsp
        self.right = right
        self.instance = b""
        if rsp == dimse.C_STORE_RSP:
            self.sink = DiscardSink()
            try:
                check_uid(dimse.text(fields, dimse.AFFECTED_SOP_INSTANCE), "instance")
                self.instance = fields.get(dimse.AFFECTED_SOP_INSTANCE, b"")
            except InvalidUID:
                pass

    def run(self):
        self.finish(NOT_AUTHORIZED, instance=self.instance,
                    comment=f"not authorized: {self.right}")
