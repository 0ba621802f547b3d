"""Direct delivery: every source sends its share of a C-MOVE straight to the destination.

With ``[destinations] X = { address = "...", mode = "direct" }`` the requesting peer does
not relay instance bytes. It splits the instances among their live holder peers (each
instance to the holder with the least work so far; among equals, the one replica
selection ranks first), then each holder sends its share
itself: this peer through its own ``Delivery``, another peer on ``SendTo`` (in chunks, so
progress flows back), a vendor archive that can (``send`` capability) by its own
C-MOVE. Zero copies through the requesting peer; the destination must accept
associations from every source. A holder that fails mid-way has its unfinished share
handed to another holder; an instance no live holder has is a failed sub-operation.
A cancel (the requestor left, a C-CANCEL) stops every share: this peer's delivery, and
each holder's ``SendTo`` under way by ``CancelSend`` (a holder also stops the shares of
a link that is lost); what each had queued is not sent.

Same interface as :class:`pacsp2p.transfer.deliver.Delivery`: ``start()`` (Deferred of
the final :class:`Progress`), ``cancel()``,
``listeners`` (callables given each Progress in the reactor: the native facade).
"""

from __future__ import annotations

import itertools
import json

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.overlay.commands import CancelSend, SendTo
from pacsp2p.transfer.deliver import Delivery, Progress, Tally
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.types import Query

log = Logger()

CHUNK = 50
_send_ids = itertools.count(1)


class _Relay:
    """A listener of a sub-delivery: counts its progress into ours."""

    def __init__(self, owner):
        self.owner, self.seen = owner, (0, 0, 0)

    def __call__(self, p: Progress):
        done = (p.completed, p.failed, p.warning)
        delta = [a - b for a, b in zip(done, self.seen)]
        self.seen = done
        self.owner._count(*delta)


class DirectDelivery(Tally):
    def __init__(self, retrieval, destination, calling_ae: str, reactor, *,
                 originator_ae: str | None = None, originator_msg_id: int | None = None,
                 chunk: int = CHUNK):
        super().__init__(retrieval, destination, calling_ae, reactor, originator_ae,
                         originator_msg_id)
        self.chunk = chunk
        self._local: list[Delivery] = []
        self._remote: set = set()              # (holder, send_id) of SendTos under way

    def _count(self, completed=0, failed=0, warning=0, failed_uids=()):
        self.completed += completed
        self.failed += failed
        self.warning += warning
        self.failed_uids.extend(failed_uids)
        self._tell(self.progress())

    def cancel(self):
        self.cancelled = True
        for d in self._local:
            d.cancel()
        membership = self.retrieval.overlay.membership
        for holder, send_id in sorted(self._remote):
            d = defer.maybeDeferred(membership.call, holder, CancelSend, send_id=send_id)
            d.addErrback(self._not_cancelled, holder)

    def _not_cancelled(self, failure, holder):
        log.warn("direct delivery: cannot cancel {peer}'s share: {err}", peer=holder,
                 err=failure.getErrorMessage())

    # -- the run -----------------------------------------------------------------------
    def start(self):
        d = self._run()
        d.addErrback(self._crashed)
        return self.finished

    def _crashed(self, failure):
        log.failure("direct delivery failed", failure)
        self.error = failure.getErrorMessage()
        self._end()

    def _end(self):
        if not self.finished.called:
            final = self.progress(done=True)
            self._tell(final)
            self.finished.callback(final)

    @defer.inlineCallbacks
    def _run(self):
        pending = list(self.refs)
        excluded: dict[str, set] = {}          # uid -> holders that failed it
        while pending and not self.cancelled:
            shares, orphans = self._split(pending, excluded)
            for ref in orphans:
                self._count(failed=1, failed_uids=[ref.sop_instance_uid])
            results = yield defer.DeferredList(
                [self._send_share(holder, refs) for holder, refs in shares.items()],
                consumeErrors=True)
            pending = []
            for (holder, refs), (ok, unsent) in zip(shares.items(), results):
                for ref in (unsent if ok else refs):
                    excluded.setdefault(ref.sop_instance_uid, set()).add(holder)
                    pending.append(ref)
        self._end()

    def _split(self, refs, excluded):
        """Each instance to the live holder peer with the least work so far (ties: the
        first in replica selection's ranking)."""
        load: dict[str, int] = {}
        shares: dict[str, list] = {}
        orphans = []
        for ref in refs:
            try:
                ranked = self.retrieval.sources(ref)
            except Exception as e:                   # a selection plugin failed
                log.error("direct delivery: {err}; catalog order", err=e)
                ranked = self.retrieval.reachable(ref)
            order = list(dict.fromkeys(loc.peer for loc in ranked))
            gone = excluded.get(ref.sop_instance_uid, set())
            holders = [h for h in order if h not in gone]
            if not holders:
                orphans.append(ref)
                continue
            holder = min(holders, key=lambda h: (load.get(h, 0), holders.index(h)))
            load[holder] = load.get(holder, 0) + 1
            shares.setdefault(holder, []).append(ref)
        return shares, orphans

    @defer.inlineCallbacks
    def _send_share(self, holder: str, refs):
        """Send *refs* from *holder*; return the refs it could not send (to retry)."""
        if holder == self.retrieval.peer:
            log.info("direct delivery: sending {n} instances to {ae} from this peer",
                     n=len(refs), ae=self.destination.ae_title)
            sub = Retrieval(refs, self.retrieval.archives, holder, None,
                            self.retrieval.strategies, reactor=self.reactor)
            sub.on_damaged = self.retrieval.on_damaged    # not sent; the scrub mends it
            delivery = Delivery(sub, self.destination, self.calling_ae, self.reactor,
                                originator_ae=self.originator[0],
                                originator_msg_id=self.originator[1])
            delivery.listeners.append(_Relay(self))
            self._local.append(delivery)
            final = yield delivery.start()
            if final.error:
                raise IOError(final.error)
            self.failed_uids.extend(final.failed_uids)
            return []
        membership = self.retrieval.overlay.membership
        for i in range(0, len(refs), self.chunk):
            if self.cancelled:
                return []
            part = refs[i:i + self.chunk]
            key = (holder, next(_send_ids))
            self._remote.add(key)
            try:
                answer = yield membership.call(
                    holder, SendTo, ae_title=self.destination.ae_title,
                    host=self.destination.host, port=self.destination.port,
                    calling_ae=self.calling_ae, originator_ae=self.originator[0] or "",
                    originator_msg_id=self.originator[1] or 0,
                    uids=json.dumps([r.sop_instance_uid for r in part]),
                    associations=getattr(self.destination, "associations", 1),
                    send_id=key[1])
            except Exception as e:
                log.warn("direct delivery: {peer} failed to send its share: {err}; "
                         "handing it to other holders", peer=holder, err=e)
                return refs[i:]
            finally:
                self._remote.discard(key)
            self._count(answer["completed"], answer["failed"], answer["warning"],
                        json.loads(answer["failed_uids"]))
        return []


def send_for(catalog, archives, me, destination, calling_ae, originator_ae,
             originator_msg_id, uids: list[str], reactor):
    """The SendTo responder: send the instances this peer's archives hold. The Deferred's
    ``stop()`` cancels the send (``CancelSend``): the answer then counts what was sent."""
    running: list = []                   # the delivery, once made
    stopped: list = []

    def stop():
        stopped.append(True)
        for delivery in running:
            delivery.cancel()

    @defer.inlineCallbacks
    def run():
        refs = yield catalog.resolve(Query("IMAGE", {"SOPInstanceUID": "\\".join(uids)}),
                                     current=True)
        if stopped:                      # cancelled before it started: nothing sent
            return {"completed": 0, "failed": 0, "warning": 0, "failed_uids": "[]"}
        mine = [r for r in refs if any(loc.peer == me for loc in r.locations)]
        missing = sorted(set(uids) - {r.sop_instance_uid for r in mine})
        log.info("direct delivery: sending {n} instances to {ae} for {ae_from}",
                 n=len(mine), ae=destination.ae_title, ae_from=calling_ae)
        sub = Retrieval(mine, archives, me, None, reactor=reactor)
        delivery = Delivery(sub, destination, calling_ae, reactor,
                            originator_ae=originator_ae or None,
                            originator_msg_id=originator_msg_id or None)
        running.append(delivery)
        final = yield delivery.start()
        if final.error:
            raise IOError(final.error)
        return {"completed": final.completed, "failed": final.failed + len(missing),
                "warning": final.warning,
                "failed_uids": json.dumps(list(final.failed_uids) + missing)}
    d = run()
    d.stop = stop
    return d


def make_delivery(retrieval, destination, calling_ae, reactor, **kwargs):
    """Delivery for a destination's mode: relay (default) or direct."""
    if getattr(destination, "mode", "relay") == "direct" and retrieval.overlay is not None:
        return DirectDelivery(retrieval, destination, calling_ae, reactor, **kwargs)
    return Delivery(retrieval, destination, calling_ae, reactor, **kwargs)
