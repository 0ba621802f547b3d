"""The reactor's part of a replicated C-STORE whose first wave was pushed as it arrived.

When placement's first wave is one archive of ours and pushes to the others
(``forward.Forward``), the writer thread keeps our copy and records it with a hint for
each remote copy; the Success is sent by whichever thread sees the last part done (our
copy, or a pushed copy's answer read by its ``push-send`` thread). What is left for the
reactor (``store``) is bookkeeping, in one plain callback chain (no placement, no
catalog job): once every pushed copy has answered with our hash, its commit goes in
the holder's group commit (``commits``), the catalog hears of our fact, and the store
succeeds. When the first wave is pushes only (``store_remote``), their
commits are waited for, as ``Ingest.store`` waits for them, in such a chain too; to a
holder that takes it, each goes behind its copy's END, not after its answer
(``pushport.COMMIT_LAST``: one round trip fewer; the failures are in its docstring).
Anything else (a push failed or refused, another hash) goes the general way
(``Ingest.store``), with our record kept: its copy's commit then writes only the hints,
its discard forgets it first (``as_recorded``). A hint written for a holder whose push
then failed stays: hinted hand-off makes that copy later (one more than R if a stand-in
took it meanwhile; nothing is lost).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from pacsp2p.catalog.facts import stamped
from pacsp2p.dicom.status import OUT_OF_RESOURCES
from pacsp2p.types import StoreError, StoreResult


def _all(ds, consume: bool) -> defer.Deferred:
    """Deferred[list]: each of *ds*'s results (a Failure for one that failed), in order,
    once all have one; *consume*: their failures are handled here (else they go on, for
    ``Ingest.store`` to take)."""
    return defer.DeferredList(ds, consumeErrors=consume).addCallback(
        lambda results: [result for _, result in results])


def _pushed(forward, meta, copies) -> bool:
    """Every pushed copy made, holding the bytes we received."""
    return bool(meta.sha256) and not any(
        isinstance(c, Failure) or c.stored.given_sha256 != meta.sha256 for c in copies)


def store(forward, path, meta) -> defer.Deferred:
    """Reactor: Deferred[StoreResult] for *forward*, whose copy here the writer thread
    recorded (``forward.seq``)."""
    d = _all([forward.early[(t.peer, t.name)] for t in forward.remotes], False)
    return d.addCallback(_finish, forward, path, meta)


def _finish(copies, forward, path, meta):
    ingest, uid = forward.ingest, meta.sop_instance_uid
    ingest.catalog.committed_now(forward.seq)
    keys = [(uid, t.peer, t.name) for t in forward.remotes]
    if not _pushed(forward, meta, copies):
        ingest.committing.difference_update(keys)
        return ingest.store(path, meta, forward)        # the general way (``as_recorded``)
    forward.early = {}
    meta = stamped(meta, forward.stamp)
    ingest.copies["local"] += 1
    ingest.copies["pushed"] += len(copies)
    ingest.recorded_in_thread += 1
    for c, key in zip(copies, keys):
        d = defer.maybeDeferred(c.commit, meta, (), True)      # in a group commit
        d.addCallback(lambda _, key=key: ingest.catalog.drop_hint(*key))
        d.addErrback(ingest._commit_failed, c, uid, owed=True)
        d.addBoth(lambda _, key=key: ingest.committing.discard(key))
    return StoreResult(uid, (forward.kept, *(c.stored for c in copies)))


def store_remote(forward, path, meta) -> defer.Deferred:
    """Reactor: Deferred[StoreResult] for *forward*, whose first wave is pushes only:
    their commits sent at once (with what waits for each holder) and waited for; a
    pipelined copy's commit is sent now, behind its END (the verdict: our hash). A data
    set whose header reads otherwise whole than its first bytes did (placed on those,
    pushed with those attributes) goes the general way, which copies it again."""
    same = bool(meta.sha256) and forward.attributes == meta.attributes
    for push, t in zip(forward.pushes, forward.remotes):
        if push.pipelined and same:         # with what waits for that holder
            forward.ingest.group.behind(push, t.peer, [t.name, meta.sop_instance_uid,
                                                       meta.sha256])
        elif push.pipelined:
            push.verdict(None)
    if forward.attributes != meta.attributes:
        return forward.ingest.store(path, meta, forward)
    d = _all([forward.early[(t.peer, t.name)] for t in forward.remotes], False)
    return d.addCallback(_commit_remote, forward, path, meta)


def _commit_remote(copies, forward, path, meta):
    ingest = forward.ingest
    if not _pushed(forward, meta, copies):
        return ingest.store(path, meta, forward)
    forward.early = {}
    meta = stamped(meta, forward.stamp)
    ingest.copies["pushed"] += len(copies)
    d = _all([defer.maybeDeferred(c.commit, meta) for c in copies], True)
    return d.addCallback(_committed, ingest, copies, meta.sop_instance_uid, forward.ranked)


def _committed(results, ingest, copies, uid, ranked):
    kept = []
    for c, r in zip(copies, results):
        if isinstance(r, Failure):
            ingest._commit_failed(r, c, uid)
        else:
            kept.append(c)
    if len(kept) < max(1, ingest.quorum):
        raise StoreError(OUT_OF_RESOURCES, f"{uid}: copies made but only {len(kept)} "
                                           f"could be recorded")
    result = StoreResult(uid, tuple(c.stored for c in kept))
    if len(kept) == len(copies):
        return result                  # R copies, each where placement wanted it
    # a commit failed, W still met: the copy is owed (a hint), as ``Ingest.store`` owes
    # it — repair looks only for lost copies, never for one that was never recorded
    return ingest._owe(uid, ranked, kept).addCallback(lambda _: result)


def as_recorded(copy, catalog, archive, meta, stored):
    """*copy* (our kept copy's ``_Copy``) as one the writer thread recorded already:
    its commit writes only the hints, its discard forgets it first (unless it was
    there before: a duplicate keeps its record and its file)."""
    uid = meta.sop_instance_uid

    def commit(meta, hints=(), later=False):
        return catalog.add_hints(uid, hints) if hints else defer.succeed(None)

    def discard():
        if stored.duplicate or stored.conflict:
            return None
        d = catalog.forget(uid, archive.name, stored.sha256)
        return d.addCallback(lambda _: archive.discard(uid, stored.sha256))
    copy.commit, copy.discard = commit, discard
    return copy
