"""The overlay of one peer: listeners, membership, catalog dissemination and the bulk
client.

What the rest of the peer sees of the cluster: who is alive, and ``fetch`` of an
instance from another peer's archive. Membership is SWIM with Lifeguard (``swim.py``,
over AMP by ``membership.py``); new catalog facts spread by epidemic push-pull over its
traffic (``dissemination.py``), pulled in batches over the bulk channel (``sync.py``).
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p.overlay import bulk, fetching, reads, threadtls, tls
from pacsp2p.overlay.commands import Vector
from pacsp2p.overlay.dissemination import Dissemination, check_vector
from pacsp2p.overlay.membership import MemberInfo, Membership
from pacsp2p.overlay.readclient import ReadClient
from pacsp2p.overlay.reclaim import Reclaim
from pacsp2p.overlay.swimparts import DEAD, SwimConfig
from pacsp2p.overlay.sync import AntiEntropy

log = Logger()


class PeerUnknown(Exception):
    """A location names a peer this overlay does not know (not: an instance is missing)."""


class Overlay:
    def __init__(self, settings, catalog, archives: dict, reactor, responders=None,
                 fatal=None):
        """*responders*: called with this overlay, returns what answers the peers'
        replica commands (Replicate, Commit, Discard, Drop, SendTo, pushed streams);
        *fatal(why)*: stops the peer with one line (another process holds its name)."""
        o = settings.overlay
        self.settings, self.o = settings, o
        self.catalog, self.archives, self.reactor = catalog, archives, reactor
        self.name = settings.peer.name
        # raises TLSError with a one-line reason (missing, foreign, expired certificate)
        self.credentials = tls.Credentials(o.tls_dir, self.name)
        self.pool = ThreadPool(1, 8, "bulk-io")   # file writes of up to 8 fetches per source
        me = MemberInfo(self.name, o.advertise, o.port, o.bulk_port,
                        settings.facade.ae_title, settings.facade.port, time.time(),
                        # [name, site, max_fetches]: placement reads the first two,
                        # a reader the third (how many fetches this archive takes)
                        [[a.name, a.site, getattr(a, "max_fetches", None)]
                         for a in archives.values() if "store" in a.capabilities])
        config = SwimConfig(probe_interval=o.heartbeat,
                            probe_timeout=o.probe_timeout or o.heartbeat / 2,
                            indirect_checks=o.indirect_probes,
                            suspicion_min=o.suspicion_mult,
                            gossip_interval=o.gossip_interval, gossip_nodes=o.gossip_fanout)
        self.membership = Membership(me, self.credentials, o.seeds, reactor,
                                     lambda: catalog.vector, o.heartbeat, config=config,
                                     max_links=o.max_links, fatal=fatal)
        tmp = settings.data_dir / "incoming"
        self.bulk = fetching.BulkClient(
            self.credentials, reactor, self.pool, tmp,
            ReadClient(threadtls.client_context(o.tls_dir, self.name), reactor, tmp,
                       fetching.NotHeld))
        self.sync = AntiEntropy(catalog, self.bulk)
        self.dissemination = Dissemination(
            self.membership.swim, lambda: catalog.vector, self._pull, reactor,
            pull_interval=o.pull_interval, ae_interval=max(2.0, 4 * o.heartbeat),
            count=lambda: catalog.facts)
        self.dissemination.on_vector.append(self.membership.vector_heard)
        self.membership.on_change.append(       # a pull from a peer found dead is cut
            lambda member, state: state == DEAD and self.dissemination.lost(member.name))
        # a catalog restored from an older backup: mended when a vector tells (reclaim)
        self.reclaim = Reclaim(catalog, self.sync, self.membership.members, reactor)
        self.membership.on_vector.append(self.reclaim.vector_heard)
        self.membership.on_change.append(self.reclaim.member_changed)
        catalog.listeners.append(self.dissemination.changed)
        self._ports = []
        self.offers: dict = {}          # token -> opener of a file offered to a peer
        if responders is not None:
            self.membership.services = responders(self)

    def start(self):
        self.pool.start()
        options = self.credentials.options()
        timeout = self.o.handshake_timeout          # else idle sockets pile up (issue 11)
        self._ports.append(tls.listen(
            self.reactor, self.o.port, self.membership.factory(), options, self.o.bind,
            f"overlay port {self.o.port}", timeout))
        try:
            self._ports.append(tls.listen(
                self.reactor, self.o.bulk_port,
                bulk.site(self.catalog, self.archives, self.pool, self.reactor,
                          self.offers, heard=self.dissemination.asked),
                options, self.o.bind, f"bulk port {self.o.bulk_port}", timeout))
        except Exception as e:              # the key to name is bulk_port, not port
            for port in self._ports:
                port.stopListening()
            self._ports = []
            self.pool.stop()
            raise RuntimeError(f"overlay.bulk_port {self.o.bulk_port}: {e}") from e
        for port in self._ports:             # accepted sockets inherit it (Linux)
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.o.read_port >= 0:
            self._read_port(timeout)
        self.membership.start()
        log.info("overlay: peer {name} on {bind}:{port} (bulk {bulk}, reads {reads}), seeds "
                 "{seeds}", name=self.name, bind=self.o.bind, port=self.o.port,
                 bulk=self.o.bulk_port, reads=self.membership.me.read_port or "none",
                 seeds=", ".join(f"{h}:{p}" for h, p in self.o.seeds) or "none")

    def _read_port(self, timeout: float) -> None:
        """The instance reads served in threads (``reads.Reads`` on ``threadtls``; the
        bulk port keeps serving them to older peers), advertised in our member info."""
        handler = reads.Reads(self.catalog, self.archives)
        server = threadtls.ThreadServer(
            self.reactor, threadtls.server_context(self.o.tls_dir, self.name), handler,
            "read port", "bulk-read", handshake_timeout=timeout, max_body=bulk.MAX_BATCH_BODY)
        handler.server = server
        try:
            server.listen(self.o.read_port, self.o.bind)
        except OSError as e:
            for port in self._ports:
                port.stopListening()
            self._ports = []
            self.pool.stop()
            raise RuntimeError(f"overlay.read_port {self.o.read_port}: {e}") from e
        server.what = server.guard.what = f"read port {server.port}"
        self._ports.append(server)
        self.membership.me = replace(self.membership.me, read_port=server.port)

    def stop(self):
        self.membership.stop()
        for port in self._ports:
            port.stopListening()
        self.pool.stop()

    def _pull(self, name: str):
        member = self.membership.members.get(name)
        if member is None:
            return defer.fail(ConnectionError(f"peer {name} is unknown"))
        return self.sync.pull(member)

    def sync_from(self, peer: str) -> None:
        """Pull *peer*'s own facts soon (after it recorded a copy we asked for)."""
        self.dissemination.want(peer, peer, self.catalog.vector.get(peer, 0) + 1)

    def pull_from(self, peer: str, vector: dict) -> None:
        """Pull now (not after the pull interval) what *peer* holds beyond us, per its
        *vector* as it told us: for a caller that must know all before it acts (a
        delete, ``transfer.delete``)."""
        for origin, seq in vector.items():
            self.dissemination.want(peer, origin, seq)

    @defer.inlineCallbacks
    def ask_vectors(self, names, origins) -> None:
        """Ask each of the peers *names* how far it holds the logs of *origins*
        (``Vector``, 16 at a time); what they answer goes to the ``on_vector``
        callbacks, like the vectors heard while pulling."""
        asked = json.dumps(list(origins)[:1000])
        names = list(names)
        for i in range(0, len(names), 16):
            answers = yield defer.DeferredList(
                [self.membership.call(n, Vector, origins=asked) for n in names[i:i + 16]],
                consumeErrors=True)
            for name, (ok, answer) in zip(names[i:i + 16], answers):
                if ok:
                    try:
                        vector = check_vector(json.loads(answer["vector"]))
                    except ValueError:
                        continue
                    self.membership.vector_heard(name, vector)

    def alive(self, peer: str) -> bool:
        return self.membership.alive(peer)

    def fetch(self, location):
        """Deferred[file] of one instance held by another peer's archive."""
        member = self.membership.members.get(location.peer)
        if member is None:
            raise PeerUnknown(f"peer {location.peer} is unknown")
        return self.bulk.fetch(member, location.archive, location.sop_instance_uid,
                               location.sha256)

    def fetch_many(self, locations):
        """Deferred[list] of the instances *locations* (one peer, one archive), one
        request for all (``BulkClient.fetch_many``: an entry per location, the instance
        or why not)."""
        first = locations[0]
        member = self.membership.members.get(first.peer)
        if member is None:
            raise PeerUnknown(f"peer {first.peer} is unknown")
        return self.bulk.fetch_many(member, first.archive,
                                    [(loc.sop_instance_uid, loc.sha256) for loc in locations])

    def status(self) -> dict:
        return {"members": self.membership.status(), "vector": dict(self.catalog.vector),
                "facts_pulled": self.sync.pulled, "reclaim": self.reclaim.status(),
                "swim": self.membership.swim_status(),
                "dissemination": {"pulls": self.dissemination.pulls,
                                  "requests": self.sync.requests,
                                  "served": self.dissemination.served,
                                  "failed": self.dissemination.failed,
                                  "ends_told": self.dissemination.ends_told,
                                  "end_told_at": self.dissemination.end_told_at,
                                  "slowdown": self.dissemination.slowdown},
                "handshakes": {p.guard.what: {"pending": p.guard.pending,
                                               "expired": p.guard.expired,
                                               "evicted": p.guard.evicted}
                               for p in self._ports},
                "reads": [p.status() for p in self._ports if hasattr(p, "status")]}
