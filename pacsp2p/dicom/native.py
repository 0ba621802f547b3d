"""The native facade: the Twisted DICOM acceptor (``dicom.acceptor``) serving the cluster.

Selected by ``[facade] engine = "native"``; the pynetdicom SCP (``dicom.facade``) stays
available as ``engine = "pynetdicom"``. Same AE title, port, bind address,
``allowed_calling_aes``, ``max_pdu`` and ``max_associations``, same services and
statuses; no association threads: everything but file work runs in the reactor.
"""

from __future__ import annotations

from pynetdicom import AE
from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.dicom import contexts
from pacsp2p.dicom.acceptor import AcceptorFactory
from pacsp2p.dicom.incoming import Spares, receive_pool
from pacsp2p.dicom.scu import file_pool
from pacsp2p.dicom.services import Services

log = Logger()


def supported_contexts() -> list:
    """The presentation contexts the facade accepts (``contexts.add_supported``)."""
    ae = AE()
    contexts.add_supported(ae)
    return ae.supported_contexts


class NativeFacade:
    def __init__(self, settings, cluster, reactor):
        self.settings = settings
        self.fs = settings.facade
        self.cluster = cluster
        self.reactor = reactor
        self.incoming = settings.data_dir / "incoming"
        self.port = None
        self.factory = None

    def start(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():      # before serving: a crash's leftovers
            leftover.unlink(missing_ok=True)
        self.spares = Spares(self.incoming, self.reactor)
        services = Services(self, receive_pool(self.reactor), file_pool(self.reactor),
                            self.spares)
        self.factory = AcceptorFactory(
            self.reactor, services, supported_contexts(), max_pdu=self.fs.max_pdu,
            max_associations=self.fs.max_associations,
            allowed_calling_aes=self.fs.allowed_calling_aes)
        self.port = self.reactor.listenTCP(self.fs.port, self.factory, backlog=64,
                                           interface=self.fs.bind)
        log.info("facade {ae} listening on {bind}:{port} (native acceptor)",
                 ae=self.fs.ae_title, bind=self.fs.bind, port=self.fs.port)

    def stop(self):
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        self.spares.stop()
        for assoc in list(self.factory.associations):
            assoc.abort(2, 0)
        return defer.maybeDeferred(port.stopListening)
