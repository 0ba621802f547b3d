"""The admin endpoint as a service of the peer: HTTP on a loopback address, HTTPS when
``[admin] tls_cert`` is set (required by ``config`` on any other address).

``make(settings, cluster, reactor)`` builds it (the TLS files are checked then:
``config.ConfigError`` naming ``admin.tls_*``, before the reactor runs); at start it
writes the CLI's token (``auth.write_token``: ``<data_dir>/admin.token``, mode 0600)
and listens; at stop it removes the token. At most ``MAX_CONNECTIONS`` connections at
once, ``MAX_PER_ADDRESS`` of them from one address (so that one slow client cannot hold
every slot). A connection beyond either cap takes the slot of the oldest connection (of
that address, or of all) that is not being answered: silent, its request not whole yet,
or idle between requests; only when every one is being answered is it closed at once.
So sockets held open and silent (or dripping a header line a minute) cannot keep a
client that sends its request at once out: before, 16 silent sockets from 127.0.0.1 kept
``pacsp2p status`` on the same machine out for as long as they were reopened. An idle
connection is closed after ``gate.IDLE_TIMEOUT`` seconds; a request body is at most
``gate.MAX_BODY`` bytes.
"""

from __future__ import annotations

from pathlib import Path

from twisted.application import internet, service
from twisted.protocols.policies import WrappingFactory

from pacsp2p.admin import auth, web
from pacsp2p.dicom import tls

MAX_CONNECTIONS = 64
MAX_PER_ADDRESS = 16


class Capped(WrappingFactory):
    """*wrapped*, with at most *limit* connections open, *per_address* from one address:
    a connection beyond a cap closes the oldest one not being answered, or is refused
    (closed at once) when there is none (see the module docstring)."""

    noisy = False

    def __init__(self, wrapped, limit: int = MAX_CONNECTIONS,
                 per_address: int = MAX_PER_ADDRESS):
        super().__init__(wrapped)
        self.limit, self.per_address = limit, per_address
        self.evicted = 0

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        open_ = [p for p in self.protocols if not p.admin_evicted]     # oldest first
        mine = [p for p in open_ if p.admin_host == host]
        if len(mine) >= self.per_address:
            if not self._evict(mine):
                return None
            open_ = [p for p in open_ if not p.admin_evicted]
        if len(open_) >= self.limit and not self._evict(open_):
            return None
        p = super().buildProtocol(addr)
        p.admin_host, p.admin_evicted = host, False
        return p

    def _evict(self, candidates) -> bool:
        """Close the oldest of *candidates* that is not being answered; False if each
        one is."""
        for p in candidates:
            if not p.admin_evicted and not getattr(p.wrappedProtocol, "answering", 0):
                p.admin_evicted = True
                self.evicted += 1
                p.transport.abortConnection()
                return True
        return False


class AdminEndpoint(service.MultiService):
    """The listening port (a child) and the CLI token's life around it."""

    def __init__(self, server, guard: auth.Guard, data_dir: Path):
        super().__init__()
        self.setName("admin")
        self.guard, self.data_dir = guard, Path(data_dir)
        server.setServiceParent(self)

    def privilegedStartService(self):
        """Nothing: the port is bound in startService, where the peer turns a port in use
        into its one-line error (twistd binds it here otherwise, and prints a traceback)."""

    def startService(self):
        self.guard.token = auth.write_token(self.data_dir)
        super().startService()

    def stopService(self):
        self.guard.token = None
        try:
            (self.data_dir / auth.TOKEN_FILE).unlink()
        except OSError:
            pass
        return super().stopService()


def make(settings, cluster, reactor, **site_options) -> AdminEndpoint:
    """The admin endpoint of *settings* serving *cluster* (``web.site``)."""
    adm = settings.admin
    options = tls.admin_options(settings)
    guard = auth.Guard(adm, adm.bind, reactor, tls=options is not None)
    site = web.site(cluster, adm.bind, guard, **site_options)
    factory = Capped(site)
    if options is not None:
        server = internet.SSLServer(adm.port, factory, options, interface=adm.bind,
                                    reactor=reactor)
    else:
        server = internet.TCPServer(adm.port, factory, interface=adm.bind, reactor=reactor)
    return AdminEndpoint(server, guard, settings.data_dir)
