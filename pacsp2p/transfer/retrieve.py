"""Retrieval: the instances an identifier names, and opening each from a live replica.

For each instance the replicas are tried in order; a replica that fails to open is
skipped for the next one (fail over). An instance none of whose replicas opens is a
failed sub-operation, reported by SOP Instance UID.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.types import InstanceRef

log = Logger()


class Unavailable(Exception):
    """No replica of an instance could be read."""


class Retrieval:
    def __init__(self, refs: list[InstanceRef], archives: dict, peer: str, overlay=None):
        self.refs = refs
        self.archives = archives
        self.peer = peer
        self.overlay = overlay

    def sources(self, ref: InstanceRef):
        """Replicas of *ref* this peer can read now: local archives first, then live peers."""
        local = [loc for loc in ref.locations if loc.peer == self.peer
                 and "open" in getattr(self.archives.get(loc.archive), "capabilities", ())]
        remote = [loc for loc in ref.locations if loc.peer != self.peer
                  and self.overlay is not None and self.overlay.alive(loc.peer)]
        return local + remote

    @defer.inlineCallbacks
    def open(self, ref: InstanceRef):
        """Deferred[binary file] of *ref* from the first replica that answers."""
        errors = [f"{loc.archive}@{loc.peer}: not reachable" for loc in ref.locations
                  if loc not in self.sources(ref)]
        for loc in self.sources(ref):
            try:
                if loc.peer == self.peer:
                    f = yield self.archives[loc.archive].open(ref.sop_instance_uid, loc.sha256)
                else:
                    f = yield self.overlay.fetch(loc)
                return f
            except Exception as e:
                errors.append(f"{loc.archive}: {e}")
                log.warn("replica {archive} of {uid} failed: {err}", archive=loc.archive,
                         uid=ref.sop_instance_uid, err=e)
        raise Unavailable(f"{ref.sop_instance_uid}: " + "; ".join(errors))
