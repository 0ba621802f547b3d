"""The facade as a service: the Twisted DICOM acceptor (``dicom.acceptor``) serving the
cluster API on ``[facade] port``.

No association threads: everything but file work runs in the reactor. A child of the
peer's service tree (``service.PeerService``): started once the cluster can answer,
stopped first (open associations are aborted).
"""

from __future__ import annotations

from pynetdicom import AE
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.dicom import contexts
from pacsp2p.dicom.acceptor import AcceptorFactory
from pacsp2p.dicom.incoming import Spares, receive_pool
from pacsp2p.dicom.scu import file_pool
from pacsp2p.facade.services import Services

log = Logger()


def supported_contexts() -> list:
    """The presentation contexts the facade accepts (``contexts.add_supported``)."""
    ae = AE()
    contexts.add_supported(ae)
    return ae.supported_contexts


class Facade(service.Service):
    name = "facade"

    def __init__(self, settings, cluster, reactor):
        self.settings = settings
        self.fs = settings.facade
        self.cluster = cluster
        self.reactor = reactor
        self.incoming = settings.data_dir / "incoming"
        self.port = None
        self.factory = None
        self.spares = None

    def startService(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():      # before serving: a crash's leftovers
            leftover.unlink(missing_ok=True)
        self.spares = Spares(self.incoming, self.reactor)
        services = Services(self.settings, self.cluster, self.reactor,
                            receive_pool(self.reactor), file_pool(self.reactor), self.spares)
        fs = self.fs
        self.factory = AcceptorFactory(
            self.reactor, services, supported_contexts(), max_pdu=fs.max_pdu,
            max_associations=fs.max_associations, allowed_calling_aes=fs.allowed_calling_aes,
            max_pending=fs.max_pending, max_per_address=fs.max_per_address,
            artim_timeout=fs.artim_timeout, idle_timeout=fs.idle_timeout,
            max_dataset=fs.max_dataset, fd_reserve=fs.fd_reserve,
            min_peer_pdu=fs.min_peer_pdu)
        try:
            self.port = self.reactor.listenTCP(self.fs.port, self.factory, backlog=64,
                                               interface=self.fs.bind)
        except Exception:
            self.spares.stop()
            raise
        super().startService()
        log.info("facade {ae} listening on {bind}:{port}",
                 ae=self.fs.ae_title, bind=self.fs.bind, port=self.fs.port)

    def stopService(self):
        super().stopService()
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        self.spares.stop()
        for assoc in list(self.factory.associations):
            assoc.abort(2, 0)
        return defer.maybeDeferred(port.stopListening)
