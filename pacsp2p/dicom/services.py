"""DIMSE service providers of the native facade: C-ECHO, C-STORE, C-FIND (PS3.7 9.1,
PS3.4 annexes A, B, C); C-MOVE and C-GET are in ``dicom.retrieve_ops``.

Every request is an operation object run in the reactor by its association
(``dicom.acceptor``): ``start()`` when it is the association's current request,
``cancel()`` on C-CANCEL, ``lost()`` when the association ends first, and a final response
ends it (``finish``). The cluster API is called directly (it returns Deferreds); file work
(writing a received data set, reading its header with ``read_meta``) runs in thread pools.
Statuses and log lines are those of the pynetdicom facade (``dicom.facade``).
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode
from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.dicom import contexts, dimse
from pacsp2p.dicom.acceptor import DiscardSink, MemorySink
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.dicom.identifiers import IdentifierError, to_dataset, to_query
from pacsp2p.dicom.incoming import Incoming, file_meta, remove
from pacsp2p.dicom.status import (SUCCESS, PENDING, CANCEL,
                                  SOP_CLASS_NOT_SUPPORTED, OUT_OF_RESOURCES,
                                  DOES_NOT_MATCH, CANNOT_UNDERSTAND, UNABLE_TO_PROCESS)

log = Logger()

FIND_BATCH = 16              # C-FIND responses sent per reactor turn


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

    # -- helpers ----------------------------------------------------------------------------
    def encode(self, ds: Dataset) -> bytes:
        ts = self.ts
        return encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)

    def identifier(self) -> Dataset:
        ts = self.ts
        if self.data is None:
            raise IdentifierError("the request has no identifier")
        return decode(BytesIO(self.data), ts.is_implicit_VR, ts.is_little_endian,
                      ts.is_deflated)

    def respond(self, status: int, data: bytes | None = None, counts=None,
                instance: bytes = b"") -> None:
        if not self.gone:
            self.assoc.send(self.cid, dimse.response(
                self.RSP, self.msg_id, status, self.sop_class, instance, data is not None,
                counts), data)

    def finish(self, status: int, data: bytes | None = None, counts=None,
               instance: bytes = b"") -> None:
        if self.finished:
            return
        self.finished = True
        self.respond(status, data, counts, instance)
        if not self.gone:
            self.assoc.done(self)


class Echo(Operation):
    RSP = dimse.C_ECHO_RSP

    def run(self):
        self.finish(SUCCESS)


def _meta_of(path, sha256, data_size):
    """Thread pool: (path, InstanceMeta or None, BadDataset or None)."""
    try:
        return path, read_meta(path, sha256, data_size), None
    except BadDataset as e:
        return path, None, e


class Store(Operation):
    """C-STORE: the data set is written to ``incoming`` while it arrives; once complete,
    its header is read (``read_meta``, in the pool) and it is given to ``cluster.store``
    with the plan ``cluster.begin_store`` made when it started (fragments go to the plan
    too if it forwards them; the writing thread hands it the file if it keeps files)."""

    RSP = dimse.C_STORE_RSP

    def __init__(self, svc, assoc, cx, fields):
        super().__init__(svc, assoc, cx, fields)
        self.instance = fields.get(dimse.AFFECTED_SOP_INSTANCE, b"")
        self.uid = dimse.text(fields, dimse.AFFECTED_SOP_INSTANCE)
        self.cls = dimse.text(fields, dimse.AFFECTED_SOP_CLASS)
        self.refused = None
        self.incoming = self.plan = None
        self.result = None
        if self.cls != cx.abstract_syntax:
            log.warn("C-STORE of {cls} on a context for {cx}: refused", cls=self.cls,
                     cx=cx.abstract_syntax)
            self.refused = SOP_CLASS_NOT_SUPPORTED
            self.sink = DiscardSink()
        else:
            head = file_meta(self.cls, self.uid, str(self.ts), assoc.calling_ae)
            self.incoming = Incoming(svc.spares.take(), svc.recv_pool, svc.reactor, head,
                                     assoc.pause_reading, assoc.resume_reading)
            self.plan = svc.cluster.begin_store(self.uid, self.cls, str(self.ts), head,
                                                assoc.pause_reading, assoc.resume_reading)
            self.sink = self if hasattr(self.plan, "feed") else self.incoming

    def feed(self, piece) -> None:
        """The sink when forwarding: the fragment goes to the file and to the replicas."""
        self.incoming.feed(piece)
        if self.plan is None:
            return
        try:
            self.plan.feed(piece)
        except Exception:                     # never at the cost of the association
            log.failure("C-STORE {uid}: forwarding failed; copied once complete",
                        uid=self.uid)
            self._abort_plan()

    def data_complete(self, sink):
        if self.incoming is None:
            return
        if sink is None:                      # a C-STORE-RQ without a data set
            self.incoming.discard()
            self._abort_plan()
            self.incoming, self.refused = None, CANNOT_UNDERSTAND
            return
        if hasattr(self.plan, "finish"):
            self.plan.finish()
        self.result = self.incoming.finish(self._written)
        self.result.addErrback(self._write_failed)

    def _written(self, path, sha256, data_size):
        """Thread pool: the file is complete; read its header (and keep it, if the plan
        keeps files from this thread and the data set is what the request announced)."""
        keeps = hasattr(self.plan, "in_thread")
        if keeps:
            self.plan.begin(path)
        got = _meta_of(path, sha256, data_size)
        meta = got[1]
        if not keeps:
            return got
        if meta is not None and meta.sop_instance_uid == self.uid and \
                meta.sop_class_uid == self.cls:
            self.plan.in_thread(path, meta)
        else:
            self.plan.abandon()
        return got

    def _abort_plan(self):
        if hasattr(self.plan, "abort"):
            self.plan.abort()
        self.plan = None

    def _write_failed(self, failure):
        log.error("C-STORE {uid} from {ae}: cannot write the received data set: {err}",
                  uid=self.uid, ae=self.assoc.calling_ae, err=failure.getErrorMessage())
        return None

    def run(self):
        if self.refused is not None:
            return self.finish(self.refused, instance=self.instance)
        self.result.addCallback(self._received)

    def _received(self, got):
        if got is None:                                    # not written (disk full, ...)
            self._abort_plan()
            return self.finish(OUT_OF_RESOURCES, instance=self.instance)
        path, meta, err = got
        kept = getattr(self.plan, "kept", None) is not None
        if err is not None:
            log.warn("C-STORE {uid} from {ae}: {err}", uid=self.uid,
                     ae=self.assoc.calling_ae, err=err)
            status = CANNOT_UNDERSTAND
        elif meta.sop_instance_uid != self.uid or meta.sop_class_uid != self.cls:
            log.warn("C-STORE {uid}: dataset UIDs do not match the request", uid=self.uid)
            status = DOES_NOT_MATCH
        elif self.gone and not self.started and not kept:
            status = None                                  # nobody to answer: drop it
        else:
            d = defer.maybeDeferred(self.svc.cluster.store, path, meta, self.plan)
            d.addCallbacks(self._stored, self._store_failed, errbackArgs=(meta,))
            if not kept:
                d.addBoth(self._cleanup, path)
            return
        self._abort_plan()
        remove(self.svc.recv_pool, path)
        if status is not None:
            self.finish(status, instance=self.instance)

    def _stored(self, _):
        self.finish(SUCCESS, instance=self.instance)

    def _store_failed(self, failure, meta):
        status = getattr(failure.value, "status", OUT_OF_RESOURCES)
        log.error("C-STORE {uid} failed: {err}", uid=meta.sop_instance_uid,
                  err=failure.getErrorMessage())
        self.finish(status, instance=self.instance)

    def _cleanup(self, result, path):
        remove(self.svc.recv_pool, path)
        return None

    def lost(self):
        super().lost()
        if self.incoming is not None and self.result is None:
            self.incoming.discard()          # the data set never arrived whole
            self._abort_plan()
        elif self.result is not None and not self.started:
            self.result.addCallback(self._received)   # whole but never started


class Find(Operation):
    """C-FIND: one query to ``cluster.find``; one Pending response per row, a C-CANCEL
    honoured between responses, sent while the transport takes them."""

    RSP = dimse.C_FIND_RSP

    def run(self):
        root = contexts.QR_FIND.get(self.cx.abstract_syntax, "STUDY")
        try:
            self.query, self.requested = to_query(self.identifier(), root)
        except IdentifierError as e:
            log.warn("C-FIND: {err}", err=e)
            return self.finish(DOES_NOT_MATCH)
        except Exception as e:
            log.warn("C-FIND: undecodable identifier: {err}", err=e)
            return self.finish(CANNOT_UNDERSTAND)
        d = defer.maybeDeferred(self.svc.cluster.find, self.query, self.requested)
        d.addCallbacks(self._found, self._failed)

    def _failed(self, failure):
        log.error("C-FIND failed: {err}", err=failure.getErrorMessage())
        self.finish(UNABLE_TO_PROCESS)

    def _found(self, rows):
        self.rows = iter(rows)
        self._send_some()

    def _send_some(self):
        for _ in range(FIND_BATCH):
            if self.gone or self.finished:
                return
            if self.cancelled:
                return self.finish(CANCEL)
            row = next(self.rows, None)
            if row is None:
                return self.finish(SUCCESS)
            ds = to_dataset(row, self.requested, self.query.level)
            self.respond(PENDING, self.encode(ds))
            if self.assoc.paused:
                return self.assoc.when_writable(self._send_some)
        self.svc.reactor.callLater(0, self._send_some)


class Services:
    """What the native facade serves; builds one operation per request."""

    def __init__(self, facade, recv_pool, send_pool, spares):
        from pacsp2p.dicom.retrieve_ops import Get, Move
        self.spares = spares
        self.facade = facade
        self.settings = facade.settings
        self.cluster = facade.cluster
        self.reactor = facade.reactor
        self.incoming = facade.incoming
        self.recv_pool, self.send_pool = recv_pool, send_pool
        self.kinds = {dimse.C_ECHO_RQ: Echo, dimse.C_STORE_RQ: Store,
                      dimse.C_FIND_RQ: Find, dimse.C_MOVE_RQ: Move, dimse.C_GET_RQ: Get}

    def request(self, assoc, cx, field, fields, has_data):
        kind = self.kinds.get(field)
        if kind is None:
            raise LookupError(f"unsupported DIMSE command {field:#06x}")
        return kind(self, assoc, cx, fields)
