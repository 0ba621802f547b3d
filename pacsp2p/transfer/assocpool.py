"""A pool of associations to one C-MOVE destination, fed from one queue of C-STOREs.

PS3.4 C.4.2.3.1 leaves it to the move SCP how it carries a C-MOVE's C-STORE
sub-operations ("re-use an established and compatible Association or establish a new
Association"); with ``[destinations] X = { ..., associations = N }`` a ``Delivery`` sends
them, as many PACS do, over up to N associations at once: a work queue served by N
servers (the next instance goes to whichever association has room, at most ``DEPTH``
C-STOREs handed to one: one on the wire, the next ready behind it). Each association is
a ``dicom.scu.StorageSCU`` negotiating its own presentation contexts; an instance goes
only to one that accepted its SOP class in the syntax it is sent in.

The first association is the delivery's: its failure to open is the delivery's error,
and what it accepted decides how each instance is sent (stored syntax or converted).
The others open in the background once it is up, if the C-MOVE has ``PER_LINK``
instances for each; one that is refused, never answered or lost takes no
more work and is logged once: it fails no sub-operation. A C-STORE that was on an
association lost mid-way goes again on another (once; only a data set held in memory)
while another is up or opening; with none left it fails, as with one association.
``close()`` aborts the associations still being negotiated (a destination that takes one
association at a time never answers them) and releases the others. Reactor thread only.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pacsp2p.dicom import scu

log = Logger()

DEPTH = 2          # C-STOREs handed to one association at a time
PER_LINK = 8       # instances still to send per association, for one more to be opened
_LOST = (scu.AssociationAborted, scu.DimseTimeout)


def _close(f) -> None:
    f.close()


class _Op:
    """One C-STORE waiting in the shared queue (or on an association)."""

    __slots__ = ("args", "payload", "result", "retried")

    def __init__(self, args, payload):
        self.args, self.payload = args, payload     # (sop class, uid, ts, orig AE, orig id)
        self.result = defer.Deferred()
        self.retried = False

    @property
    def again(self) -> bool:
        """Can it be sent again (its data set is in memory, not a consumed file)?"""
        return not self.retried and isinstance(self.payload, (bytes, bytearray, memoryview))


class AssociationPool:
    """Up to *wanted* associations made by *connect()* (Deferred[StorageSCU]); the files
    of C-STOREs never sent are closed in *pool* (a thread pool)."""

    def __init__(self, connect, wanted: int, pool, ae_title: str):
        self.connect, self.wanted = connect, wanted
        self.pool, self.ae_title = pool, ae_title
        self.first = None
        self.links: list = []                 # established, in the order they came up
        self.busy: dict = {}                  # link -> C-STOREs handed to it, unanswered
        self.opening: set = set()             # Deferreds of associations being negotiated
        self.queue: deque[_Op] = deque()
        self.closing = False
        self.cancelled = False                # drop_queued(): nothing is sent again
        self.error: Exception = scu.AssociationAborted(f"no association to {ae_title}")
        self.carried: dict = {}               # link -> C-STOREs it was given

    # -- what the first association accepted ------------------------------------------
    @property
    def accepted(self):
        return self.first.accepted

    def context_for(self, sop_class: str, transfer_syntax: str):
        return self.first.context_for(sop_class, transfer_syntax)

    # -- opening ----------------------------------------------------------------------
    @defer.inlineCallbacks
    def open(self, instances: int):
        """Deferred: the first association (its failure is the caller's), then up to
        ``wanted - 1`` more in the background if *instances* are enough for them."""
        first = yield self.connect()
        self.first = first
        self._up(first)
        for _ in range(min(self.wanted - 1, instances // PER_LINK - 1)):
            d = self.connect()
            self.opening.add(d)
            d.addCallbacks(self._extra_up, self._extra_failed, callbackArgs=(d,),
                           errbackArgs=(d,))
        return first

    def _up(self, link) -> None:
        self.links.append(link)
        self.busy[link] = 0

    def _extra_up(self, link, d):
        self.opening.discard(d)
        if self.closing:                    # (close() cancels those still opening)
            link.abort()
            return
        self._up(link)
        self._pump()

    def _extra_failed(self, failure, d):
        self.opening.discard(d)
        if not self.closing:
            log.warn("C-MOVE to {ae}: another association could not be opened ({err}); "
                     "going on with {n}", ae=self.ae_title, err=failure.getErrorMessage(),
                     n=len(self.links))
        self._pump()                        # nothing left to wait for?

    def _lost(self, link, failure) -> None:
        """*link* ended while in use: it takes no more work."""
        if link not in self.busy:
            return
        self.links.remove(link)
        del self.busy[link]
        self.error = failure.value
        if self.links or self.opening:
            log.warn("C-MOVE to {ae}: an association was lost ({err}); going on with {n}",
                     ae=self.ae_title, err=failure.getErrorMessage(), n=len(self.links))

    # -- sending ----------------------------------------------------------------------
    def store(self, sop_class, uid, transfer_syntax, payload, originator_ae=None,
              originator_msg_id=None):
        """Deferred[C-STORE-RSP status], as ``StorageSCU.store`` (which closes a file
        *payload*), on whichever association has room first."""
        op = _Op((sop_class, uid, transfer_syntax, originator_ae, originator_msg_id),
                 payload)
        self.queue.append(op)
        self._pump()
        return op.result

    def _pump(self) -> None:
        for link in [k for k in self.links if k.state != "established"]:
            self._lost(link, Failure(getattr(link, "_error", None) or scu.AssociationAborted(
                f"association to {self.ae_title} is {link.state}")))   # ended while idle
        while self.queue:
            op = self.queue[0]
            able = [k for k in self.links if k.context_for(op.args[0], op.args[2])]
            if not able:
                if self.opening:
                    return                      # one of those may take it
                self.queue.popleft()            # nobody ever will
                self._give_up(op, self.error if not self.links else scu.NotAccepted(
                    f"{self.ae_title} accepted no context for {op.args[0]} in "
                    f"{op.args[2]}"))
                continue
            link = min(able, key=self.busy.__getitem__)
            if self.busy[link] >= DEPTH:
                return
            self.queue.popleft()
            self.busy[link] += 1
            self.carried[link] = self.carried.get(link, 0) + 1
            link.store(*op.args[:3], op.payload, *op.args[3:]).addBoth(self._sent, link, op)

    def _sent(self, result, link, op):
        if link in self.busy:
            self.busy[link] -= 1
        if isinstance(result, Failure) and result.check(*_LOST) \
                and link.state != "established":
            self._lost(link, result)
            if op.again and (self.links or self.opening) and not (self.closing or
                                                                  self.cancelled):
                op.retried = True
                self.queue.appendleft(op)
                self._pump()
                return
        self._pump()                         # the next one out before anyone is told
        if isinstance(result, Failure):
            op.result.errback(result)
        else:
            op.result.callback(result)

    def _give_up(self, op: _Op, error: Exception) -> None:
        if not isinstance(op.payload, (bytes, bytearray, memoryview)):
            self.pool.callInThread(_close, op.payload)
        op.result.errback(error)

    def drop_queued(self) -> None:
        """Fail (``defer.CancelledError``) every C-STORE not yet begun."""
        self.cancelled = True
        while self.queue:
            self._give_up(self.queue.popleft(), defer.CancelledError("not sent"))
        for link in list(self.links):
            link.drop_queued()

    # -- the end ----------------------------------------------------------------------
    @defer.inlineCallbacks
    def close(self):
        """Deferred: abort the associations still being negotiated, release the others
        (their C-STOREs answered first); failures are logged."""
        self.closing = True
        for d in list(self.opening):
            d.cancel()
        results = yield defer.DeferredList([k.release() for k in self.links],
                                           consumeErrors=True)
        for ok, value in results:
            if not ok:
                log.warn("release of an association to {ae}: {err}", ae=self.ae_title,
                         err=value.getErrorMessage())
