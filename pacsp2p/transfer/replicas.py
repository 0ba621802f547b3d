"""The receiving side of a replicated write: keep, then record or drop, a copy.

Two phases, so that an instance is recorded nowhere unless the write quorum is met:
``replicate`` fetches the bytes from the writing peer's bulk channel and makes them
durable on an archive (pending, not in the catalog); ``commit`` records the copy as a
location fact of this peer; ``discard`` drops it. Pending copies never committed (the
writer died) are dropped after ``PENDING_TTL`` seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pacsp2p.catalog.db import stored_location
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.overlay.commands import ReplicaRefused
from pacsp2p.types import InstanceMeta

log = Logger()

PENDING_TTL = 600.0


class ReplicaService:
    def __init__(self, peer: str, archives: dict, catalog, overlay, reactor):
        self.peer, self.archives, self.catalog = peer, archives, catalog
        self.overlay, self.reactor = overlay, reactor
        self.pending: dict[tuple, tuple] = {}
        self.cluster = None                 # set by the service (for direct delivery)
        self._janitor = task.LoopingCall(self._expire)
        self._janitor.clock = reactor

    def start(self):
        self._janitor.start(60, now=False)

    def stop(self):
        if self._janitor.running:
            self._janitor.stop()

    @defer.inlineCallbacks
    def replicate(self, sender: str, archive: str, uid: str, sha256: str, token: str,
                  meta_json: str | None = None):
        target = self.archives.get(archive)
        if target is None or "store" not in target.capabilities:
            raise ReplicaRefused(f"peer {self.peer} has no writable archive {archive!r}")
        member = self.overlay.membership.members.get(sender)
        if member is None:
            raise ReplicaRefused(f"peer {self.peer} does not know peer {sender!r}")
        f = yield self.overlay.bulk.fetch_offer(member, token)
        try:
            path = Path(f.name)
            if meta_json:                     # the sender parsed and checked it already
                meta = InstanceMeta(**json.loads(meta_json))
            else:
                try:
                    meta = yield deferToThreadPool(self.reactor, self.overlay.pool,
                                                   read_meta, path)
                except BadDataset as e:
                    raise ReplicaRefused(f"{uid}: {e}") from e
            if meta.sop_instance_uid != uid:
                raise ReplicaRefused(f"offered {uid} but the bytes are {meta.sop_instance_uid}")
            stored = yield target.store(path, meta)
        finally:
            f.close()
        if sha256 and stored.sha256 != sha256:
            if not stored.duplicate and not stored.conflict:
                yield target.discard(uid, stored.sha256)
            raise ReplicaRefused(f"{uid}: bytes hash to {stored.sha256[:12]}, "
                                 f"announced {sha256[:12]}")
        self.pending[(archive, uid, stored.sha256)] = (meta, stored, self.reactor.seconds())
        return stored

    @defer.inlineCallbacks
    def commit(self, archive: str, uid: str, sha256: str):
        entry = self.pending.pop((archive, uid, sha256), None)
        if entry is None:
            raise ReplicaRefused(f"no pending copy of {uid} on {archive}")
        meta, stored, _ = entry
        seq = yield record(self.catalog, meta, stored, self.peer)
        return seq or 0                     # 0: a conflict, recorded apart

    def discard(self, archive: str, uid: str, sha256: str):
        entry = self.pending.pop((archive, uid, sha256), None)
        if entry is None:
            return defer.succeed(None)
        _, stored, _ = entry
        if stored.duplicate or stored.conflict:
            return defer.succeed(None)       # those bytes were there before: keep them
        return self.archives[archive].discard(uid, sha256)

    @defer.inlineCallbacks
    def drop(self, archive: str, uid: str, sha256: str):
        """Remove a stand-in copy after hinted hand-off, and tell the cluster (tombstone)."""
        target = self.archives.get(archive)
        if target is None:
            raise ReplicaRefused(f"peer {self.peer} has no archive {archive!r}")
        yield target.discard(uid, sha256)
        yield self.catalog.forget(uid, archive, sha256)

    def send_to(self, ae_title, host, port, calling_ae, originator_ae, originator_msg_id,
                uids):
        """Direct delivery: send what our archives hold of *uids* to the destination."""
        from pacsp2p.config import Destination
        from pacsp2p.transfer.direct import send_for
        return send_for(self.cluster, Destination(ae_title, host, port), calling_ae,
                        originator_ae, originator_msg_id, uids, self.reactor)

    def _expire(self):
        now = self.reactor.seconds()
        for key, (_, _, since) in list(self.pending.items()):
            if now - since > PENDING_TTL:
                log.warn("dropping copy of {uid} on {archive}: its writer never committed",
                         uid=key[1], archive=key[0])
                self.discard(*key)


def record(catalog, meta, stored, peer):
    """Record a durable copy in the catalog (a conflict is recorded as such)."""
    if stored.conflict:
        log.warn("conflict: {uid} received again with different bytes (sha256 {sha}); "
                 "both kept on {archive}", uid=meta.sop_instance_uid, sha=stored.sha256,
                 archive=stored.archive)
        return catalog.record_conflict(meta.sop_instance_uid, stored.archive, stored.sha256)
    return catalog.record(meta, stored_location(meta, stored, peer))
