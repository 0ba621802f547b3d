"""Storage Commitment Push Model SCP (PS3.4 annex J) of the facade.

An N-ACTION-RQ (Action Type 1) on the well-known instance asks the cluster to take
responsibility for instances the requestor stored. ``Commit`` answers it: the data set
decoded and checked in a thread (``dicom.commitment``: valid UIDs, at most ``MAX_ITEMS``
instances; else 0x0110 with an Error Comment), another SOP class or a context of another
0x0122, another instance 0x0112, another action 0x0123, a requestor not in
``[destinations]`` 0x0110 (as dcm4chee: no address to report to), past ``MAX_WAITING``
requests being decided 0x0213 (Resource limitation, as dcm4chee); else Success.
``Report`` then decides through the cluster (``cluster.uncommitted``: held as that class
with at least ``write_quorum`` readable copies), asking again for those still missing
every few seconds up to ``[facade] commitment_wait``, and sends the N-EVENT-REPORT-RQ
(1: all committed, 2: some in the Failed SOP Sequence) on the same association while the
requestor holds it open, else on a new association to its ``[destinations]`` address
(pynetdicom, in the ``commitment`` thread pool, proposing the SCP role). A report that
cannot be delivered is one log line and an audit record.
"""

from __future__ import annotations

import itertools
import socket
from io import BytesIO

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import decode, encode
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pacsp2p import audit, threads
from pacsp2p.dicom import commitment as cm
from pacsp2p.dicom import dimse
from pacsp2p.dicom.messages import MemorySink
from pacsp2p.dicom.status import SOP_CLASS_NOT_SUPPORTED, SUCCESS
from pacsp2p.facade.operation import Operation
from pacsp2p.validate import shown

log = Logger()
RETRY_EVERY = 2.0          # seconds between two looks at instances not yet committed
MAX_WAITING = 32           # commitment requests of the peer being decided at once
_msg_ids = itertools.count(1)


def _pool(reactor):
    return threads.pool(reactor, "commitment", 1, 2)


class Commit(Operation):
    """N-ACTION-RQ of the Storage Commitment Push Model."""

    RSP = dimse.N_ACTION_RSP

    def __init__(self, svc, assoc, cx, fields):
        super().__init__(svc, assoc, cx, fields)
        self.sop_class = cm.SOP_CLASS.encode()
        self.requested = dimse.text(fields, dimse.REQUESTED_SOP_INSTANCE)
        self.requested_class = dimse.text(fields, dimse.REQUESTED_SOP_CLASS)
        self.action = dimse.us(fields, dimse.ACTION_TYPE_ID)
        self.sink = MemorySink(cm.MAX_BYTES)

    def run(self):
        if cm.SOP_CLASS != self.cx.abstract_syntax or \
                self.requested_class != cm.SOP_CLASS:
            return self._refuse(SOP_CLASS_NOT_SUPPORTED, "N-ACTION of another SOP class "
                                "or on a context of another")
        if self.requested != cm.SOP_INSTANCE:
            return self._refuse(cm.NO_SUCH_SOP_INSTANCE, "no such SOP instance")
        if self.action != cm.REQUEST_COMMITMENT:
            return self._refuse(cm.NO_SUCH_ACTION, f"no such action {self.action}")
        if self.data is None:
            return self._refuse(cm.PROCESSING_FAILURE, "no data set")
        if len(self.svc.commitments) >= MAX_WAITING:
            return self._refuse(cm.RESOURCE_LIMITATION, f"{MAX_WAITING} storage "
                                "commitment requests waiting")
        if self.svc.settings.destinations.get(self.assoc.calling_ae) is None:
            return self._refuse(cm.PROCESSING_FAILURE, "calling AE title not in "
                                "[destinations]: no address to report to")
        d = deferToThreadPool(self.svc.reactor, _pool(self.svc.reactor), self._request)
        d.addCallbacks(self._accepted, self._bad)

    def _request(self) -> cm.Request:
        """Thread pool: the data set decoded and checked (``commitment.request``)."""
        ts = self.ts
        if ts.is_deflated:
            raise cm.BadRequest("deflated data set")
        try:
            ds = decode(BytesIO(self.data), ts.is_implicit_VR, ts.is_little_endian)
        except Exception as e:
            raise cm.BadRequest(f"unreadable data set ({type(e).__name__})") from None
        return cm.request(ds)

    def _bad(self, failure):
        why = failure.getErrorMessage() if failure.check(ValueError) else \
            f"internal error ({failure.type.__name__})"
        self._refuse(cm.PROCESSING_FAILURE, why)

    def _refuse(self, status: int, why: str) -> None:
        self.warn("commitment refused", "storage commitment from {ae}@{peer} refused: "
                  "{why}", ae=shown(self.assoc.calling_ae), peer=self.assoc.peer,
                  why=shown(why))
        self.finish(status, instance=cm.SOP_INSTANCE.encode(), comment=why)

    def _accepted(self, req: cm.Request) -> None:
        self.finish(SUCCESS, instance=cm.SOP_INSTANCE.encode())
        Report(self.svc, self.assoc, self.cid, self.ts, req).start()


class Report:
    """The N-EVENT-REPORT answering one accepted commitment request."""

    def __init__(self, svc, assoc, cid, ts, req: cm.Request):
        self.svc, self.assoc, self.cid, self.ts, self.req = svc, assoc, cid, ts, req
        self.ae = assoc.calling_ae

    def start(self) -> defer.Deferred:
        waiting = self.svc.commitments
        waiting.add(self)
        d = self._run()
        d.addErrback(lambda f: log.failure("storage commitment {tx} from {ae}: failed", f,
                                           tx=self.req.transaction, ae=shown(self.ae)))
        d.addBoth(lambda r: (waiting.discard(self), r)[1])
        return d

    @defer.inlineCallbacks
    def _run(self):
        reactor, cluster = self.svc.reactor, self.svc.cluster
        deadline = reactor.seconds() + self.svc.settings.facade.commitment_wait
        refs, failures = self.req.refs, {}
        while True:
            failures = missing = yield cluster.uncommitted(refs)   # (of those still out)
            left = deadline - reactor.seconds()
            if not missing or left <= 0:
                break
            refs = tuple(r for r in refs if r in missing)
            yield task.deferLater(reactor, min(RETRY_EVERY, left), lambda: None)
        event_type, ds, data = yield deferToThreadPool(
            reactor, _pool(reactor), _encoded, self.req, failures,
            self.svc.settings.facade.ae_title, self.ts)
        log.info("storage commitment {tx} from {ae}: {ok} committed, {bad} failed",
                 tx=self.req.transaction, ae=shown(self.ae),
                 ok=sum(r not in failures for r in self.req.refs),
                 bad=sum(r in failures for r in self.req.refs))
        if self.assoc.open:
            self.assoc.send(self.cid, cm.event_report_rq(next(_msg_ids) & 0xFFFF or 1,
                                                         event_type), data, now=True)
            return "same"
        dest = self.svc.settings.destinations.get(self.ae)
        try:
            yield deferToThreadPool(reactor, _pool(reactor), _deliver, dest,
                                    self.svc.settings.facade.ae_title, event_type, ds)
        except Exception as e:
            why = shown(str(e) or type(e).__name__)
            log.warn("storage commitment {tx}: report to {ae} not delivered: {why}",
                     tx=self.req.transaction, ae=shown(self.ae), why=why)
            audit.emit(audit.message(
                audit.EVENT_APPLICATION_ACTIVITY, "E", audit.MINOR_FAILURE, [],
                self.svc.settings.peer.name, description="storage commitment report not "
                f"delivered to {self.ae}: {why}",
                extension={"service": "N-EVENT-REPORT", "transaction": self.req.transaction,
                           "calling_ae": self.ae}))
            return "lost"
        log.info("storage commitment {tx}: report delivered to {ae} on a new association",
                 tx=self.req.transaction, ae=shown(self.ae))
        return "new"


def _encoded(req: cm.Request, failures: dict, our_ae: str, ts):
    """Thread pool: (Event Type, data set, its bytes in *ts*) of the report (10,000
    items take a while: not on the reactor)."""
    event_type, ds = cm.report(req, failures, our_ae)
    return event_type, ds, encode(ds, ts.is_implicit_VR, ts.is_little_endian, False)


def _nodelay(event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _deliver(dest, our_ae: str, event_type: int, ds) -> None:
    """Thread pool: the report sent on a new association to *dest* (SCP role proposed,
    as PS3.4 J.3.3 asks of the SCP that opens it); raises why it was not."""
    from pynetdicom import AE, build_role, evt
    if dest is None:
        raise LookupError("not in [destinations]")
    if dest.tls:
        raise LookupError("a DICOM TLS destination (reports go over plain DICOM only)")
    ae = AE(ae_title=our_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(cm.SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                         ext_neg=[build_role(cm.SOP_CLASS, scp_role=True)],
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise ConnectionError(f"no association with {dest.ae_title}@{dest.host}:{dest.port}")
    try:
        rsp, _ = assoc.send_n_event_report(ds, event_type, cm.SOP_CLASS, cm.SOP_INSTANCE)
    finally:
        assoc.release()
    status = getattr(rsp, "Status", None)        # (an empty data set: no response)
    if status is None:
        raise ConnectionError("no N-EVENT-REPORT-RSP")
    if status != 0:
        raise ConnectionError(f"N-EVENT-REPORT-RSP status 0x{status:04X}")
