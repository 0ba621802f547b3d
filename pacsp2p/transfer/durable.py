"""A durable copy of an instance recorded in the catalog: ``record`` (a conflict recorded
as such, with the hints owed for it), ``copy_in`` (repair, drain and hinted hand-off to
an archive of this peer: spooled, its header read, its bytes checked, recorded) and
``check_given`` (a copy given other bytes than announced is discarded). Used by the
writer (``ingest``, ``onejob``), the holder (``replicas``) and ``repair``.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from pacsp2p.catalog.db import stored_location
from pacsp2p.dicom.header import read_meta
from pacsp2p.dicom.incoming import spool
from pacsp2p.transfer.conflicts import conflict_logged


def record(catalog, meta, stored, peer, hints=(), then=None):
    """Record a durable copy in the catalog (a conflict is recorded as such), with the
    *hints* (peer, archive, via_peer, via_archive) owed for it; *then(conn, seq)* runs in
    the fact's transaction (not for a conflict)."""
    if stored.conflict:          # (its line: one limiter, see ``conflicts``)
        conflict_logged(catalog.reactor, meta.sop_instance_uid, stored.sha256,
                        stored.archive)
        d = catalog.record_conflict(meta.sop_instance_uid, stored.archive, stored.sha256)
        if hints:
            d.addCallback(lambda seq: catalog.add_hints(meta.sop_instance_uid, hints)
                          .addCallback(lambda _: seq))
        return d
    return catalog.record(meta, stored_location(meta, stored, peer), hints, then)


@defer.inlineCallbacks
def copy_in(f, target, uid: str, sha256: str, tmpdir: Path, catalog, peer: str):
    """Copy the instance *uid* read from the open file *f* (then closed) into our archive
    *target* and record it: spooled into *tmpdir*, its header read, its bytes checked
    against *sha256* if given (the copy dropped if they differ). Repair, drain and hinted
    hand-off to an archive of this peer."""
    path = yield deferToThread(spool, f, tmpdir)
    try:
        meta = yield deferToThread(read_meta, path)
        if meta.sop_instance_uid != uid:
            raise ValueError(f"the copy of {uid} read holds {meta.sop_instance_uid}")
        stored = yield target.store(path, meta)
    finally:
        deferToThread(path.unlink, True)
    yield check_given(target, uid, stored, sha256, ValueError, "the catalog's")
    yield record(catalog, meta, stored, peer)


def check_given(target, uid: str, stored, sha256: str, error, whose: str):
    """Deferred: the copy *stored* on archive *target* was given the bytes hashing to
    *sha256* (if any), else it is discarded (unless it was there before: a duplicate or
    a conflict) and fails with *error* naming both hashes (*whose*: the expected one's)."""
    if not sha256 or stored.given_sha256 == sha256:
        return defer.succeed(None)
    d = defer.succeed(None) if stored.duplicate or stored.conflict else \
        defer.maybeDeferred(target.discard, uid, stored.sha256)

    def fail(_):
        raise error(f"{uid}: the copy hashes to {stored.given_sha256[:12]}, {whose} "
                    f"{sha256[:12]}")
    return d.addCallback(fail)
