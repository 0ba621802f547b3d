"""The cluster API: the one door for the facade, the CLI and the web pages.

``store``, ``find``, ``retrieve`` and ``status`` hide where instances live (which
archive, which peer). Called from the reactor thread; everything returns a Deferred.
"""

from __future__ import annotations

import collections

from twisted.internet import defer

from pacsp2p import __version__
from pacsp2p.transfer.ingest import Ingest
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.types import Query


class Cluster:
    def __init__(self, settings, catalog, archives, strategies, overlay=None, reactor=None):
        self.settings = settings
        self.catalog = catalog
        self.archives = {a.name: a for a in archives}
        self.strategies = strategies
        self.overlay = overlay
        self.reactor = reactor
        self.crawlers = []
        self.retrievals = collections.deque(maxlen=20)    # the latest, for status
        self.ingest = Ingest(settings, self.archives, catalog, strategies, overlay, reactor)
        if overlay is not None:
            self.ingest.offers = overlay.offers

    def begin_store(self, uid, sop_class, transfer_syntax, head, pause, resume):
        """For a C-STORE whose data set starts arriving: a plan to pass to ``store``, or
        None. A plan with ``feed`` gets each fragment (then ``finish`` or ``abort``): its
        replicas are made while it arrives; one with ``in_thread(path, meta)`` is called
        by the thread that wrote the file, once it is complete and its header read."""
        return self.ingest.begin(uid, sop_class, transfer_syntax, head, pause, resume)

    def store(self, received, meta, plan=None):
        """Keep one received Part-10 file; Deferred[StoreResult] or StoreError."""
        return self.ingest.store(received, meta, plan)

    def find(self, query, return_keys):
        """Deferred[list of {keyword: value}], one per matching entity."""
        return self.catalog.find(query, return_keys)

    @defer.inlineCallbacks
    def retrieve(self, query):
        """Deferred[Retrieval] for the instances *query* names."""
        refs = yield self.catalog.resolve(query)
        retrieval = Retrieval(refs, self.archives, self.settings.peer.name, self.overlay,
                              self.strategies, self.reactor)
        self.retrievals.append(retrieval)
        return retrieval

    @defer.inlineCallbacks
    def where(self, study: str | None = None, instance: str | None = None):
        """Each instance of a study (or one instance) with its replicas and availability."""
        query = (Query("STUDY", {"StudyInstanceUID": study}) if study else
                 Query("IMAGE", {"SOPInstanceUID": instance or ""}))
        refs = yield self.catalog.resolve(query)
        me = self.settings.peer.name
        alive = (lambda p: p == me) if self.overlay is None else self.overlay.alive
        return [{"instance": r.sop_instance_uid,
                 "replicas": [{"peer": loc.peer, "archive": loc.archive,
                               "available": alive(loc.peer)} for loc in r.locations]}
                for r in refs]

    @defer.inlineCallbacks
    def status(self):
        counts = yield self.catalog.counts()
        archives = {}
        for name, archive in self.archives.items():
            try:
                archives[name] = yield archive.health()
            except Exception as e:
                archives[name] = {"up": False, "error": str(e)}
        status = {"peer": self.settings.peer.name, "version": __version__,
                  "facade": {"ae_title": self.settings.facade.ae_title,
                             "port": self.settings.facade.port},
                  "catalog": counts, "archives": archives}
        if self.overlay is not None:
            status["overlay"] = self.overlay.status()
        status["ingest"] = {"copies": dict(self.ingest.copies)}
        status["retrievals"] = [r.status() for r in self.retrievals if r.started]
        status["crawls"] = [c.status() for c in self.crawlers]
        return status
