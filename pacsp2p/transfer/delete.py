"""Delete, cluster-wide: tombstones, purging the archives, and IOCM rejection notes.

``Deleter.delete(scope, reason)`` (the door's ``delete`` verb; ``pacsp2p delete``)
resolves a study, series or list of instances in the catalog and writes one tombstone
per instance into this peer's log (``catalog.tombstones``: the marker fact and its
payload, and — in the same transaction — every copy the tombstone covers is taken out
of the view). Anti-entropy carries the tombstones to every peer, now or whenever it
comes back; each applies them the same way. The verb answers once the tombstones are
durable here and every peer alive has pulled them (at most ``SPREAD_TIMEOUT`` seconds:
a peer that is slower or down gets them later all the same).

The purge (``start``: every ``PURGE_EVERY`` seconds) removes this peer's own covered
copies from its archives: through the adapter's ``delete`` (capability ``delete``:
embedded files, Orthanc's REST DELETE, a DICOMweb server that supports DELETE). An
archive without it cannot delete (plain DIMSE): the copy stays there, hidden from the
view, and is listed in ``status`` as retained by that archive. The queue is in the
catalog: a purge interrupted by a crash goes on at the next start. It also issues the
follow-up tombstones the catalog owes (copies removed that no tombstone covered).

Copy paths ask before they bring a copy back: ``copy_allowed`` (a copy of a copy —
hinted hand-off, repair — is refused for an instance deleted here), ``pushed_before``
(a copy pushed before this peer learned of the delete is not committed: a late push).

A rejection note (IHE IOCM: a Key Object Selection document titled 113001, 113037,
113038 or 113039, ``dicom.rejection``) received by C-STORE is stored like any instance
and then rejects the instances it references: ``RejectionSession`` wraps the store
session ``Cluster.receive`` makes for one, and the C-STORE is answered once the
tombstones are durable here.
"""

from __future__ import annotations

import collections
import time

from twisted.internet import defer, task
from twisted.logger import Logger

from pacsp2p.catalog import tombstones
from pacsp2p.dicom.rejection import BadRejection, read_rejection
from pacsp2p.dicom.status import PROCESSING_FAILURE
from pacsp2p.transfer.session import StoreSession
from pacsp2p.types import Location, Query, Scope, StoreError
from pacsp2p.validate import check_uid, shown

log = Logger()

KEYS = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
        "IMAGE": "SOPInstanceUID"}
MAX_UIDS = 10_000              # studies, series or instances named in one delete
SPREAD_TIMEOUT = 30.0          # seconds delete() waits for the peers alive to have it
CATCH_UP = 5.0                 # seconds delete() first spends pulling what others know
PURGE_EVERY = 2.0              # seconds between looks at the purge queue


class DeleteError(ValueError):
    """The scope of a delete is not one (unknown level, invalid or too many UIDs)."""


def check_scope(scope: Scope) -> tuple[str, list[str]]:
    """(the catalog key of its level, its UIDs) or DeleteError."""
    key = KEYS.get(getattr(scope, "level", None))
    if key is None:
        raise DeleteError(f"unknown level {shown(getattr(scope, 'level', None))} "
                          "(STUDY, SERIES or IMAGE)")
    uids = list(dict.fromkeys(scope.uids))
    if not uids:
        raise DeleteError("no UID given")
    if len(uids) > MAX_UIDS:
        raise DeleteError(f"{len(uids)} UIDs in one delete (at most {MAX_UIDS})")
    try:
        for uid in uids:
            check_uid(uid, key)
    except ValueError as e:
        raise DeleteError(str(e)) from None
    return key, uids


class Deleter:
    def __init__(self, settings, catalog, archives: dict, overlay=None, reactor=None):
        self.peer = settings.peer.name
        self.catalog, self.archives = catalog, archives
        self.overlay, self.reactor = overlay, reactor
        self.vectors: dict[str, dict] = {}        # member -> its vector, as last heard
        if overlay is not None:
            overlay.membership.on_vector.append(self._heard)
        # since start: instances deleted here, rejection notes applied, own copies removed
        # from archives, own copies an archive kept (it cannot delete)
        self.stats = {"deleted": 0, "rejection_notes": 0, "copies_removed": 0,
                      "copies_retained": 0}
        self.recent = collections.deque(maxlen=10)      # the latest deletes, for status
        self._loop = None
        self._working = False
        self._warned: dict[str, float] = {}        # archive -> when a failure was logged

    # -- life cycle ------------------------------------------------------------------
    def start(self):
        self._loop = task.LoopingCall(self._work)
        self._loop.clock = self.reactor
        self._loop.start(PURGE_EVERY, now=True).addErrback(
            lambda f: log.failure("the purge of deleted instances stopped", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _heard(self, member, vector) -> None:
        self.vectors[member.name] = vector

    # -- the verb ----------------------------------------------------------------------
    @defer.inlineCallbacks
    def delete(self, scope: Scope, reason: str, wait: bool = True, catch_up: bool = True):
        """Deferred[int]: the instances of *scope* deleted (those the catalog held, once
        caught up with the peers alive: ``_catch_up``). For instances named one by one
        (level IMAGE) a tombstone is written even for those the catalog does not know
        (yet): copies elsewhere go when they are learned."""
        key, uids = check_scope(scope)
        reason = tombstones.clean_reason(reason).strip() or "deleted"
        if catch_up:
            yield self._catch_up()
        refs = yield self.catalog.resolve(Query(scope.level, {key: "\\".join(uids)}))
        known = [r.sop_instance_uid for r in refs]
        targets = list(dict.fromkeys(known + (uids if scope.level == "IMAGE" else [])))
        if not targets:
            return 0
        vector = dict(self.catalog.vector)
        seqs = yield defer.gatherResults([self._mark(uid, vector, reason)
                                          for uid in targets], consumeErrors=True)
        self.stats["deleted"] += len(known)
        self.recent.append({"level": scope.level, "uids": uids[:5], "instances": len(known),
                            "reason": reason, "at": time.time()})
        log.info("delete: {n} instance(s) of {kind} {what} deleted ({reason}); "
                 "tombstones {first}..{last} of {peer}", n=len(known),
                 kind=scope.level.lower(), what=", ".join(uids[:3]) +
                 (f" and {len(uids) - 3} more" if len(uids) > 3 else ""), reason=reason,
                 first=min(seqs), last=max(seqs), peer=self.peer)
        self.kick()
        if wait:
            yield self._spread(max(seqs))
        return len(known)

    @defer.inlineCallbacks
    def reject(self, rejection):
        """Apply an IOCM rejection note (``dicom.rejection.Rejection``): Deferred[int],
        the instances rejected that the catalog held."""
        self.stats["rejection_notes"] += 1
        log.info("rejection note {note} ({reason}): rejects {n} instance(s) of study "
                 "{studies}", note=rejection.sop_instance_uid, reason=rejection.reason,
                 n=len(rejection.instances), studies=", ".join(rejection.studies[:3]))
        uids, n = list(rejection.instances), 0
        yield self._catch_up()
        for i in range(0, len(uids), MAX_UIDS):
            n += yield self.delete(Scope("IMAGE", tuple(uids[i:i + MAX_UIDS])),
                                   rejection.reason, wait=False, catch_up=False)
        return n

    @defer.inlineCallbacks
    def _catch_up(self):
        """Before a delete reads its scope: ask the peers alive how far they hold each
        log and pull what they hold that this peer lacks (at most ``CATCH_UP`` s). The
        instances deleted and the tombstones' vector then cover every copy a live peer
        knows of, not only those this peer had heard of: a peer behind a busy writer,
        or just back, would delete part of a study, and a holder that then went down
        would keep the copies the deleter never saw visible elsewhere until it returned.
        True if caught up."""
        o = self.overlay
        if o is None or not hasattr(o, "pull_from"):
            return True
        names = [n for n in o.membership.members if n != self.peer and o.alive(n)]
        if not names:
            return True
        try:
            yield o.ask_vectors(names, set(self.catalog.vector) | set(names) |
                                {self.peer}).addTimeout(CATCH_UP, self.reactor)
        except Exception as e:               # slow peers: what was heard is used
            log.warn("delete: asking the peers' vectors: {err}", err=e)
        deadline = self.reactor.seconds() + CATCH_UP
        while True:
            mine = self.catalog.vector
            ahead = {n: v for n in names if (v := self.vectors.get(n)) and
                     any(s > mine.get(origin, 0) for origin, s in v.items()
                         if origin != self.peer)}
            if not ahead:
                return True
            if self.reactor.seconds() >= deadline:
                log.warn("delete: not caught up with {peers} after {t:.0f} s: copies only "
                         "they know of go when they learn of the delete",
                         peers=", ".join(sorted(ahead)), t=CATCH_UP)
                return False
            for name, vector in ahead.items():
                o.pull_from(name, vector)
            yield task.deferLater(self.reactor, 0.1, lambda: None)

    def _mark(self, uid: str, vector: dict, reason: str, follow_up: bool = False):
        """Write the marker of *uid* (and, in its transaction, the tombstone)."""
        def then(conn, seq):
            tombstones.issued(conn, self.peer, uid, seq, vector, reason, follow_up)
        return self.catalog.record(None, Location(uid, tombstones.MARKER_ARCHIVE, self.peer,
                                                  "", tombstones.MARKER_SIZE), then=then)

    @defer.inlineCallbacks
    def _spread(self, top: int):
        """Wait (bounded) until every peer alive has pulled our log up to *top*."""
        if self.overlay is None:
            return True
        deadline = self.reactor.seconds() + SPREAD_TIMEOUT
        asked = self.reactor.seconds()
        while True:
            behind = [name for name in self.overlay.membership.members
                      if self.overlay.alive(name) and
                      self.vectors.get(name, {}).get(self.peer, 0) < top]
            if not behind:
                return True
            if self.reactor.seconds() >= deadline:
                log.warn("delete: peer(s) {peers} have not pulled the tombstones after "
                         "{t:.0f} s; they will (anti-entropy)", peers=", ".join(behind),
                         t=SPREAD_TIMEOUT)
                return False
            if self.reactor.seconds() - asked >= 1.0 and hasattr(self.overlay, "ask_vectors"):
                # vectors are heard only from the peers we sync with: ask the others
                asked = self.reactor.seconds()
                self.overlay.ask_vectors(behind, [self.peer])
            yield task.deferLater(self.reactor, 0.2, lambda: None)

    # -- the purge -------------------------------------------------------------------------
    def kick(self) -> None:
        """Look at the purge queue now."""
        if self._loop is not None and self._loop.running and not self._working:
            self.reactor.callLater(0, self._work)

    @defer.inlineCallbacks
    def _work(self):
        if self._working:
            return
        self._working = True
        try:
            yield self._purge()
            ups = yield self.catalog.read(tombstones.follow_ups)
            for uid, seq, reason in ups:
                yield self._mark(uid, {self.peer: seq}, reason, follow_up=True)
            if ups:
                log.info("delete: follow-up tombstones for {n} instance(s) this peer held "
                         "when it learned of their deletion", n=len(ups))
        except Exception as e:
            log.error("the purge of deleted instances failed: {err} (tried again)", err=e)
        finally:
            self._working = False

    @defer.inlineCallbacks
    def _purge(self):
        removed, retained = collections.Counter(), collections.Counter()
        failing: set[str] = set()        # archives that failed (or are down) this pass
        while True:
            items = yield self.catalog.read(tombstones.to_purge)
            items = [i for i in items if i[1] not in failing]
            if not items:
                break
            for uid, name, _sha, reason in items:
                if name in failing:
                    continue
                outcome = yield self._purge_one(uid, name, reason)
                if outcome == "removed":
                    removed[name] += 1
                elif outcome == "retained":
                    retained[name] += 1
                elif outcome is None:
                    failing.add(name)   # down: its copies wait for the next pass
        for name, n in removed.items():
            log.info("delete: {n} deleted instance(s) removed from archive {archive}",
                     n=n, archive=name)
        for name, n in retained.items():
            log.warn("delete: archive {archive} cannot delete: {n} deleted instance(s) "
                     "retained there, hidden from the view (pacsp2p status lists them)",
                     archive=name, n=n)

    @defer.inlineCallbacks
    def _purge_one(self, uid: str, name: str, reason: str):
        """"removed", "retained", "gone" (nothing to do), or None (failed: later)."""
        archive = self.archives.get(name)
        live = yield self.catalog.read(
            lambda conn: tombstones.own_live(conn, self.peer, uid, name))
        if live or archive is None:          # sent again meanwhile; or no such archive
            yield self.catalog.write(lambda conn: tombstones.purged(conn, uid, name))
            return "gone"
        if "delete" not in archive.capabilities:
            yield self.catalog.write(lambda conn: tombstones.purged(conn, uid, name, reason))
            self.stats["copies_retained"] += 1
            return "retained"
        if archive.up is False:
            return None                 # the health loop said so already: later
        try:
            yield archive.delete(uid, "")
        except Exception as e:
            now = self.reactor.seconds()
            if now - self._warned.get(name, -1e9) >= 60:     # one line a minute at most
                self._warned[name] = now
                log.warn("delete: removing deleted instances from archive {archive} "
                         "failed ({uid}: {err}); tried again every {t:.0f} s", uid=uid,
                         archive=name, err=shown(str(e), 300), t=PURGE_EVERY)
            return None
        yield self.catalog.write(lambda conn: tombstones.purged(conn, uid, name))
        self.stats["copies_removed"] += 1
        return "removed"

    # -- status ------------------------------------------------------------------------
    @defer.inlineCallbacks
    def status(self):
        summary = yield self.catalog.read(lambda conn: tombstones.summary(conn, self.peer))
        return {**summary, **self.stats, "recent": list(self.recent)}


# -- what copy paths ask --------------------------------------------------------------------

@defer.inlineCallbacks
def copy_allowed(catalog, uid: str):
    """Deferred[bool]: may a copy of a copy of *uid* (hinted hand-off, repair) be kept
    here? Not if *uid* was deleted and this peer knows no live copy of it (sent again)."""
    learned, live = yield catalog.read(lambda conn: tombstones.state(conn, uid))
    return learned is None or live > 0


@defer.inlineCallbacks
def pushed_before(catalog, uid: str, since: float):
    """Deferred[bool]: did this peer learn of a deletion of *uid* after *since* (the
    ``time.monotonic()`` a copy of it was made here)? Such a copy was on its way before
    the delete (a late push): it is not committed. No catalog read if no deletion was
    learned since."""
    if tombstones.no_news_since(since):
        return False
    return (yield catalog.read(lambda conn: tombstones.learned_after(conn, uid, since)))


# -- rejection notes -----------------------------------------------------------------------

class RejectionSession(StoreSession):
    """The store session of a Key Object Selection document: stored like any instance
    (the *inner* session does it all); if it is a rejection note, the instances it
    references are rejected once it is stored."""

    def __init__(self, inner: StoreSession, deleter: Deleter):
        super().__init__(inner.ingest)
        self.inner, self.deleter = inner, deleter
        self.rejection = None
        self.problem = None

    @property
    def streams(self):
        return self.inner.streams

    @property
    def kept(self):
        return self.inner.kept

    def feed(self, piece) -> None:
        self.inner.feed(piece)

    def complete(self) -> None:
        self.inner.complete()

    def abort(self) -> None:
        self.inner.abort()

    def written(self, path) -> None:
        self.inner.written(path)

    def abandon(self) -> None:
        self.inner.abandon()

    def header_read(self, path, meta) -> None:
        """Writer thread: read the note before the inner session may keep the file."""
        try:
            self.rejection = read_rejection(path)
        except BadRejection as e:
            self.problem = str(e)
        self.inner.header_read(path, meta)

    @defer.inlineCallbacks
    def store(self, path, meta):
        result = yield self.inner.store(path, meta)
        if self.problem:
            log.warn("rejection note {uid} stored but not acted on: {why}",
                     uid=meta.sop_instance_uid, why=shown(self.problem, 200))
        if self.rejection is not None:
            try:
                yield self.deleter.reject(self.rejection)
            except Exception as e:
                log.error("rejection note {uid}: the rejection failed: {err}",
                          uid=meta.sop_instance_uid, err=e)
                raise StoreError(PROCESSING_FAILURE, f"rejection not applied: {e}") from e
        return result
