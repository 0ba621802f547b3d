"""Membership over mutual-TLS AMP: the peer's adapter of the SWIM core.

Who is in the cluster and who is alive is decided by SWIM with the Lifeguard
refinements (Das, Gupta & Motivala, DSN 2002; Dadgar, Phillips & Currey, 2018), whose
transport-agnostic core is ``swim.py`` (the same code runs in ``bench/overlay_sim.py``).
This module gives it a transport: each protocol message is one ``Swim`` AMP command
(one-way, at most ``swim.MAX_MESSAGE`` bytes) on a mutual-TLS link to the member it is
for, whose name is its certificate's name (a message's sender is the link's verified
name, never what the message says).

Links are opened on demand — to send a probe, a piggybacked update or a replica command
to a member we hold no link to — and kept in a pool of at most ``max_links`` (LRU: the
least recently used idle link is closed when a new one would exceed it; a link busy with
a command, a pushed data set or held reading is never closed). So a peer holds O(1)
links whatever the size of the cluster, not one to every member. Two peers that dial each
other at once keep the link dialled by the one with the smaller name.

A peer joins through its seeds (``[overlay] seeds``, dialled every 2 s until some member
is alive): a full state exchange with the first that answers, then SWIM's gossip. A
member declared dead has its links closed (what waited on them fails at once); it is
offered a full state now and then (``reconnect_interval``) and, if it was only cut off,
refutes its death by itself. Readers elsewhere see ``members`` ({name: Member} with
``info`` (MemberInfo), ``state`` alive/suspect/dead, ``since``), ``alive(name)``,
``on_change`` and ``on_vector`` callbacks, and ``call(name, command, ...)``.

One name, one process (``merge.py``, ``claims.py``): a link whose Hello claims a name
that a live member holds at another address is refused; a peer refused so while it
joins stops with one line saying where its name is in use.
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p import __version__
from pacsp2p.clock import wall
from pacsp2p.overlay.commands import (PROTOCOL, REPLICA_VALUES, Hello, IncompatibleProtocol,
                                      NameInUse)
from pacsp2p.overlay.commands import Swim as SwimMessage
from pacsp2p.overlay.claims import Claims
from pacsp2p.overlay.swim import Swim
from pacsp2p.overlay.swimparts import (ALIVE, DEAD, MAX_INFO, SUSPECT, Invalid, Node,
                                       SwimConfig, encode)
from pacsp2p.dicom.admission import LogLimit
from pacsp2p.overlay import link as _link
from pacsp2p.overlay.link import Link, _Factory

log = Logger()

JOINING = "joining"                     # (kept for readers; SWIM members are never in it)
MAX_LINKS = 32
DIAL_TIMEOUT = 10.0                     # seconds to connect, shake hands and say Hello
OUTBOX = 8                              # messages kept for a member while dialling it
SEED_EVERY = 2.0


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
    # its read port (reads.Reads on threadtls), 0: none (an older peer: its bulk_port)
    read_port: int = 0


_INFO_FIELDS = frozenset(f.name for f in fields(MemberInfo))


def _text(x, n=255, empty=True) -> bool:
    return isinstance(x, str) and (empty or x) and len(x) <= n and x.isprintable()


def _port(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 65536


def check_info(wire) -> dict:
    """A member's info as gossiped (JSON object), checked field by field; keys a newer
    peer adds are kept and passed on (rolling upgrades), within ``MAX_INFO`` bytes."""
    if not isinstance(wire, dict) or len(encode(wire)) > MAX_INFO:
        raise Invalid("bad member info")
    ok = (_text(wire.get("host", "")) and _port(wire.get("port")) and
          _port(wire.get("bulk_port")) and _text(wire.get("facade_ae", ""), 16) and
          _port(wire.get("read_port", 0)) and
          _port(wire.get("facade_port", 0)) and
          (wire.get("site") is None or _text(wire["site"])))
    archives = wire.get("archives", [])
    ok = ok and isinstance(archives, list) and len(archives) <= 256 and all(
        isinstance(a, list) and 1 <= len(a) <= 3 and _text(a[0], empty=False) and
        (len(a) < 2 or a[1] is None or _text(a[1])) and
        (len(a) < 3 or a[2] is None or (isinstance(a[2], int) and 0 < a[2] < 10000))
        for a in archives)
    down = wire.get("archives_down", [])
    ok = ok and isinstance(down, list) and len(down) <= 256 and all(_text(a) for a in down)
    draining = wire.get("draining", {})
    ok = ok and isinstance(draining, dict) and len(draining) <= 256 and all(
        _text(k, empty=False) and _text(v, 32) for k, v in draining.items())
    if not ok:
        raise Invalid("bad member info")
    return wire


def _wire(info: MemberInfo) -> dict:
    """What is gossiped of *info* (its name and incarnation travel beside it)."""
    d = asdict(info)
    d.pop("incarnation", None)
    d.pop("name", None)
    return d


class Member(Node):
    """A member as the rest of the peer sees it."""

    def __init__(self, membership, name, wire, incarnation, state, since):
        super().__init__(name, wire, incarnation, state, since)
        self._membership = membership
        self._info = None

    @property
    def info(self) -> MemberInfo:
        if self._info is None or self._info[0] is not self.wire or \
                self._info[1] != self.incarnation:
            known = {k: v for k, v in self.wire.items() if k in _INFO_FIELDS}
            known.update(name=self.name, incarnation=self.incarnation)
            known.setdefault("host", "")
            known.setdefault("port", 0)
            known.setdefault("bulk_port", 0)
            if not known["host"]:
                known["host"] = self._membership.addresses.get(self.name, "")
            self._info = (self.wire, self.incarnation, MemberInfo(**known))
        return self._info[2]

    @property
    def host(self):
        return self.info.host

    @property
    def bulk_port(self):
        return self.info.bulk_port

    @property
    def read_port(self):
        return self.info.read_port

    @property
    def link(self) -> "Link | None":
        """Our open link to this member, or None (one is then dialled for next time)."""
        link = self._membership.links.get(self.name)
        if link is not None and link.open:
            return link
        if self.state != DEAD:
            self._membership.dial(self.name)
        return None


class Membership:
    """The SWIM core (``swim``) with its AMP transport and link pool."""

    def __init__(self, me: MemberInfo, credentials, seeds, reactor, vector_of=None,
                 heartbeat: float = 0.5, phi_threshold: float | None = None,
                 config: SwimConfig | None = None, max_links: int = MAX_LINKS,
                 fatal=None):
        """*fatal(why[, stage])*: stop the peer with one line (its name is held
        elsewhere)."""
        self.name = me.name
        self.credentials = credentials
        self.seeds = list(seeds)
        self.reactor = reactor
        # links refused during their TLS handshake: anyone can open them, so at most
        # a burst of lines per window is logged, then a count
        self.refusal_log = LogLimit(reactor, logger=_link.log)
        self.vector_of = vector_of or dict     # () -> {origin: seq} (answers Vector)
        self.heartbeat = heartbeat
        self.max_links = max(2, max_links)
        config = config or SwimConfig(probe_interval=heartbeat, probe_timeout=heartbeat / 2)
        incarnation = int((me.incarnation or time.time()) * 1000)
        self.started = incarnation          # ms: told in our Hello (claims.py)
        self._me = replace(me, incarnation=incarnation)
        self.swim = Swim(me.name, _wire(me), incarnation, reactor, self, config,
                         node_class=lambda *a: Member(self, *a), check_info=check_info,
                         excused=self._excused)
        self.members: dict[str, Member] = self.swim.nodes   # every member but us
        self.on_vector = []                 # callbacks(member, vector)
        self.on_change = []                 # callbacks(member, state)
        self.services = None                # answers Replicate/Commit/Discard/...
        self.swim.on_change.append(self._changed)
        self.claims = Claims(self, fatal)   # one name, one process
        self.swim.on_conflict.append(self.claims.conflict)
        self.links: dict[str, Link] = {}    # name -> the link we use (LRU order)
        self.all: set[Link] = set()         # every link with its Hello done
        self.addresses: dict[str, str] = {}     # name -> host it linked from
        self._outbox: dict[str, collections.deque] = {}
        self._waiters: dict[str, list] = {}
        self._dialing: dict[str, object] = {}   # name -> deadline call
        self._seed_loop = None
        self._seeds_reached: set = set()    # seed addresses that answered
        self._client_options = None
        self.opened = 0                     # links this peer dialled
        self.push_port = 0                  # our push port, if any (Hello info)
        self.running = False

    # -- our own info -------------------------------------------------------------------
    @property
    def me(self) -> MemberInfo:
        return replace(self._me, incarnation=self.swim.incarnation)

    @me.setter
    def me(self, info: MemberInfo) -> None:
        """A change of our info (archives down...) is gossiped with a new incarnation."""
        self._me = info
        if _wire(info) != self.swim.info:
            self.swim.update_info(_wire(info))

    def hello_info(self) -> str:
        """This peer's info, and how many 64 KB values its pushed boxes may carry
        (``commands.REPLICA_VALUES``; a peer that does not say takes one: ``greeted``)."""
        info = dict(asdict(self.me), replica_values=REPLICA_VALUES, started=self.started)
        if self.push_port:               # pushed copies' bytes go there (transfer.pushport)
            info["push_port"] = self.push_port
            info["push_commits"] = True  # and Commits (COMMIT frames) too
            info["commit_last"] = True   # and a copy's COMMIT_LAST right behind its END
        return json.dumps(info)

    # -- life cycle ------------------------------------------------------------------
    def start(self):
        self.running = True
        self.swim.start()
        self._dial_seeds()

    def stop(self):
        self.running = False
        self.swim.stop(leave=True)
        if self._seed_loop is not None and self._seed_loop.active():
            self._seed_loop.cancel()
        for call in self._dialing.values():
            if call.active():
                call.cancel()
        for link in list(self.all) + list(self.links.values()):
            link.close()

    def factory(self):
        return _Factory(self, outbound=False)

    # -- dialling --------------------------------------------------------------------
    def _options(self):
        if self._client_options is None:
            self._client_options = self.credentials.options()
        return self._client_options

    def dial_address(self, host: str, port: int) -> None:
        """Open a link to *host*:*port* whoever answers there (``claims``: a process
        said to hold our name; its certificate and Hello tell)."""
        self._connect(host, port)

    def _connect(self, host, port, expect=None, seed=None):
        self.opened += 1
        self.reactor.connectSSL(host, port, _Factory(self, True, expect, seed),
                                self._options(), timeout=5)

    def _dial_seeds(self):
        """Each seed is dialled until it answered once (peers started together, each
        reaching some seed, might otherwise form islands), and every seed again while
        no member is alive (then SWIM does the rest)."""
        self._seed_loop = None
        if not self.running:
            return
        alone = not any(m.state != DEAD for m in self.members.values())
        for host, port in self.seeds:
            if (host, port) != (self._me.host, self._me.port) and (
                    alone or (host, port) not in self._seeds_reached):
                self._connect(host, port, seed=(host, port))
        self._seed_loop = self.reactor.callLater(SEED_EVERY, self._dial_seeds)

    def dial(self, name: str) -> None:
        """Open a link to member *name* unless one is open or being opened."""
        if not self.running or name in self._dialing:
            return
        link = self.links.get(name)
        if link is not None and link.open:
            return
        member = self.members.get(name)
        info = member.info if member is not None else None
        if info is None or not info.host or not info.port:
            self.dial_failed(name)
            return
        self._dialing[name] = self.reactor.callLater(DIAL_TIMEOUT, self._dial_expired, name)
        self._connect(info.host, info.port, expect=name)

    def _dial_expired(self, name):
        self._dialing.pop(name, None)
        self.dial_failed(name)

    def dial_failed(self, name: str) -> None:
        call = self._dialing.pop(name, None)
        if call is not None and call.active():
            call.cancel()
        self._outbox.pop(name, None)
        for d in self._waiters.pop(name, []):
            d.errback(ConnectionError(f"no link to peer {name}"))

    # -- links -----------------------------------------------------------------------
    @defer.inlineCallbacks
    def hello(self, link: Link):
        try:
            answer = yield link.callRemote(Hello, name=self.name, protocol=PROTOCOL,
                                           software=__version__, info=self.hello_info())
            self.check_hello(link, answer["name"], answer["protocol"], answer["software"])
        except IncompatibleProtocol as e:      # its words: "this peer" is the other one
            self._mismatch(link, f"{link.peer_name} refused the link: {e}")
            link.close()
            self._unexpected(link)
            return
        except NameInUse as e:
            link.close()
            self._unexpected(link)
            self.claims.refused(str(e), link)
            return
        except Exception as e:
            log.warn("overlay: hello to {peer} failed: {err}", peer=link.peer_name, err=e)
            link.close()
            self._unexpected(link)
            return
        if link.seed is not None:
            self._seeds_reached.add(link.seed)
        if link.peer_name == self.name:
            link.close()     # a seed that is ourselves, or the other process (claims)
            self.claims.answered(answer["info"])
            return
        try:
            self.greeted(link, answer["info"])
        except NameInUse:               # it claims a name held elsewhere (logged)
            link.close()
            self._unexpected(link)

    def _unexpected(self, link):
        if link.expect is not None:
            self.dial_failed(link.expect)

    def check_hello(self, link, name, protocol, software):
        if name != link.peer_name:
            link.close()
            raise IncompatibleProtocol(
                f"peer says it is {name!r} but its certificate is for {link.peer_name!r}")
        if protocol != PROTOCOL:
            why = (f"overlay protocol mismatch: peer {name} (pacsp2p {software}) speaks "
                   f"overlay protocol {protocol}, peer {self.name} (pacsp2p {__version__}) "
                   f"speaks {PROTOCOL}; peers of two protocols never link: upgrade every "
                   f"peer to one release (docs/upgrading.md)")
            self._mismatch(link, why)
            raise IncompatibleProtocol(why)

    def _mismatch(self, link, why: str) -> None:
        """One error line per peer and 5 minutes (``claims``) for a link refused because
        the two peers speak two overlay protocols: a rolling upgrade across a protocol
        change redials every second or two, on both sides."""
        self.claims._once(("protocol", link.peer_name), "overlay: {why} (at {host})",
                          why=why, host=getattr(link.address, "host", "?"))

    def greeted(self, link: Link, info_json: str) -> None:
        """Hello done on *link* (either side): use it, and tell SWIM of the member
        (raises NameInUse if a live member holds its name at another address)."""
        name = link.peer_name
        if name is None or not link.open:
            return
        try:
            info = json.loads(info_json)
            if not isinstance(info, dict):
                raise ValueError("not an object")
            inc = info.get("incarnation", 0)
            wire = {k: v for k, v in info.items()
                    if k not in ("name", "incarnation", "started")}
            if isinstance(inc, float):
                inc = int(inc * 1000)          # (a peer that counts in seconds)
            self.claims.check(link, name, check_info(wire), info.get("started"))
        except (ValueError, TypeError):
            wire = None                        # (SWIM counts it invalid)
        values = wire.get("replica_values") if wire is not None else None
        link.values = min(values, REPLICA_VALUES) if (
            isinstance(values, int) and values >= 1) else 1
        port = wire.get("push_port") if wire is not None else None
        link.push_port = port if type(port) is int and 0 < port < 65536 else 0
        link.push_commits = bool(link.push_port) and wire.get("push_commits") is True
        link.commit_last = link.push_commits and wire.get("commit_last") is True
        if name == self.name:
            return
        link.greeted = True
        self.all.add(link)
        self.addresses[name] = link.address.host
        self._register(link, name)
        if wire is not None:
            self.swim.contact(name, wire, inc, push_pull=link.seed is not None)

    def _preferred(self, link: Link, name: str) -> bool:
        """Of two links between the same peers, both keep the one the smaller name
        dialled."""
        return link.outbound == (self.name < name)

    def _register(self, link: Link, name: str) -> None:
        current = self.links.get(name)
        if current is None or not current.open or (
                current is not link and self._preferred(link, name) and
                not self._preferred(current, name)):
            self.links[name] = link
        call = self._dialing.pop(name, None)
        if call is not None and call.active():
            call.cancel()
        use = self.links[name]
        for data in self._outbox.pop(name, ()):
            use.callRemote(SwimMessage, msg=data)
        for d in self._waiters.pop(name, []):
            d.callback(use)
        self._touch(name)
        self._trim()

    def _touch(self, name):
        link = self.links.pop(name, None)
        if link is not None:
            self.links[name] = link

    def _trim(self) -> None:
        """Close idle spare links, then the least recently used idle links beyond
        ``max_links``."""
        used = set(self.links.values())
        for link in list(self.all):
            if link not in used and not link.busy():
                self.all.discard(link)
                link.close()
        excess = len(self.links) - self.max_links
        for name in list(self.links):
            if excess <= 0:
                break
            link = self.links[name]
            if not link.busy():
                del self.links[name]
                self.all.discard(link)
                link.close()
                excess -= 1

    def link_lost(self, link: Link):
        self.all.discard(link)
        name = link.peer_name
        if name is not None and self.links.get(name) is link:
            del self.links[name]
            spare = next((l for l in self.all if l.peer_name == name and l.open), None)
            if spare is not None:
                self.links[name] = spare
        if link.expect is not None and link.expect in self._dialing and not link.greeted:
            self.dial_failed(link.expect)

    def link_for(self, name: str):
        """Deferred[Link]: our open link to *name*, dialled if need be."""
        link = self.links.get(name)
        if link is not None and link.open:
            self._touch(name)
            return defer.succeed(link)
        d = defer.Deferred()
        self._waiters.setdefault(name, []).append(d)
        self.dial(name)
        return d

    # -- the SWIM core's transport ----------------------------------------------------
    def send(self, name: str, data: bytes) -> None:
        link = self.links.get(name)
        if link is not None and link.open:
            self._touch(name)
            link.callRemote(SwimMessage, msg=data)
            return
        box = self._outbox.setdefault(name, collections.deque(maxlen=OUTBOX))
        box.append(data)
        self.dial(name)

    def linked(self, name: str) -> bool:
        link = self.links.get(name)
        return link is not None and link.open

    def linked_names(self) -> list:
        return [name for name, link in self.links.items() if link.open]

    def _excused(self, name: str) -> bool:
        """A member whose link we stopped reading (pushed data waits for our disk) is
        not suspected for acks that wait there."""
        link = self.links.get(name)
        return link is not None and link.reading_held()

    # -- what SWIM decides -----------------------------------------------------------------
    def _changed(self, member: Member, old):
        state = member.state
        if old is None:
            log.info("overlay: learned of peer {name} at {host}:{port} ({state})",
                     name=member.name, host=member.info.host, port=member.info.port,
                     state=state)
        elif old == state:
            return                      # its info changed
        elif state == SUSPECT:
            log.info("overlay: peer {name} is suspected (no answer to a probe)",
                     name=member.name)
        elif state == DEAD:
            log.warn("overlay: peer {name} is dead (suspected and not refuted)",
                     name=member.name)
        elif old == DEAD:
            log.info("overlay: peer {name} is back", name=member.name)
        else:
            log.info("overlay: peer {name} is alive again (refuted)", name=member.name)
        if state == DEAD:               # fail what waits on it
            link = self.links.pop(member.name, None)
            for l in [l for l in self.all if l.peer_name == member.name] + (
                    [link] if link is not None else []):
                self.all.discard(l)
                l.close(abort=True)
            self.dial_failed(member.name)
        for callback in list(self.on_change):
            callback(member, state)

    def vector_heard(self, name: str, vector: dict) -> None:
        member = self.members.get(name)
        if member is not None:
            for callback in list(self.on_vector):
                callback(member, vector)

    # -- queries ---------------------------------------------------------------------
    def alive(self, name: str) -> bool:
        """True until declared dead (a suspected member still counts)."""
        return self.swim.alive(name)

    def status(self) -> list[dict]:
        me = self.me
        rows = [{"name": self.name, "state": "self", "address": f"{me.host}:{me.port}",
                 "facade": f"{me.facade_ae}@{me.facade_port}",
                 "incarnation": self.swim.incarnation}]
        for m in sorted(self.members.values(), key=lambda m: m.name):
            info = m.info
            rows.append({"name": m.name, "state": m.state,
                         "address": f"{info.host}:{info.port}",
                         "facade": f"{info.facade_ae}@{info.facade_port}",
                         "rtt_ms": round(m.rtt * 1000, 1) if m.rtt is not None else None,
                         "since": wall(self.reactor, m.since), "incarnation": m.incarnation,
                         "linked": self.linked(m.name)})
        return rows

    def swim_status(self) -> dict:
        return {"awareness": self.swim.awareness, "links": len(self.links),
                "max_links": self.max_links, "links_opened": self.opened,
                "queued": len(self.swim.queue), **self.swim.stats}

    def call(self, name: str, command, **kwargs):
        """Deferred answer of *command* sent to member *name* (a link dialled if need
        be)."""
        member = self.members.get(name)
        if member is None or member.state == DEAD:
            return defer.fail(ConnectionError(f"no link to peer {name}"))
        return self.link_for(name).addCallback(
            lambda link: link.callRemote(command, **kwargs))


__all__ = ["ALIVE", "DEAD", "JOINING", "SUSPECT", "Link", "Member", "MemberInfo",
           "Membership"]
