"""Ingest: keep a received instance on the chosen archives, then record it.

The facade answers Success only after this Deferred fires: every target archive has the
bytes durably (fsync + rename) and the catalog has committed the fact. A failure of every
target becomes a :class:`StoreError` with a DICOM failure status (0xA700 family).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.catalog.db import stored_location
from pacsp2p.types import StoreError, StoreResult

log = Logger()

OUT_OF_RESOURCES = 0xA700


class Ingest:
    def __init__(self, peer_name: str, archives, catalog):
        self.peer_name = peer_name
        self.archives = [a for a in archives if "store" in a.capabilities]
        self.catalog = catalog

    def targets(self, meta):
        """The archives that receive this instance (one local archive for now)."""
        return self.archives[:1]

    @defer.inlineCallbacks
    def store(self, received, meta):
        kept = []
        for archive in self.targets(meta):
            try:
                stored = yield archive.store(received, meta)
            except Exception as e:
                log.error("archive {archive} could not store {uid}: {err}",
                          archive=archive.name, uid=meta.sop_instance_uid, err=e)
                continue
            if stored.conflict:
                log.warn("conflict: {uid} received again with different bytes "
                         "(sha256 {sha}); both kept on {archive}",
                         uid=meta.sop_instance_uid, sha=stored.sha256, archive=archive.name)
                yield self.catalog.record_conflict(meta.sop_instance_uid, archive.name,
                                                   stored.sha256)
                kept.append(stored)
                continue
            yield self.catalog.record(meta, stored_location(meta, stored, self.peer_name))
            kept.append(stored)
        if not kept:
            raise StoreError(OUT_OF_RESOURCES,
                             f"no archive could keep {meta.sop_instance_uid}")
        return StoreResult(meta.sop_instance_uid, tuple(kept))
