"""The facade as a service: the Twisted DICOM acceptor (``dicom.acceptor``) serving the
cluster API on ``[facade] port`` and, with ``tls_port``, on a DICOM TLS port
(``dicom.tls``: the BCP 195 profile; client certificates checked against ``tls_ca`` and
required unless ``tls_require_client_cert = false``); ``tls_only`` leaves the plain port
closed. Both ports share one acceptor, hence one set of limits, and one ``Policy``
(``facade.policy``: called AE title, modalities, hosts, rights).

Certificates and keys are read when the facade is built, so a missing or unusable file
stops start-up with one line naming the key, the file and the reason. The facade's CA
must not be the overlay's: a certificate made for a modality would then also open the
overlay.

Every association and operation is audited and counted (``facade.observe``); the facade
owns the peer's audit trail (``pacsp2p.audit``, ``<data_dir>/audit.log``, ``[audit]``):
opened before the ports, closed after them. It tells the cluster whether it listens
(``cluster.serving``, read by ``GET /health``).

No association threads: everything but file work runs in the reactor. A child of the
peer's service tree (``service.PeerService``): started once the cluster can answer,
stopped first (open associations are aborted).
"""

from __future__ import annotations

from pynetdicom import AE
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from pacsp2p import audit, metrics
from pacsp2p.dicom import contexts, tls
from pacsp2p.dicom.acceptor import AcceptorFactory
from pacsp2p.dicom.incoming import Spares, receive_pool
from pacsp2p.dicom.scu import file_pool
from pacsp2p.facade.observe import Observer
from pacsp2p.facade.policy import Policy
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
        self.policy = Policy(settings, reactor)
        self.tls = tls.settings_options(settings)
        self.ports: list = []
        self.factory = None
        self.spares = None
        self.observer = Observer(settings, cluster, reactor)
        self.trail = None
        serving = getattr(cluster, "serving", None)
        if serving is not None:
            serving["facade"] = self.why_not_listening

    def why_not_listening(self) -> str:
        """'' while the facade listens, else why not (``GET /health``)."""
        if self.ports:
            return ""
        return "the facade does not listen" + ("" if self.running else " (not started)")

    def _open_audit(self) -> None:
        au = getattr(self.settings, "audit", None)
        if au is None or not au.enabled:
            return
        trail = audit.AuditTrail(self.settings.data_dir / "audit.log", au.max_bytes,
                                 au.backups, self.reactor,
                                 on_drop=metrics.AUDIT_DROPPED.inc)
        try:
            trail.start()
        except OSError as e:
            raise RuntimeError(f"audit: cannot open {trail.path}: {e.strerror}") from e
        self.trail = trail
        audit.install(trail)

    def startService(self) -> None:
        self.incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming.iterdir():      # before serving: a crash's leftovers
            leftover.unlink(missing_ok=True)
        self._open_audit()
        self.spares = Spares(self.incoming, self.reactor, nameless=True)
        services = Services(self.settings, self.cluster, self.reactor,
                            receive_pool(self.reactor), file_pool(self.reactor), self.spares,
                            self.policy, self.observer)
        fs = self.fs
        self.factory = AcceptorFactory(
            self.reactor, services, supported_contexts(), max_pdu=fs.max_pdu,
            max_associations=fs.max_associations, allowed_calling_aes=fs.allowed_calling_aes,
            max_pending=fs.max_pending, max_per_address=fs.max_per_address,
            artim_timeout=fs.artim_timeout, idle_timeout=fs.idle_timeout,
            max_dataset=fs.max_dataset, fd_reserve=fs.fd_reserve,
            min_peer_pdu=fs.min_peer_pdu, policy=self.policy, observer=self.observer,
            choose=contexts.storage_choice(fs.keep_compressed))
        listening, current = [], ""
        try:
            if not fs.tls_only:
                listening.append(("", self.reactor.listenTCP(
                    fs.port, self.factory, backlog=64, interface=fs.bind)))
            if fs.tls_port:
                current = f"tls_port {fs.tls_port}: "
                listening.append((" (DICOM TLS)", self.reactor.listenTCP(
                    fs.tls_port, tls.TLSFactory(self.tls, self.factory), backlog=64,
                    interface=fs.bind)))
        except Exception as e:
            for _, port in listening:
                port.stopListening()
            self.spares.stop()
            self._close_audit()
            if current:
                raise RuntimeError(f"{current}{e}") from e
            raise
        self.ports = [port for _, port in listening]
        self.policy.start()
        super().startService()
        for kind, port in listening:
            log.info("facade {ae} listening on {bind}:{port}{kind}", ae=fs.ae_title,
                     bind=fs.bind, port=port.getHost().port, kind=kind)

    def stopService(self):
        super().stopService()
        if not self.ports:
            return self._close_audit()
        ports, self.ports = self.ports, []
        self.policy.stop()
        self.spares.stop()
        for assoc in list(self.factory.associations):
            assoc.abort(2, 0)
        d = defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])
        # the aborted associations' records first (their connections close next turn)
        d.addCallback(lambda _: task.deferLater(self.reactor, 0.05, self._close_audit))
        return d

    def _close_audit(self):
        """Deferred: the audit trail's last records written, the file closed."""
        trail, self.trail = self.trail, None
        if trail is None:
            return defer.succeed(None)
        if audit.current() is trail:
            audit.install(None)
        return trail.stop()
