"""One overlay link: an AMP connection over mutual TLS to another peer, known by its
certificate's name, with the responders of the commands declared in
``overlay.commands`` (every argument checked there before use) and ``_Factory`` that
dials one. Membership (``overlay.membership``) owns the pool of links.
"""

from __future__ import annotations

import json

from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import LogLevel, Logger
from twisted.protocols import amp
from zope.interface import implementer

from pacsp2p import __version__
from pacsp2p.flow import ReadHolds
from pacsp2p.overlay import tls
from pacsp2p.overlay.commands import (PROTOCOL, CancelSend, CheckCopy, Commit, Commits,
                                      Discard, Drain, Drop, Hello, ReplicaClose,
                                      ReplicaData, ReplicaOpen, Replicate, SendTo, Vector,
                                      as_refusal, check, check_archive_names,
                                      check_commits, check_origins, check_send_id,
                                      check_send_to, receipt)
from pacsp2p.overlay.commands import Swim as SwimMessage

log = Logger()

MAX_BOX_KEYS = 32       # keys of one AMP box: a command's arguments (10 at most) and
                        # AMP's own (_command, _ask, ...), with room; AMP bounds a key
                        # (255 bytes) and a value (64 KiB), not their number
MAX_UNREAD = 32 << 20   # bytes written to a link while its transport is full: its other
                        # end reads nothing (pushes stop at full, a box or so each
                        # after it: 32 C-STOREs x 256 KB = 8 MB; answers are small)


@implementer(IHandshakeListener)
class Link(ReadHolds, amp.AMP):
    """One overlay connection; the other end is known by its certificate's name."""

    def __init__(self, membership, outbound: bool, expect: str | None = None,
                 seed: tuple | None = None):
        super().__init__()
        self.membership = membership
        self.outbound = outbound
        self.expect = expect                 # the member dialled (outbound), if known
        self.seed = seed                     # (host, port) dialled as a seed: full states
        self.peer_name: str | None = None
        self.handshake_done = False
        self.greeted = False                 # Hello done: it may carry protocol messages
        self.open = False                    # TLS up and not yet lost
        self.full = False                    # our transport's write buffer is full
        self.pushers: set = set()            # told when it fills and drains (forward.Push)
        self.values = 1                      # values a pushed box may carry (Hello info)
        self.push_port = 0                   # its push port (Hello info), 0: none
        self.push_commits = False            # it takes Commits on its push port (Hello)
        self.commit_last = False             # and COMMIT_LAST behind a copy (Hello)
        self.inflight = 0                    # commands of the other side being answered
        self.sends: dict = {}                # its SendTos under way, by send_id
        self._box_refused = False            # a box of too many keys: closing
        self._unread = 0                     # bytes written since the transport filled

    # -- IPushProducer: the transport tells us when its write buffer fills and drains
    def pauseProducing(self):
        self.full = True
        for p in list(self.pushers):
            p.link_full()

    def resumeProducing(self):
        self.full = False
        self._unread = 0
        for p in list(self.pushers):
            p.link_drained()

    def stopProducing(self):
        """The link is going: connectionLost fails what was pushed on it."""

    def sendBox(self, box):
        """A box written while the transport is full is counted: past ``MAX_UNREAD`` the
        other end has read nothing for that long (a client asking and never reading the
        answers grew our memory by them) and the link is closed."""
        if self.full and not self._box_refused:
            self._unread += sum(len(k) + len(v) + 4 for k, v in box.items())
            if self._unread > MAX_UNREAD:
                self._box_refused = True
                self.membership.refusal_log(
                    "overlay box refused", LogLevel.warn,
                    "overlay link {dir} {peer}: {n} MB written that it does not read: "
                    "closing", dir="to" if self.outbound else "from",
                    peer=self.peer_name or self.address.host, n=MAX_UNREAD >> 20)
                self.close(abort=True)
                return
        super().sendBox(box)

    def close(self, abort: bool = False) -> None:
        """Close the link (``abort``: now, without flushing). We are our transport's
        producer, and a transport with a producer would wait for it forever."""
        if self.transport is None:
            return
        self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def busy(self) -> bool:
        """Something is under way on it (closing it would fail it)."""
        return bool(self._outstandingRequests or self.pushers or self.inflight or
                    self.reading_held())

    def dispatchCommand(self, box):
        self.inflight += 1
        d = super().dispatchCommand(box)

        def done(result):
            self.inflight -= 1
            return result
        return d.addBoth(done)

    def proto_value(self, string):
        """A box of more keys than any command has closes the link (kept whole in memory
        until its end, it grew without bound)."""
        if len(self._currentBox) >= MAX_BOX_KEYS:
            self._currentBox.clear()             # (the rest of this read: dropped too)
            if not self._box_refused:
                self._box_refused = True
                self.membership.refusal_log(
                    "overlay box refused", LogLevel.warn,
                    "overlay link {dir} {peer}: an AMP box of more than {n} keys: closing",
                    dir="to" if self.outbound else "from",
                    peer=self.peer_name or self.address.host, n=MAX_BOX_KEYS)
                self.close(abort=True)
        return super().proto_value(string)

    def lengthLimitExceeded(self, length):
        """Garbage (a length past AMP's bound): aborted, not closed gracefully, which over
        TLS waits for the other end while AMP keeps what still comes (76 MB of random
        bytes in 120 s: RSS +157 MB)."""
        self._keyLengthLimitExceeded = True
        self.close(abort=True)

    def unhandledError(self, failure):
        log.failure("overlay link to {peer}: unexpected error", failure,
                    peer=self.peer_name)
        self.close()

    def reading_allowed(self) -> bool:
        return self.open

    def handshakeCompleted(self):
        self.handshake_done = self.open = True
        self.peer_name = tls.peer_name(self.transport)
        if self.outbound:
            self.membership.hello(self)

    def makeConnection(self, transport):
        self.address = transport.getPeer()
        transport.setTcpNoDelay(True)      # else small answers wait for delayed ACKs
        amp.BinaryBoxProtocol.makeConnection(self, transport)   # without AMP's log lines
        transport.registerProducer(self, True)

    def connectionLost(self, reason):
        self.open = False
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        for send_id in list(self.sends):     # the asking peer cannot hear of them: its
            self._stop_send(send_id)         # C-MOVE hands them to other holders
        if self.membership.services is not None:
            self.membership.services.link_lost(self)
        if not self.handshake_done:        # rate-limited: anyone can open a link
            self.membership.refusal_log(
                "overlay link refused", LogLevel.warn,
                "overlay link {dir} {host}:{port} refused: {why}",
                dir="to" if self.outbound else "from", host=self.address.host,
                port=self.address.port,
                why=tls.refusal(self.transport, reason.getErrorMessage()))
        self.membership.link_lost(self)

    @Hello.responder
    def on_hello(self, name, protocol, software, info):
        self.membership.check_hello(self, name, protocol, software)
        self.membership.greeted(self, info)
        return {"name": self.membership.name, "protocol": PROTOCOL,
                "software": __version__, "info": self.membership.hello_info()}

    @SwimMessage.responder
    def on_swim(self, msg):
        if self.greeted:
            self.membership.swim.receive(self.peer_name, msg)
        return {}

    @Vector.responder
    def on_vector(self, origins):
        wanted = check_origins(origins)
        held = self.membership.vector_of()
        return {"vector": json.dumps({o: held.get(o, 0) for o in wanted})}

    @Replicate.responder
    def on_replicate(self, archive, uid, sha256, token, meta=None):
        check(uid=uid, sha256=sha256, archive=archive, token=token)
        d = self.membership.services.replicate(self.peer_name, archive, uid, sha256, token,
                                               meta)
        d.addErrback(as_refusal, uid)
        return d.addCallback(receipt)

    @ReplicaOpen.responder
    def on_replica_open(self, stream, archive, uid, head, meta, data=None, end=None,
                        more1=None, more2=None, more3=None):
        check(uid=uid, archive=archive)
        d = self.membership.services.open_stream(self, stream, archive, uid, head, meta)
        self._pushed(stream, (data, more1, more2, more3), end)
        return d.addCallback(receipt)

    @ReplicaData.responder
    def on_replica_data(self, stream, data, end=None, more1=None, more2=None, more3=None):
        self._pushed(stream, (data, more1, more2, more3), end)
        return {}

    def _pushed(self, stream, pieces, end) -> None:
        """The bytes of a pushed data set one box carried (and its end, if it says so)."""
        services = self.membership.services
        for piece in pieces:
            if piece:
                services.stream_data(self, stream, piece)
        if end:
            services.close_stream(self, stream, True)

    @ReplicaClose.responder
    def on_replica_close(self, stream, complete):
        self.membership.services.close_stream(self, stream, complete)
        return {}

    @Commit.responder
    def on_commit(self, archive, uid, sha256):
        check(uid=uid, sha256=sha256, archive=archive)
        return self.membership.services.commit(archive, uid, sha256).addCallbacks(
            lambda seq: {"seq": seq}, as_refusal, errbackArgs=(uid,))

    @Commits.responder
    def on_commits(self, copies):
        return self.membership.services.commits(check_commits(copies)).addCallback(
            lambda answer: {k: json.dumps(v) for k, v in answer.items()})

    @Discard.responder
    def on_discard(self, archive, uid, sha256):
        check(uid=uid, sha256=sha256, archive=archive)
        return self.membership.services.discard(archive, uid, sha256).addCallbacks(
            lambda _: {}, as_refusal, errbackArgs=(uid,))

    @Drop.responder
    def on_drop(self, archive, uid, sha256):
        check(uid=uid, sha256=sha256, archive=archive)
        return self.membership.services.drop(archive, uid, sha256).addCallbacks(
            lambda _: {}, as_refusal, errbackArgs=(uid,))

    @Drain.responder
    def on_drain(self, archives, stop):
        names = check_archive_names(archives)
        d = self.membership.services.drain(self.peer_name, names, stop)
        return d.addCallback(lambda a: {"archives": json.dumps(a["archives"]),
                                        "copies": a["copies"]})

    @CheckCopy.responder
    def on_check_copy(self, archive, uid, sha256):
        check(uid=uid, sha256=sha256, archive=archive)
        self.membership.services.check_copy(self.peer_name, archive, uid, sha256)
        return {}

    @SendTo.responder
    def on_send_to(self, ae_title, host, port, calling_ae, originator_ae,
                   originator_msg_id, uids, associations=None, send_id=None):
        uids = check_send_to(ae_title, host, port, calling_ae, originator_ae, uids,
                             associations, send_id)
        d = self.membership.services.send_to(ae_title, host, port, calling_ae,
                                             originator_ae, originator_msg_id, uids,
                                             associations or 1)
        if send_id is not None and callable(getattr(d, "stop", None)):
            self._stop_send(send_id)         # (an id used again: the older one stops)
            self.sends[send_id] = d
            d.addBoth(self._send_ended, send_id, d)
        return d

    def _send_ended(self, result, send_id, d):
        if self.sends.get(send_id) is d:
            del self.sends[send_id]
        return result

    def _stop_send(self, send_id) -> None:
        d = self.sends.pop(send_id, None)
        if d is not None:
            d.stop()                         # (``transfer.direct.send_for``)

    @CancelSend.responder
    def on_cancel_send(self, send_id):
        self._stop_send(check_send_id(send_id))
        return {}


class _Factory(protocol.ClientFactory):
    def __init__(self, membership, outbound, expect=None, seed=None):
        self.membership, self.outbound = membership, outbound
        self.expect, self.seed = expect, seed
        self.noisy = False

    def buildProtocol(self, addr):
        return Link(self.membership, self.outbound, self.expect, self.seed)

    def clientConnectionFailed(self, connector, reason):
        if self.expect is not None:
            self.membership.dial_failed(self.expect)
