"""C-MOVE (PS3.4 annex C.4.2, PS3.7 9.1.3) of the facade, run in the reactor.

The Move Destination is looked up in ``[destinations]`` (0xA801 when unknown or
unreachable) and must be one the requestor may move to (``facade.policy``: a modality's
``move_to``; 0x0124 Refused: Not Authorized otherwise); the identifier is resolved by
``cluster.move``, which returns a
``Delivery`` (relay: the stored bytes sent by the native SCU on its own association;
direct: the archives send). Pending responses follow sub-operations (at most ~20 per
second, at least one per second), C-CANCEL and a vanished requestor cancel the delivery,
the final response has exact counts and the Failed SOP Instance UID List.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from pacsp2p.dicom import contexts, dimse
from pacsp2p.dicom.status import (ALL_FAILED, CANCEL, MOVE_DEST_UNKNOWN, NOT_AUTHORIZED,
                                  PENDING, PENDING_MAX_GAP, PENDING_MIN_GAP, SUCCESS,
                                  TOO_MANY_MATCHES, UNABLE_TO_PROCESS, WARNING)
from pacsp2p.facade.find import decode_query
from pacsp2p.facade.get import MAX_SUBOPERATIONS
from pacsp2p.facade.operation import Operation, failed_list
from pacsp2p.types import TooMany
from pacsp2p.validate import shown

log = Logger()


class Move(Operation):
    RSP = dimse.C_MOVE_RSP

    delivery = None
    _timer = _beat = None

    def run(self):
        svc = self.svc
        self.dest_ae = dimse.text(self.fields, dimse.MOVE_DESTINATION)
        self.dest = svc.settings.destinations.get(self.dest_ae)
        if self.dest is None:
            self.warn("C-MOVE refused", "C-MOVE from {req} to unknown destination {ae}",
                      req=shown(self.assoc.calling_ae), ae=shown(self.dest_ae))
            return self.finish(MOVE_DEST_UNKNOWN)
        policy = getattr(svc, "policy", None)
        if policy is not None and not policy.may_move_to(self.assoc, self.dest_ae):
            return self.finish(NOT_AUTHORIZED, comment="not authorized: move destination")
        decoded = decode_query(self, contexts.QR_MOVE, "C-MOVE", retrieve=True)
        if decoded is None:
            return
        self.t0 = svc.reactor.seconds()
        self.query = decoded[0]
        d = defer.maybeDeferred(svc.cluster.move, decoded[0], self.dest,
                                originator_ae=self.assoc.calling_ae,
                                originator_msg_id=self.msg_id, limit=MAX_SUBOPERATIONS)
        d.addCallback(self._resolved)
        d.addErrback(self._failed)          # also what _resolved raises

    def _failed(self, failure):
        if failure.check(TooMany):
            self.warn("C-MOVE refused", "C-MOVE from {ae}: {err}: more than a response can "
                      "count", ae=self.assoc.calling_ae, err=failure.getErrorMessage())
            return self.finish(TOO_MANY_MATCHES)
        log.error("C-MOVE failed: {err}", err=failure.getErrorMessage())
        self._stop_timers()
        if self.delivery is not None:
            self.delivery.cancel()
        self.finish(UNABLE_TO_PROCESS)

    def _resolved(self, delivery):
        svc = self.svc
        self.refs_out = delivery.refs           # for the audit record and the metrics
        n = self.n = len(delivery.refs)
        if n == 0:
            return self.finish(SUCCESS, counts=(None, 0, 0, 0))
        if self.gone:
            return
        self.delivery = delivery
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

    def finishes_after_loss(self) -> bool:
        # a delivery under way is cancelled and ends in _final, which records it
        return self.delivery is not None and not self.delivery.finished.called

    def lost(self):
        super().lost()
        self._stop_timers()
        if self.delivery is not None and not self.delivery.finished.called:
            self.warn("C-MOVE summary", "C-MOVE requestor left: cancelling the delivery")
            self.delivery.cancel()

    def _final(self, final):
        self._stop_timers()
        t2 = self.svc.reactor.seconds()       # requestor gone: finish() sends nothing
        self.note("C-MOVE summary", LogLevel.info, "C-MOVE {n} instances to {ae} for {req}: "
                  "{c} completed, {f} failed, {w} warning{x} (resolved in {r:.3f} s, "
                  "delivered in {d:.3f} s)", n=self.n, ae=self.dest_ae,
                  req=self.assoc.calling_ae, c=final.completed, f=final.failed,
                  w=final.warning, x=", cancelled" if final.cancelled else "",
                  r=self.t1 - self.t0, d=t2 - self.t1)
        counts = (final.remaining, final.completed, final.failed, final.warning)
        uids = final.failed_uids
        self.failed_uids_final = uids
        if final.error is not None:
            self.finish(MOVE_DEST_UNKNOWN)
        elif final.cancelled:
            self.finish(CANCEL, self.encode(failed_list(uids)) if uids else None, counts)
        elif final.failed and not final.completed and not final.warning:
            self.finish(ALL_FAILED, self.encode(failed_list(uids)), (None, *counts[1:]))
        elif final.failed or final.warning:
            self.finish(WARNING, self.encode(failed_list(uids)), (None, *counts[1:]))
        else:
            self.finish(SUCCESS, counts=(None, *counts[1:]))
