"""C-GET (PS3.4 annex C.4.3, PS3.7 9.1.4) of the facade, run in the reactor.

Sub-operations are C-STORE-RQs on the requestor's own association, over the storage
contexts it accepted with the SCP role. An instance goes as its stored bytes when the
requestor accepted the stored transfer syntax for its class; otherwise it is re-encoded
(decompressed if needed, content and UIDs kept) into an accepted uncompressed syntax, in
the file pool; with neither, its sub-operation fails (counted, and logged once per
C-GET, not once per instance). One Pending response after each sub-operation; Cancel,
Warning 0xB000 and Failure 0xA702 finals carry the Failed SOP Instance UID List.
"""

from __future__ import annotations

import io

from pynetdicom.status import code_to_category
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pacsp2p.dicom import contexts, dimse
from pacsp2p.dicom.part10 import BadFile, Part10Bytes, convert, dataset_start
from pacsp2p.dicom.scu import _close, _read
from pacsp2p.dicom.status import (ALL_FAILED, CANCEL, GET_TOO_MANY, PENDING, SUCCESS,
                                  UNABLE_TO_PROCESS, WARNING)
from pacsp2p.facade.find import decode_query
from pacsp2p.facade.operation import Operation, failed_list
from pacsp2p.tally import Tally
from pacsp2p.types import TooMany

log = Logger()

DIMSE_TIMEOUT = 120.0       # seconds for a C-GET requestor's C-STORE-RSP
MAX_SUBOPERATIONS = 0xFFFF  # what a response's counts (US) can say: more is refused, 0xC416


class NotSendable(Exception):
    """The requestor accepted no transfer syntax this instance can be sent in."""


def _prepare(f, ref, offered: dict):
    """File pool: (context id, transfer syntax, file positioned at the data set) to send
    *ref* over one of the *offered* {transfer syntax: context id}; converts if needed."""
    try:
        ts, uid = dataset_start(f)
        if uid and uid != ref.sop_instance_uid:
            raise BadFile(f"the stored file holds {uid}")
    except BaseException:
        f.close()
        raise
    if ts in offered:
        return offered[ts], ts, f                        # the stored bytes, as they are
    target = next((t for t in contexts.UNCOMPRESSED if t in offered), None)
    if target is None:
        f.close()
        raise NotSendable(f"accepted none of {ts} or an uncompressed syntax")
    return offered[target], target, convert(f, target)


class Get(Operation):
    RSP = dimse.C_GET_RSP

    timer = None                  # waiting for a sub-operation's C-STORE-RSP
    unsendable = 0                # sub-operations failed for want of a usable context

    def run(self):
        decoded = decode_query(self, contexts.QR_GET, "C-GET", retrieve=True)
        if decoded is None:
            return
        self.query = decoded[0]
        d = defer.maybeDeferred(self.svc.cluster.get, decoded[0], limit=MAX_SUBOPERATIONS)
        d.addCallback(self._resolved)
        d.addErrback(self._failed)          # also what _resolved raises

    def _failed(self, failure):
        if failure.check(TooMany):
            self.warn("C-GET refused", "C-GET from {ae}: {err}: more than a response can "
                      "count", ae=self.assoc.calling_ae, err=failure.getErrorMessage())
            return self.finish(GET_TOO_MANY)
        log.error("C-GET failed: {err}", err=failure.getErrorMessage())
        self.finish(UNABLE_TO_PROCESS)

    def _resolved(self, retrieval):
        if self.gone:
            return
        self.retrieval = retrieval
        self.refs = list(retrieval.refs)
        self.refs_out = self.refs              # for the audit record
        self.bytes_out = 0                     # stored bytes of the instances sent
        n = len(self.refs)
        if n == 0:
            return self.finish(SUCCESS, counts=(None, 0, 0, 0))
        self.remaining, self.completed, self.failed, self.warning = n, 0, 0, 0
        self.failed_uids: list[str] = []
        self.events = Tally()         # failed sub-operations: one log line at the end
        self.index = 0
        self.expect = None            # message ID of the sub-operation awaiting its RSP
        self.timer = None
        # storage contexts we may send on: {SOP class: {transfer syntax: context id}}
        self.offered: dict[str, dict[str, int]] = {}
        for cid, cx in sorted(self.assoc.accepted.items()):
            if cx.as_scu:
                self.offered.setdefault(cx.abstract_syntax, {}).setdefault(
                    cx.transfer_syntax[0], cid)
        self._next()

    def _counts(self, remaining=True):
        return (self.remaining if remaining else None, self.completed, self.failed,
                self.warning)

    def _next(self):
        if self.gone or self.finished:
            return
        if self.cancelled:
            return self.finish(CANCEL, self.encode(failed_list(self.failed_uids)),
                               self._counts())
        if self.index >= len(self.refs):
            return self._final()
        ref = self.refs[self.index]
        self.index += 1
        self.sub_id = (self.msg_id + self.index - 1) % 0xFFFF + 1
        d = self.retrieval.open(ref)
        d.addCallback(self._opened, ref)
        d.addErrback(self._sub_failed, ref)

    def _opened(self, f, ref):
        """A file read whole and examined (``Part10Bytes``) in an accepted syntax goes
        out at once: command and data set in one write, handed to the kernel with the
        Pending response before it."""
        if isinstance(f, Part10Bytes) and not self.gone:
            cid = self.offered.get(ref.sop_class_uid, {}).get(f.transfer_syntax)
            if cid is not None:
                if f.media_uid and f.media_uid != ref.sop_instance_uid:
                    raise BadFile(f"the stored file holds {f.media_uid}")
                self.current = ref
                self.assoc.send(cid, dimse.c_store_rq(self.sub_id, ref.sop_class_uid,
                                                      ref.sop_instance_uid), f.data())
                self.assoc.flush()          # (corked: by the uncork, with the Pending)
                self._sent()
                return None
        d = defer.maybeDeferred(self._prepare, f, ref)
        d.addCallback(self._first_chunk, ref)
        return d

    def _sent(self):
        """The whole data set is out: wait for its C-STORE-RSP (one timer, re-armed)."""
        self.expect = self.sub_id
        if self.timer is not None and self.timer.active():
            self.timer.reset(DIMSE_TIMEOUT)
        else:
            self.timer = self.svc.reactor.callLater(DIMSE_TIMEOUT, self._no_response)

    def _prepare(self, f, ref):
        offered = self.offered.get(ref.sop_class_uid, {})
        if isinstance(f, io.BytesIO):       # in memory (verify.SMALL): no thread hop,
            pos = f.tell()                  # unless it must be converted
            try:
                ts, _ = dataset_start(f)
            except Exception:
                ts = None
            f.seek(pos)
            if ts in offered:
                return _prepare(f, ref, offered)
        return deferToThreadPool(self.svc.reactor, self.svc.send_pool, _prepare, f, ref,
                                 offered)

    def _first_chunk(self, prepared, ref):
        cid, ts, f = prepared
        if isinstance(f, io.BytesIO):       # in memory: read at once
            return self._send_first(_read(f, None), ref, cid, f)
        d = deferToThreadPool(self.svc.reactor, self.svc.send_pool, _read, f, None)
        d.addCallback(self._send_first, ref, cid, f)
        return d

    def _send_first(self, chunk, ref, cid, f):
        if self.gone:
            if chunk[1]:
                self.svc.send_pool.callInThread(_close, f)
            return
        self.assoc.send(cid, dimse.c_store_rq(self.sub_id, ref.sop_class_uid,
                                              ref.sop_instance_uid))
        self.current = ref
        self._chunk(chunk, cid, f)

    def _chunk(self, chunk, cid, f):
        data, left = chunk
        if self.gone:
            if left:
                self.svc.send_pool.callInThread(_close, f)
            return
        self.assoc.send_data(cid, data, last=left == 0)
        if left:
            self.assoc.when_writable(lambda: self._read_more(cid, f, left))
        else:
            self._sent()

    def _read_more(self, cid, f, left):
        d = deferToThreadPool(self.svc.reactor, self.svc.send_pool, _read, f, left)
        d.addCallbacks(self._chunk, self._read_failed, callbackArgs=(cid, f))

    def _read_failed(self, failure):
        log.error("C-GET: cannot read {uid} for sending: {err}",
                  uid=self.current.sop_instance_uid, err=failure.getErrorMessage())
        self.assoc.abort()           # part of the data set is on the wire

    def _no_response(self):
        self.timer = None
        if self.expect is None:           # not waiting for a C-STORE-RSP now
            return
        self.warn("C-GET summary", "C-GET: no C-STORE-RSP from {ae} within {s} s: "
                  "aborting", ae=self.assoc.calling_ae, s=DIMSE_TIMEOUT)
        self.assoc.abort()

    def _sub_failed(self, failure, ref):
        if failure.check(NotSendable):
            self.unsendable += 1          # logged once, with the final response
        else:
            self.events.add("failed", ref.sop_instance_uid, failure.getErrorMessage())
        self._settle(ref, failed=True)

    def store_response(self, fields) -> bool:
        if self.expect is None or dimse.us(fields, dimse.RESPONDED_TO) != self.expect:
            return False
        self.expect = None                # (the timer is re-armed by the next send)
        status = dimse.us(fields, dimse.STATUS)
        category = code_to_category(status)
        if category == "Success":
            self._settle(self.current)
        elif category == "Warning":
            self._settle(self.current, warning=True)
        else:
            self.events.add(f"answered {status:#06x} by the requestor",
                            self.current.sop_instance_uid, "C-STORE refused")
            self._settle(self.current, failed=True)
        return True

    def _settle(self, ref, failed=False, warning=False):
        if self.gone or self.finished:
            return
        self.remaining -= 1
        if failed:
            self.failed += 1
            self.failed_uids.append(ref.sop_instance_uid)
        elif warning:
            self.warning += 1
            self.bytes_out += ref.size or 0
        else:
            self.completed += 1
            self.bytes_out += ref.size or 0
        self.assoc.cork()          # the Pending response and what follows it at once
        try:                        # (the next C-STORE, or the final): one write
            self.respond(PENDING, counts=self._counts())
            self._next()
        finally:
            self.assoc.uncork()

    def _final(self):
        if self.events:
            self.warn("C-GET summary", "C-GET from {ae}: of {total} sub-operations, "
                      "{summary}", ae=self.assoc.calling_ae, total=len(self.refs),
                      summary=self.events.summary())
        if self.unsendable:
            self.warn("C-GET summary", "C-GET from {ae}: {n} of {total} instances not sent: "
                      "the requestor accepted no usable storage context for them",
                      ae=self.assoc.calling_ae, n=self.unsendable, total=len(self.refs))
        if not self.failed and not self.warning:
            return self.finish(SUCCESS, counts=self._counts(False))
        status = ALL_FAILED if self.failed == len(self.refs) else WARNING
        self.finish(status, self.encode(failed_list(self.failed_uids)), self._counts(False))

    def lost_counts(self):
        return self._counts() if hasattr(self, "remaining") else None

    def finish(self, *args, **kwargs):
        self._stop_timer()
        self._stop_retrieval()
        super().finish(*args, **kwargs)

    def lost(self):
        super().lost()
        self._stop_timer()
        self._stop_retrieval()

    def cancel(self):
        super().cancel()             # (the sub-operation under way ends first)
        self._stop_retrieval()

    def _stop_retrieval(self):
        """Nothing more fetched for a C-GET that ended (its requestor gone, a C-CANCEL):
        the retrieval ran on and kept what it fetched, up to its window, for nobody."""
        retrieval = getattr(self, "retrieval", None)
        if retrieval is not None and retrieval.finished_at is None and \
                not retrieval.cancelled:
            retrieval.cancel()

    def _stop_timer(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
