"""The overlay of one peer: listeners, membership, anti-entropy and the bulk client.

What the rest of the peer sees of the cluster: who is alive, and ``fetch`` of an
instance from another peer's archive.
"""

from __future__ import annotations

import socket
import time

from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p.overlay import bulk, tls
from pacsp2p.overlay.membership import MemberInfo, Membership
from pacsp2p.overlay.sync import AntiEntropy

log = Logger()


class PeerUnknown(Exception):
    """A location names a peer this overlay does not know (not: an instance is missing)."""


class Overlay:
    def __init__(self, settings, catalog, archives: dict, reactor, responders=None):
        """*responders*: called with this overlay, returns what answers the peers'
        replica commands (Replicate, Commit, Discard, Drop, SendTo, pushed streams)."""
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
        self.membership = Membership(me, self.credentials, o.seeds, reactor,
                                     lambda: dict(catalog.vector), o.heartbeat,
                                     o.phi_threshold)
        tmp = settings.data_dir / "incoming"
        self.bulk = bulk.BulkClient(self.credentials, reactor, self.pool, tmp)
        self.sync = AntiEntropy(catalog, self.bulk)
        self.membership.on_vector.append(self.sync.compare)
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
        self._ports.append(tls.listen(
            self.reactor, self.o.bulk_port,
            bulk.site(self.catalog, self.archives, self.pool, self.reactor, self.offers),
            options, self.o.bind, f"bulk port {self.o.bulk_port}", timeout))
        for port in self._ports:             # accepted sockets inherit it (Linux)
            port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.membership.start()
        log.info("overlay: peer {name} on {bind}:{port} (bulk {bulk}), seeds {seeds}",
                 name=self.name, bind=self.o.bind, port=self.o.port, bulk=self.o.bulk_port,
                 seeds=", ".join(f"{h}:{p}" for h, p in self.o.seeds) or "none")

    def stop(self):
        self.membership.stop()
        for port in self._ports:
            port.stopListening()
        self.pool.stop()

    def sync_from(self, peer: str) -> None:
        """Pull *peer*'s own facts now (after it recorded a copy we asked for)."""
        member = self.membership.members.get(peer)
        if member is not None:
            self.sync.compare(member, {peer: self.catalog.vector.get(peer, 0) + 1})

    def alive(self, peer: str) -> bool:
        return self.membership.alive(peer)

    def fetch(self, location):
        """Deferred[file] of one instance held by another peer's archive."""
        member = self.membership.members.get(location.peer)
        if member is None:
            raise PeerUnknown(f"peer {location.peer} is unknown")
        return self.bulk.fetch(member, location.archive, location.sop_instance_uid,
                               location.sha256)

    def status(self) -> dict:
        return {"members": self.membership.status(), "vector": dict(self.catalog.vector),
                "facts_pulled": self.sync.pulled,
                "handshakes": {p.guard.what: {"pending": p.guard.pending,
                                               "expired": p.guard.expired,
                                               "refused": p.guard.refused}
                               for p in self._ports}}
