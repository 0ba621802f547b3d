"""Membership: who is in the cluster, how to reach them, and who is alive.

Every peer keeps a mutual-TLS AMP link to every member it knows (a full mesh: right for
the tens of archives a hospital group has) and sends a ``Heartbeat`` on it every
``heartbeat`` seconds. Each member's liveness is judged locally by a phi accrual failure
detector (Hayashibara et al., SRDS 2004) over the arrival times of its heartbeats, so a
peer that dies is seen dead by every other peer independently, without waiting for
rumours. Heartbeats gossip the member list, so a peer that knows a single seed learns
the whole cluster; and they carry the sender's catalog version vector, from which
anti-entropy sync starts. A dead member keeps being dialled (with back-off): when it
returns it rejoins by itself.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields

from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from pacsp2p import __version__
from pacsp2p.flow import ReadHolds
from pacsp2p.overlay import tls
from pacsp2p.overlay.commands import (PROTOCOL, CheckCopy, Commit, Discard, Drain,
                                      Drop, Heartbeat, Hello, IncompatibleProtocol,
                                      ReplicaClose, ReplicaData, ReplicaOpen, Replicate,
                                      SendTo, as_refusal, check, check_archive_names,
                                      check_send_to)
from pacsp2p.overlay.detector import PhiAccrualDetector

log = Logger()

ALIVE, DEAD, JOINING = "alive", "dead", "joining"


@dataclass(frozen=True)
class MemberInfo:
    """How to reach a peer (gossiped)."""

    name: str
    host: str
    port: int
    bulk_port: int
    facade_ae: str = ""
    facade_port: int = 0
    incarnation: float = 0.0
    archives: list = field(default_factory=list, hash=False)   # [[name, site], ...]
    site: str | None = None
    # names of its archives that stopped answering (a separate key, so that peers of
    # an older version, which ignore unknown keys, keep reading ``archives``)
    archives_down: list = field(default_factory=list, hash=False)
    # its archives being drained: {name: "draining" | "blocked" | "drained"}; placement
    # on every peer leaves them out (transfer.drain)
    draining: dict = field(default_factory=dict, hash=False)


_INFO_FIELDS = frozenset(f.name for f in fields(MemberInfo))


@dataclass
class Member:
    info: MemberInfo
    state: str = JOINING
    since: float = field(default_factory=time.time)
    detector: PhiAccrualDetector = field(default_factory=PhiAccrualDetector)
    link: "Link | None" = None
    dialing: bool = False
    backoff: float = 0.25

    @property
    def name(self):
        return self.info.name

    @property
    def host(self):
        return self.info.host

    @property
    def bulk_port(self):
        return self.info.bulk_port


@implementer(IHandshakeListener)
class Link(ReadHolds, amp.AMP):
    """One overlay connection; the other end is known by its certificate's name."""

    def __init__(self, membership, outbound: bool, member=None):
        super().__init__()
        self.membership = membership
        self.outbound = outbound
        self.member = member                 # the member dialled (outbound, if known)
        self.peer_name: str | None = None
        self.handshake_done = False
        self.open = False                    # TLS up and not yet lost
        self.full = False                    # our transport's write buffer is full
        self.pushers: set = set()            # told when it fills and drains (forward.Push)

    # -- IPushProducer: the transport tells us when its write buffer fills and drains
    def pauseProducing(self):
        self.full = True
        for p in list(self.pushers):
            p.link_full()

    def resumeProducing(self):
        self.full = False
        for p in list(self.pushers):
            p.link_drained()

    def stopProducing(self):
        """The link is going: connectionLost fails what was pushed on it."""

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

    def lengthLimitExceeded(self, length):
        self._keyLengthLimitExceeded = True
        self.close()

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
        if self.membership.services is not None:
            self.membership.services.link_lost(self)
        if not self.handshake_done:
            log.warn("overlay link {dir} {host}:{port} refused: {why}",
                     dir="to" if self.outbound else "from", host=self.address.host,
                     port=self.address.port,
                     why=tls.refusal(self.transport, reason.getErrorMessage()))
        self.membership.link_lost(self)

    @Hello.responder
    def on_hello(self, name, protocol, software, info):
        self.membership.check_hello(self, name, protocol, software)
        self.membership.learn(json.loads(info), self)
        return {"name": self.membership.name, "protocol": PROTOCOL,
                "software": __version__, "info": json.dumps(asdict(self.membership.me))}

    @Replicate.responder
    def on_replicate(self, archive, uid, sha256, token, meta=None):
        check(uid=uid, sha256=sha256, archive=archive, token=token)
        d = self.membership.services.replicate(self.peer_name, archive, uid, sha256, token,
                                               meta)
        d.addErrback(as_refusal, uid)
        return d.addCallback(lambda s: {"duplicate": s.duplicate, "conflict": s.conflict,
                                        "size": s.size, "sha256": s.sha256})

    @ReplicaOpen.responder
    def on_replica_open(self, stream, archive, uid, head, meta):
        check(uid=uid, archive=archive)
        d = self.membership.services.open_stream(self, stream, archive, uid, head, meta)
        return d.addCallback(lambda s: {"duplicate": s.duplicate, "conflict": s.conflict,
                                        "size": s.size, "sha256": s.sha256})

    @ReplicaData.responder
    def on_replica_data(self, stream, data):
        self.membership.services.stream_data(self, stream, data)
        return {}

    @ReplicaClose.responder
    def on_replica_close(self, stream, complete):
        self.membership.services.close_stream(self, stream, complete)
        return {}

    @Commit.responder
    def on_commit(self, archive, uid, sha256):
        check(uid=uid, sha256=sha256, archive=archive)
        return self.membership.services.commit(archive, uid, sha256).addCallbacks(
            lambda seq: {"seq": seq}, as_refusal, errbackArgs=(uid,))

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
                   originator_msg_id, uids):
        uids = check_send_to(ae_title, host, port, calling_ae, originator_ae, uids)
        return self.membership.services.send_to(ae_title, host, port, calling_ae,
                                                originator_ae, originator_msg_id, uids)

    @Heartbeat.responder
    def on_heartbeat(self, name, incarnation, members, vector):
        if name != self.peer_name:
            self.close()
            return {}
        self.membership.heard(name, incarnation, json.loads(members), json.loads(vector))
        return {}


class _Factory(protocol.ClientFactory):
    def __init__(self, membership, outbound, member=None):
        self.membership, self.outbound, self.member = membership, outbound, member
        self.noisy = False

    def buildProtocol(self, addr):
        return Link(self.membership, self.outbound, self.member)

    def clientConnectionFailed(self, connector, reason):
        if self.member is not None:
            self.membership.dial_failed(self.member)


class Membership:
    def __init__(self, me: MemberInfo, credentials, seeds, reactor, vector_of,
                 heartbeat: float = 0.5, phi_threshold: float = 8.0):
        self.me = me
        self.name = me.name
        self.credentials = credentials
        self.seeds = list(seeds)
        self.reactor = reactor
        self.vector_of = vector_of          # () -> {origin: seq}
        self.heartbeat = heartbeat
        self.phi_threshold = phi_threshold
        self.members: dict[str, Member] = {}
        self.on_vector = []                 # callbacks(member, vector)
        self.on_change = []                 # callbacks(member, state)
        self.services = None                # answers Replicate/Commit/Discard
        self._loops = []
        self._seed_links: dict[tuple, bool] = {}
        self.running = False

    # -- life cycle ------------------------------------------------------------------
    def start(self):
        self.running = True
        for fn, every in ((self._beat, self.heartbeat), (self._judge, self.heartbeat / 2),
                          (self._dial_seeds, 2.0)):
            loop = task.LoopingCall(fn)
            loop.clock = self.reactor
            loop.start(every, now=True)
            self._loops.append(loop)

    def stop(self):
        self.running = False
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for m in self.members.values():
            if m.link is not None:
                m.link.close()

    def factory(self):
        return _Factory(self, outbound=False)

    # -- dialling --------------------------------------------------------------------
    def _connect(self, host, port, member=None):
        factory = _Factory(self, outbound=True, member=member)
        self.reactor.connectSSL(host, port, factory, self.credentials.options(), timeout=5)

    def _dial_seeds(self):
        """Seeds are dialled until some member is alive (then gossip does the rest)."""
        if any(m.state == ALIVE for m in self.members.values()):
            return
        for host, port in self.seeds:
            if (host, port) != (self.me.host, self.me.port):
                self._connect(host, port)

    def _dial(self, member: Member):
        if not self.running or member.link is not None or member.dialing:
            return
        member.dialing = True
        self._connect(member.info.host, member.info.port, member)

    def _redial_later(self, member: Member):
        member.backoff = min(member.backoff * 2, 2.0)
        self.reactor.callLater(member.backoff, self._dial, member)

    # -- links -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def hello(self, link: Link):
        try:
            answer = yield link.callRemote(Hello, name=self.name, protocol=PROTOCOL,
                                           software=__version__,
                                           info=json.dumps(asdict(self.me)))
            self.check_hello(link, answer["name"], answer["protocol"], answer["software"])
        except IncompatibleProtocol as e:
            log.error("overlay: {err}", err=e)
            link.close()
            return
        except Exception as e:
            log.warn("overlay: hello to {peer} failed: {err}", peer=link.peer_name, err=e)
            link.close()
            return
        info = json.loads(answer["info"])
        if info["name"] == self.name:
            link.close()     # a seed that is ourselves
            return
        member = self.learn(info, link)
        if member.link is not None and member.link is not link and member.link.open:
            link.member = None
            link.close()     # already linked
            return
        link.member = member
        member.link, member.dialing, member.backoff = link, False, 0.25
        self._beat_one(member)

    def check_hello(self, link, name, protocol, software):
        if name != link.peer_name:
            link.close()
            raise IncompatibleProtocol(
                f"peer says it is {name!r} but its certificate is for {link.peer_name!r}")
        if protocol != PROTOCOL:
            raise IncompatibleProtocol(
                f"peer {name} (pacsp2p {software}) speaks overlay protocol {protocol}, "
                f"this peer (pacsp2p {__version__}) speaks {PROTOCOL}: upgrade one of them")

    def dial_failed(self, member: Member):
        member.dialing = False
        if self.running:
            self._redial_later(member)

    def link_lost(self, link: Link):
        for member in self.members.values():
            if member.link is link:
                member.link = None
                self.dial_failed(member)
        if link.member is not None and link.member.dialing:
            self.dial_failed(link.member)

    def learn(self, info: dict, link=None) -> Member:
        # keys a newer peer of the same protocol adds are ignored (rolling upgrades)
        info = MemberInfo(**{k: v for k, v in info.items() if k in _INFO_FIELDS})
        member = self.members.get(info.name)
        if not info.host:                   # no advertised address: where it dialled from
            host = link.address.host if link is not None else (
                member.info.host if member is not None else "")
            if not host:
                return member
            info = MemberInfo(**{**asdict(info), "host": host})
        if member is None:
            member = self.members[info.name] = Member(info)
            log.info("overlay: learned of peer {name} at {host}:{port}", name=info.name,
                     host=info.host, port=info.port)
            self.reactor.callLater(0, self._dial, member)
        elif info.incarnation >= member.info.incarnation and info != member.info:
            member.info = info
        return member

    # -- heartbeats and judgement ----------------------------------------------------
    def _gossip(self) -> str:
        infos = [asdict(self.me)] + [asdict(m.info) for m in self.members.values()
                                     if m.state != DEAD]
        return json.dumps(infos)

    def _beat(self):
        members, vector = self._gossip(), json.dumps(self.vector_of())
        for member in self.members.values():
            self._beat_one(member, members, vector)

    def _beat_one(self, member, members=None, vector=None):
        if member.link is None or not member.link.open:
            return
        try:
            member.link.callRemote(Heartbeat, name=self.name, incarnation=self.me.incarnation,
                                   members=members or self._gossip(),
                                   vector=vector or json.dumps(self.vector_of()))
        except Exception as e:
            log.warn("heartbeat to {peer} not sent: {err!r}", peer=member.name, err=e)

    def heard(self, name, incarnation, members, vector):
        now = self.reactor.seconds()
        member = self.members.get(name)
        if member is None:
            for info in members:
                if info["name"] == name:
                    member = self.learn(info)
            if member is None:
                return
        if incarnation > member.info.incarnation:
            member.info = MemberInfo(**{**asdict(member.info), "incarnation": incarnation})
            member.detector = PhiAccrualDetector(first_interval=self.heartbeat)
        member.detector.heartbeat(now)
        if member.state != ALIVE:
            self._set_state(member, ALIVE)
        for info in members:
            if info["name"] != self.name:
                self.learn(info)
        for callback in self.on_vector:
            callback(member, vector)

    def _judge(self):
        now = self.reactor.seconds()
        for member in self.members.values():
            if member.link is not None and member.link.reading_held():
                continue            # we stopped reading it (pushed data waits for disk)
            if member.state == ALIVE and member.detector.phi(now) > self.phi_threshold:
                self._set_state(member, DEAD)
                member.detector = PhiAccrualDetector(first_interval=self.heartbeat)
                if member.link is not None:      # fail what waits on it; redialled later
                    member.link.close(abort=True)

    def _set_state(self, member, state):
        old, member.state, member.since = member.state, state, time.time()
        if state == DEAD:
            log.warn("overlay: peer {name} is dead (no heartbeat, phi > {t})",
                     name=member.name, t=self.phi_threshold)
        elif old == DEAD:
            log.info("overlay: peer {name} is back", name=member.name)
        else:
            log.info("overlay: peer {name} joined", name=member.name)
        for callback in self.on_change:
            callback(member, state)

    # -- queries ---------------------------------------------------------------------
    def alive(self, name: str) -> bool:
        if name == self.name:
            return True
        m = self.members.get(name)
        return m is not None and m.state == ALIVE

    def status(self) -> list[dict]:
        now = self.reactor.seconds()
        rows = [{"name": self.name, "state": "self", "address": f"{self.me.host}:{self.me.port}",
                 "facade": f"{self.me.facade_ae}@{self.me.facade_port}"}]
        for m in sorted(self.members.values(), key=lambda m: m.name):
            rows.append({"name": m.name, "state": m.state,
                         "address": f"{m.info.host}:{m.info.port}",
                         "facade": f"{m.info.facade_ae}@{m.info.facade_port}",
                         "phi": round(m.detector.phi(now), 2), "since": m.since,
                         "linked": m.link is not None})
        return rows

    def call(self, name: str, command, **kwargs):
        """Deferred answer of *command* sent to member *name* on our link to it."""
        member = self.members.get(name)
        if member is None or member.link is None or not member.link.open:
            return defer.fail(ConnectionError(f"no link to peer {name}"))
        return member.link.callRemote(command, **kwargs)
