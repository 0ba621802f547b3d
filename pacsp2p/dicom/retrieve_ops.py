"""C-MOVE and C-GET service providers of the native facade (PS3.4 annex C.4.2, C.4.3;
PS3.7 9.1.3, 9.1.4), run in the reactor.

C-MOVE resolves the identifier with ``cluster.retrieve`` and hands the Retrieval to a
``transfer.deliver.Delivery`` (stored bytes sent by the native SCU on its own association;
in a direct-mode destination's case a ``transfer.direct.DirectDelivery``),
with the semantics of ``dicom.move``: Move Destination looked up in ``[destinations]``
(0xA801 when unknown or unreachable), Pending responses after sub-operations complete (at
most ~20 per second, at least one per second), C-CANCEL and a vanished requestor cancel the
delivery, the final response has exact counts and the Failed SOP Instance UID List.

C-GET sends its sub-operations as C-STORE-RQs on the requestor's own association, over the
storage contexts it accepted with the SCP role. An instance goes as its stored bytes when
the requestor accepted the stored transfer syntax for its class; otherwise it is re-encoded
(decompressed if needed, content and UIDs kept) into an accepted uncompressed syntax, in the
file pool; with neither, its sub-operation fails. Statuses and counts are pynetdicom's
(one Pending response after each sub-operation; Cancel, Warning 0xB000 and Failure 0xA702
finals carry the Failed SOP Instance UID List).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.status import code_to_category
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pacsp2p.dicom import contexts, dimse
from pacsp2p.dicom.identifiers import IdentifierError, to_query
from pacsp2p.dicom.scu import _read, _close
from pacsp2p.dicom.services import Operation
from pacsp2p.dicom.status import (ALL_FAILED, CANCEL, CANNOT_UNDERSTAND, DOES_NOT_MATCH,
                                  GET_TOO_MANY, MOVE_DEST_UNKNOWN, PENDING, PENDING_MAX_GAP,
                                  PENDING_MIN_GAP, SUCCESS, TOO_MANY_MATCHES,
                                  UNABLE_TO_PROCESS, WARNING)
from pacsp2p.transfer.deliver import BadFile, convert, dataset_start
from pacsp2p.transfer.direct import make_delivery

log = Logger()

DIMSE_TIMEOUT = 120.0       # seconds for a C-GET requestor's C-STORE-RSP


def _failed_list(uids) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = list(uids)
    return ds


class Move(Operation):
    RSP = dimse.C_MOVE_RSP

    delivery = None
    _timer = _beat = None

    def run(self):
        svc = self.svc
        self.dest_ae = dimse.text(self.fields, dimse.MOVE_DESTINATION)
        self.dest = svc.settings.destinations.get(self.dest_ae)
        if self.dest is None:
            log.warn("C-MOVE to unknown destination {ae}", ae=self.dest_ae)
            return self.finish(MOVE_DEST_UNKNOWN)
        root = contexts.QR_MOVE.get(self.cx.abstract_syntax, "STUDY")
        try:
            query, _ = to_query(self.identifier(), root)
        except IdentifierError as e:
            log.warn("C-MOVE: {err}", err=e)
            return self.finish(DOES_NOT_MATCH)
        except Exception as e:
            log.warn("C-MOVE: undecodable identifier: {err}", err=e)
            return self.finish(CANNOT_UNDERSTAND)
        self.t0 = svc.reactor.seconds()
        d = defer.maybeDeferred(svc.cluster.retrieve, query)
        d.addCallbacks(self._resolved, self._failed)

    def _failed(self, failure):
        log.error("C-MOVE failed: {err}", err=failure.getErrorMessage())
        self.finish(UNABLE_TO_PROCESS)

    def _resolved(self, retrieval):
        svc = self.svc
        n = self.n = len(retrieval.refs)
        if n == 0:
            return self.finish(SUCCESS, counts=(None, 0, 0, 0))
        if n > 0xFFFF:
            log.warn("C-MOVE matches {n} instances: more than a response can count", n=n)
            return self.finish(TOO_MANY_MATCHES)
        if self.gone:
            return
        self.delivery = make_delivery(retrieval, self.dest, svc.settings.facade.ae_title,
                                      svc.reactor, originator_ae=self.assoc.calling_ae,
                                      originator_msg_id=self.msg_id)
        self.delivery.listeners.append(self._progress)
        self.latest, self.sent, self.last_sent = None, None, float("-inf")
        self.t1 = svc.reactor.seconds()
        self.delivery.start().addCallback(self._final)
        if self.cancelled:
            self.delivery.cancel()
        self._beat = svc.reactor.callLater(PENDING_MAX_GAP, self._heartbeat)

    # -- Pending responses ---------------------------------------------------------------
    def _counts(self):
        p = self.latest
        return (p.remaining, p.completed, p.failed, p.warning) if p else (self.n, 0, 0, 0)

    def _send_pending(self):
        counts = self._counts()
        self.respond(PENDING, counts=counts)
        self.sent, self.last_sent = counts, self.svc.reactor.seconds()
        if self._beat is not None and self._beat.active():
            self._beat.reset(PENDING_MAX_GAP)

    def _progress(self, p):
        if p.done or self.gone or self.finished:
            return
        self.latest = p
        if self._timer is not None and self._timer.active():
            return
        wait = self.last_sent + PENDING_MIN_GAP - self.svc.reactor.seconds()
        if wait <= 0:
            self._send_pending()
        else:
            self._timer = self.svc.reactor.callLater(wait, self._due)

    def _due(self):
        self._timer = None
        if not (self.gone or self.finished) and self._counts() != self.sent:
            self._send_pending()

    def _heartbeat(self):
        self._beat = None
        if self.gone or self.finished:
            return
        self._send_pending()
        self._beat = self.svc.reactor.callLater(PENDING_MAX_GAP, self._heartbeat)

    def _stop_timers(self):
        for t in (self._timer, self._beat):
            if t is not None and t.active():
                t.cancel()
        self._timer = self._beat = None

    # -- the end ---------------------------------------------------------------------------
    def cancel(self):
        super().cancel()
        if self.delivery is not None:
            self.delivery.cancel()

    def lost(self):
        super().lost()
        self._stop_timers()
        if self.delivery is not None and not self.delivery.finished.called:
            log.warn("C-MOVE requestor left: cancelling the delivery")
            self.delivery.cancel()

    def _final(self, final):
        self._stop_timers()
        if self.gone:
            return
        t2 = self.svc.reactor.seconds()
        log.info("C-MOVE {n} instances to {ae} for {req}: {c} completed, {f} failed, "
                 "{w} warning{x} (resolved in {r:.3f} s, delivered in {d:.3f} s)", n=self.n,
                 ae=self.dest_ae, req=self.assoc.calling_ae, c=final.completed,
                 f=final.failed, w=final.warning, x=", cancelled" if final.cancelled else "",
                 r=self.t1 - self.t0, d=t2 - self.t1)
        counts = (final.remaining, final.completed, final.failed, final.warning)
        uids = final.failed_uids
        if final.error is not None:
            self.finish(MOVE_DEST_UNKNOWN)
        elif final.cancelled:
            self.finish(CANCEL, self.encode(_failed_list(uids)) if uids else None, counts)
        elif final.failed and not final.completed and not final.warning:
            self.finish(ALL_FAILED, self.encode(_failed_list(uids)), (None, *counts[1:]))
        elif final.failed or final.warning:
            self.finish(WARNING, self.encode(_failed_list(uids)), (None, *counts[1:]))
        else:
            self.finish(SUCCESS, counts=(None, *counts[1:]))


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

    def run(self):
        root = contexts.QR_GET.get(self.cx.abstract_syntax, "STUDY")
        try:
            query, _ = to_query(self.identifier(), root)
        except IdentifierError as e:
            log.warn("C-GET: {err}", err=e)
            return self.finish(SUCCESS, counts=(None, 0, 0, 0))
        except Exception as e:
            log.warn("C-GET: undecodable identifier: {err}", err=e)
            return self.finish(CANNOT_UNDERSTAND)
        d = defer.maybeDeferred(self.svc.cluster.retrieve, query)
        d.addCallbacks(self._resolved, self._failed)

    def _failed(self, failure):
        log.error("C-GET failed: {err}", err=failure.getErrorMessage())
        self.finish(UNABLE_TO_PROCESS)

    def _resolved(self, retrieval):
        self.retrieval = retrieval
        self.refs = list(retrieval.refs)
        n = len(self.refs)
        if n == 0:
            return self.finish(SUCCESS, counts=(None, 0, 0, 0))
        if n > 0xFFFF:
            log.error("C-GET matches {n} instances: more than a response can count", n=n)
            return self.finish(GET_TOO_MANY)
        self.remaining, self.completed, self.failed, self.warning = n, 0, 0, 0
        self.failed_uids: list[str] = []
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
            return self.finish(CANCEL, self.encode(_failed_list(self.failed_uids)),
                               self._counts())
        if self.index >= len(self.refs):
            return self._final()
        ref = self.refs[self.index]
        self.index += 1
        self.sub_id = (self.msg_id + self.index - 1) % 0xFFFF + 1
        pool = self.svc.send_pool
        d = self.retrieval.open(ref)
        d.addCallback(lambda f: deferToThreadPool(
            self.svc.reactor, pool, _prepare, f, ref,
            self.offered.get(ref.sop_class_uid, {})))
        d.addCallback(self._first_chunk, ref)
        d.addErrback(self._sub_failed, ref)

    def _first_chunk(self, prepared, ref):
        cid, ts, f = prepared
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
            self.expect = self.sub_id
            self.timer = self.svc.reactor.callLater(DIMSE_TIMEOUT, self._no_response)

    def _read_more(self, cid, f, left):
        d = deferToThreadPool(self.svc.reactor, self.svc.send_pool, _read, f, left)
        d.addCallbacks(self._chunk, self._read_failed, callbackArgs=(cid, f))

    def _read_failed(self, failure):
        log.error("C-GET: cannot read {uid} for sending: {err}",
                  uid=self.current.sop_instance_uid, err=failure.getErrorMessage())
        self.assoc.abort()           # part of the data set is on the wire

    def _no_response(self):
        self.timer = None
        log.warn("C-GET: no C-STORE-RSP from {ae} within {s} s: aborting",
                 ae=self.assoc.calling_ae, s=DIMSE_TIMEOUT)
        self.assoc.abort()

    def _sub_failed(self, failure, ref):
        if failure.check(NotSendable):
            log.warn("C-GET requester accepted no usable transfer syntax for {uid}",
                     uid=ref.sop_instance_uid)
        else:
            log.error("sub-operation for {uid} failed: {err}", uid=ref.sop_instance_uid,
                      err=failure.getErrorMessage())
        self._settle(ref, failed=True)

    def store_response(self, fields) -> bool:
        if self.expect is None or dimse.us(fields, dimse.RESPONDED_TO) != self.expect:
            return False
        self.expect = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        status = dimse.us(fields, dimse.STATUS)
        category = code_to_category(status)
        if category == "Success":
            self._settle(self.current)
        elif category == "Warning":
            self._settle(self.current, warning=True)
        else:
            log.warn("{ae} answered {status:#06x} to the C-STORE of {uid}",
                     ae=self.assoc.calling_ae, status=status,
                     uid=self.current.sop_instance_uid)
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
        else:
            self.completed += 1
        self.respond(PENDING, counts=self._counts())
        self._next()

    def _final(self):
        if not self.failed and not self.warning:
            return self.finish(SUCCESS, counts=self._counts(False))
        status = ALL_FAILED if self.failed == len(self.refs) else WARNING
        self.finish(status, self.encode(_failed_list(self.failed_uids)), self._counts(False))

    def lost(self):
        super().lost()
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

