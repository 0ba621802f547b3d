"""PeerService: builds the parts of one peer and starts them in order, stops them in reverse.

catalog -> archives -> cluster API -> facade. A part that cannot start (read-only data
directory, port in use, damaged catalog) stops the peer with one line saying why.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from pacsp2p import __version__, lock
from pacsp2p.adapters import make_archive
from pacsp2p.admin import web
from pacsp2p.catalog import Catalog
from pacsp2p.cluster import Cluster
from pacsp2p.dicom.facade import Facade
from pacsp2p.strategies import Strategies

log = Logger()

HEALTH_EVERY = 5.0        # seconds between two health checks of every archive
HEALTH_TIMEOUT = 10.0


class PeerService(service.Service):
    name = "pacsp2p"

    def __init__(self, settings, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.settings = settings
        self.reactor = reactor
        self.catalog = Catalog(settings.data_dir / "catalog.sqlite", reactor,
                               peer=settings.peer.name)
        # building archives validates their config (ConfigError before the reactor runs)
        self.archives = [make_archive(a, settings, reactor) for a in settings.archives]
        self.overlay = None
        if settings.overlay is not None:
            from pacsp2p.overlay.node import Overlay
            self.overlay = Overlay(settings, self.catalog, {a.name: a for a in self.archives},
                                   reactor)
        st = settings.strategies
        self.strategies = Strategies(st.placement, st.selection, st.plugins, settings.source,
                                     st.options, settings.peer.name, st.balancing)
        self.cluster = Cluster(settings, self.catalog, self.archives, self.strategies,
                               self.overlay, reactor)
        self.replicas = None
        if self.overlay is not None:
            from pacsp2p.transfer.replicas import ReplicaService
            self.replicas = ReplicaService(settings.peer.name,
                                           {a.name: a for a in self.archives},
                                           self.catalog, self.overlay, reactor)
            self.overlay.membership.services = self.replicas
            self.replicas.cluster = self.cluster
        from pacsp2p.adapters.crawl import Crawler
        self.crawlers = [Crawler(a, self.catalog, settings.peer.name, reactor,
                                 qps=getattr(a, "crawl_qps", 50.0))
                         for a in self.archives if "crawl" in a.capabilities]
        self.cluster.crawlers = self.crawlers
        for archive in self.archives:       # adapters that resolve UIDs in the catalog
            if hasattr(archive, "catalog"):
                archive.catalog = self.catalog
        self._health_loop = None
        self._checking = False
        self._seen_up: dict[str, bool] = {}      # what the health loop last logged
        if settings.facade.engine == "native":
            from pacsp2p.dicom.native import NativeFacade
            self.facade = NativeFacade(settings, self.cluster, reactor)
        else:
            self.facade = Facade(settings, self.cluster, reactor)
        self.started = None
        self._lock = None
        self._admin_port = None

    def startService(self):
        super().startService()
        self.started = self._start()
        self.started.addErrback(self._failed)

    @defer.inlineCallbacks
    def _start(self):
        log.info("pacsp2p {v} peer {name}, data in {dir}", v=__version__,
                 name=self.settings.peer.name, dir=self.settings.data_dir)
        self._lock = lock.acquire(self.settings.data_dir)
        yield self.catalog.start()
        for archive in self.archives:
            try:
                yield archive.start()
            except Exception as e:
                raise RuntimeError(f"archive {archive.name}: cannot start: {e}") from e
        self.cluster.ingest.start()
        if self.replicas is not None:
            self.replicas.start()
        if self.overlay is not None:
            try:
                self.overlay.start()
            except Exception as e:
                raise RuntimeError(f"overlay.port {self.settings.overlay.port}: {e}") from e
        self.facade.start()
        for crawler in self.crawlers:
            crawler.start()
        self._health_loop = task.LoopingCall(self._check_health)
        self._health_loop.clock = self.reactor
        self._health_loop.start(HEALTH_EVERY, now=False)
        adm = self.settings.admin
        try:
            self._admin_port = self.reactor.listenTCP(adm.port, web.site(self.cluster),
                                                      interface=adm.bind)
        except Exception as e:
            raise RuntimeError(f"admin.port {adm.port}: {e}") from e

    def _failed(self, failure):
        msg = failure.getErrorMessage()
        log.critical("pacsp2p cannot start: {msg}", msg=msg)
        # twistd has pointed sys.stderr at its log by now: say it on the real stderr
        print(f"pacsp2p: cannot start: {msg}", file=sys.__stderr__, flush=True)
        # a part may fail before the reactor runs (startService is called before run())
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    # -- health routing ----------------------------------------------------------------
    @defer.inlineCallbacks
    def _check_health(self):
        """Ask every archive whether it answers; keep ``archive.up``, log each change once,
        gossip the archives that are down, resume a crawl a failure had stopped."""
        if self._checking:
            return
        self._checking = True
        try:
            results = yield defer.DeferredList(
                [self._health_of(a) for a in self.archives], consumeErrors=True)
            changed = False
            for archive, (ok, result) in zip(self.archives, results):
                health = result if ok and isinstance(result, dict) else {
                    "up": False, "error": result.getErrorMessage() if not ok else "?"}
                up = bool(health.get("up"))
                flipped = up != self._seen_up.get(archive.name, True)
                self._seen_up[archive.name] = up
                if flipped:
                    changed = True
                    if up:
                        log.info("archive {archive} is back", archive=archive.name)
                    else:
                        log.warn("archive {archive} stopped answering: {err}",
                                 archive=archive.name, err=health.get("error", "no answer"))
                try:
                    archive.up = up
                except AttributeError:
                    pass
                if up and flipped:
                    for crawler in self.crawlers:
                        if crawler.archive is archive and crawler.error:
                            crawler.error = None
                            crawler.start()
            if changed and self.overlay is not None:
                import dataclasses
                ms = self.overlay.membership
                down = sorted(a.name for a in self.archives if not getattr(a, "up", True))
                ms.me = dataclasses.replace(ms.me, archives_down=down)
        finally:
            self._checking = False

    def _health_of(self, archive):
        d = defer.maybeDeferred(archive.health)
        d.addTimeout(HEALTH_TIMEOUT, self.reactor)
        return d

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._health_loop is not None and self._health_loop.running:
            self._health_loop.stop()
        if self._admin_port is not None:
            yield self._admin_port.stopListening()
        for crawler in self.crawlers:
            crawler.stop()
        yield self.facade.stop()
        self.cluster.ingest.stop()
        if self.replicas is not None:
            self.replicas.stop()
        if self.overlay is not None:
            self.overlay.stop()
        for archive in reversed(self.archives):
            yield archive.stop()
        self.catalog.stop()
        if self._lock is not None:
            self._lock.close()


def _exit_failed():
    """End a peer that could not start with a non-zero status (twistd itself exits 0)."""
    sys.stdout.flush()
    sys.__stderr__.flush()
    os._exit(1)
