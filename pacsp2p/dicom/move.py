"""The facade's C-MOVE SCP: pynetdicom takes the request, pacsp2p's own SCU delivers.

Why this module exists: pynetdicom's built-in C-MOVE SCP asks an ``EVT_C_MOVE`` handler for
one ``Dataset`` per sub-operation, so every instance was read with ``dcmread``, re-encoded
and fragmented by pynetdicom's threads (~4.5 ms per CT instance against Orthanc's 1.2 ms).
pynetdicom chooses the service class of a request with
``pynetdicom.association.uid_to_service_class``; ``install()`` wraps that function so the
C-MOVE SOP classes get ``MoveServiceClass``, whose ``_move_scp`` (association thread):

- decodes the identifier and resolves it through the cluster API (``cluster.retrieve``);
- looks the Move Destination up in ``[destinations]`` (unknown: 0xA801);
- starts a ``transfer.deliver.Delivery`` IN THE REACTOR, which sends the stored bytes with
  the Twisted-native SCU (``dicom.scu``);
- reads the delivery's progress queue and sends Pending responses (after sub-operations
  complete: at most ~20 per second, at least one per second), honours C-CANCEL and sends
  the final response with exact counts and the Failed SOP Instance UID List.

An AE without a facade attached (``ae.pacsp2p_facade``) keeps pynetdicom's behaviour.
"""

from __future__ import annotations

import queue
import time
from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom import association as _association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.service_class import QueryRetrieveServiceClass
from twisted.logger import Logger

from pacsp2p.dicom import contexts
from pacsp2p.dicom.identifiers import IdentifierError, to_query
from pacsp2p.transfer.deliver import Delivery
from pacsp2p.transfer.direct import make_delivery
from pacsp2p.dicom.status import (SUCCESS, PENDING, CANCEL, WARNING, TOO_MANY_MATCHES,
                                  ALL_FAILED, MOVE_DEST_UNKNOWN, DOES_NOT_MATCH,
                                  CANNOT_UNDERSTAND, UNABLE_TO_PROCESS, PENDING_MIN_GAP,
                                  PENDING_MAX_GAP)

log = Logger()



class MoveServiceClass(QueryRetrieveServiceClass):
    """Query/Retrieve service class whose C-MOVE sends through ``Delivery``."""

    def _move_scp(self, req, context) -> None:
        facade = getattr(self.ae, "pacsp2p_facade", None)
        if facade is None:
            return super()._move_scp(req, context)
        _Move(self, facade, req, context).run()


def install(ae, facade) -> None:
    """Serve C-MOVE on *ae*'s associations for *facade* (idempotent)."""
    ae.pacsp2p_facade = facade
    original = _association.uid_to_service_class
    if getattr(original, "pacsp2p", False):
        return

    def uid_to_service_class(uid):
        return MoveServiceClass if uid in contexts.QR_MOVE else original(uid)

    uid_to_service_class.pacsp2p = True
    _association.uid_to_service_class = uid_to_service_class


class _Move:
    """One C-MOVE request, answered from its association thread."""

    def __init__(self, service, facade, req, context):
        self.service, self.facade, self.req = service, facade, req
        self.cx_id = context.context_id
        self.ts = context.transfer_syntax[0]
        self.root = contexts.QR_MOVE.get(context.abstract_syntax, "STUDY")

    def respond(self, status, counts=None, failed_uids=None) -> None:
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = self.req.MessageID
        rsp.AffectedSOPClassUID = self.req.AffectedSOPClassUID
        rsp.Status = status
        if counts is not None:
            remaining, completed, failed, warning = counts
            if status in (PENDING, CANCEL):
                rsp.NumberOfRemainingSuboperations = remaining
            rsp.NumberOfCompletedSuboperations = completed
            rsp.NumberOfFailedSuboperations = failed
            rsp.NumberOfWarningSuboperations = warning
        if failed_uids is not None:
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = list(failed_uids)
            rsp.Identifier = BytesIO(encode(ds, self.ts.is_implicit_VR,
                                            self.ts.is_little_endian, self.ts.is_deflated))
        self.service.dimse.send_msg(rsp, self.cx_id)

    def run(self) -> None:
        facade, req = self.facade, self.req
        dest_ae = str(req.MoveDestination or "").strip()
        dest = facade.settings.destinations.get(dest_ae)
        if dest is None:
            log.warn("C-MOVE to unknown destination {ae}", ae=dest_ae)
            return self.respond(MOVE_DEST_UNKNOWN)
        try:
            identifier = decode(req.Identifier, self.ts.is_implicit_VR,
                                self.ts.is_little_endian, self.ts.is_deflated)
            query, _ = to_query(identifier, self.root)
        except IdentifierError as e:
            log.warn("C-MOVE: {err}", err=e)
            return self.respond(DOES_NOT_MATCH)
        except Exception as e:
            log.warn("C-MOVE: undecodable identifier: {err}", err=e)
            return self.respond(CANNOT_UNDERSTAND)
        t0 = time.monotonic()
        try:
            retrieval = facade.call(facade.cluster.retrieve, query)
        except Exception as e:
            log.error("C-MOVE failed: {err}", err=e)
            return self.respond(UNABLE_TO_PROCESS)
        n = len(retrieval.refs)
        if n == 0:
            return self.respond(SUCCESS, (0, 0, 0, 0))
        if n > 0xFFFF:
            log.warn("C-MOVE matches {n} instances: more than a response can count", n=n)
            return self.respond(TOO_MANY_MATCHES)
        requestor = self.service.assoc.requestor.ae_title
        delivery = make_delivery(retrieval, dest, facade.fs.ae_title, facade.reactor,
                                 originator_ae=requestor, originator_msg_id=req.MessageID)
        t1 = time.monotonic()
        facade.reactor.callFromThread(delivery.start)
        final = self.follow(delivery, n)
        t2 = time.monotonic()
        if final is None:
            return                  # the requestor went away
        counts = (final.remaining, final.completed, final.failed, final.warning)
        log.info("C-MOVE {n} instances to {ae} for {req}: {c} completed, {f} failed, "
                 "{w} warning{x} (resolved in {r:.3f} s, delivered in {d:.3f} s)", n=n,
                 ae=dest_ae, req=requestor, c=final.completed, f=final.failed,
                 w=final.warning, x=", cancelled" if final.cancelled else "", r=t1 - t0,
                 d=t2 - t1)
        uids = final.failed_uids or None
        if final.error is not None:
            self.respond(MOVE_DEST_UNKNOWN)
        elif final.cancelled:
            self.respond(CANCEL, counts, uids)
        elif final.failed and not final.completed and not final.warning:
            self.respond(ALL_FAILED, counts, final.failed_uids)
        elif final.failed or final.warning:
            self.respond(WARNING, counts, final.failed_uids)
        else:
            self.respond(SUCCESS, counts)

    def follow(self, delivery: Delivery, n: int):
        """Relay progress as Pending responses until the final Progress (None when the
        requestor released or aborted: the delivery is then cancelled)."""
        reactor, service = self.facade.reactor, self.service
        last_sent, sent, latest, cancelling = float("-inf"), None, None, False
        alive_since = time.monotonic()       # the one-per-second clock
        while True:
            try:
                p = delivery.events.get(timeout=PENDING_MIN_GAP / 2)
                while True:
                    if p.done:
                        return p if service.assoc.is_established else None
                    latest = p
                    p = delivery.events.get_nowait()
            except queue.Empty:
                pass
            if not service.assoc.is_established:
                if not cancelling:
                    cancelling = True
                    log.warn("C-MOVE requestor left: cancelling the delivery")
                    reactor.callFromThread(delivery.cancel)
                continue
            if not cancelling and service.is_cancelled(self.req.MessageID):
                cancelling = True
                reactor.callFromThread(delivery.cancel)
                continue
            now = time.monotonic()
            counts = ((latest.remaining, latest.completed, latest.failed, latest.warning)
                      if latest else (n, 0, 0, 0))
            if (counts != sent and latest and now - last_sent >= PENDING_MIN_GAP) \
                    or now - max(last_sent, alive_since) >= PENDING_MAX_GAP:
                self.respond(PENDING, counts)
                last_sent, sent = now, counts
