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
    def __init__(self, refs: list[InstanceRef], archives: dict):
        self.refs = refs
        self.archives = archives
        self.completed = self.failed = 0

    @defer.inlineCallbacks
    def open(self, ref: InstanceRef):
        """Deferred[binary file] of *ref* from the first replica that answers."""
        errors = []
        for loc in ref.locations:
            archive = self.archives.get(loc.archive)
            if archive is None or not loc.available or "open" not in archive.capabilities:
                errors.append(f"{loc.archive}: not reachable from this peer")
                continue
            try:
                f = yield archive.open(ref.sop_instance_uid, loc.sha256)
                return f
            except Exception as e:
                errors.append(f"{loc.archive}: {e}")
                log.warn("replica {archive} of {uid} failed: {err}", archive=loc.archive,
                         uid=ref.sop_instance_uid, err=e)
        raise Unavailable(f"{ref.sop_instance_uid}: " + "; ".join(errors))
