"""The reactor's part of a replicated C-STORE already recorded by the writer thread.

When placement's first wave is one archive of ours and pushes to the others
(``forward.Forward``), the writer thread keeps our copy and records it with a hint for
each remote copy; the Success is sent by whichever thread sees the last part done (our
copy, or a pushed copy's answer read by its ``push-send`` thread). What is left for the
reactor is bookkeeping, in one plain callback chain (no placement, no DeferredList, no
catalog job): once every pushed copy has answered with our hash, its commit goes in the
holder's group commit (``commits``), the catalog hears of our fact, and the store
succeeds. Anything else (a push failed or refused, another hash) goes the general way
(``Ingest.store``) with our record kept: its copy's commit then writes only the hints,
its discard forgets it first (``as_recorded``). A hint written for a holder whose push
then failed stays: hinted hand-off makes that copy later (one more than R if a
stand-in took it meanwhile; nothing is lost).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from pacsp2p.catalog.facts import stamped
from pacsp2p.types import StoreResult


def store(forward, path, meta) -> defer.Deferred:
    """Reactor: Deferred[StoreResult] for *forward*, whose copy here the writer thread
    recorded (``forward.seq``)."""
    targets = forward.remotes
    results: list = [None] * len(targets)
    left = [len(targets)]
    done = defer.Deferred()

    def one(result, i):
        results[i] = result
        left[0] -= 1
        if not left[0]:
            done.callback(None)
        return result
    for i, t in enumerate(targets):
        forward.early[(t.peer, t.name)].addBoth(one, i)
    return done.addCallback(lambda _: _finish(forward, path, meta, results))


def _finish(forward, path, meta, copies):
    ingest, uid = forward.ingest, meta.sop_instance_uid
    ingest.catalog.committed_now(forward.seq)
    keys = [(uid, t.peer, t.name) for t in forward.remotes]
    if not meta.sha256 or any(isinstance(c, Failure) or c.stored.given_sha256 != meta.sha256
                              for c in copies):
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
