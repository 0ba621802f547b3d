"""The ingest's one-job path: a peer alone with one archive that can ``keep``.

Every small instance costs the same few steps — fsync, header read, keep, catalog row —
and the C-STORE is answered only after all of them, so their order and the threads they
run in are the latency of a C-STORE (a storage SCU waits for each answer): here the
fsync starts first, in the thread that wrote the file (it needs no GIL to start), and
the rest runs meanwhile in one job of another thread (``OneJob``). ``unrecorded`` drops
a copy kept that the catalog could not record (used by ``ingest`` too).
"""

from __future__ import annotations

import functools
import inspect
import threading

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pacsp2p import threads
from pacsp2p.catalog.db import stored_location
from pacsp2p.catalog.facts import stamped
from pacsp2p.dicom.status import OUT_OF_RESOURCES, PROCESSING_FAILURE
from pacsp2p.strategies import StrategyError
from pacsp2p.transfer.conflicts import conflict_logged
from pacsp2p.transfer.durable import record
from pacsp2p.transfer.session import StoreSession
from pacsp2p.types import InstanceInfo, StoreError, StoreResult

log = Logger()


def unrecorded(failure, archive, meta, stored):
    """A copy kept on a local *archive* that the catalog could not record (a full disk,
    ...): removed — unless it was there before (a duplicate, or a conflicting version) —
    so the archive holds no file the catalog does not know; then *failure* goes on (the
    C-STORE fails only once the file is gone, so a retry cannot find it half-removed)."""
    uid = meta.sop_instance_uid
    log.error("C-STORE {uid}: the catalog could not record the copy on {archive}: {err}",
              uid=uid, archive=archive.name, err=failure.getErrorMessage())
    if stored.duplicate or stored.conflict:
        return failure
    d = defer.maybeDeferred(archive.discard, uid, stored.sha256)
    d.addErrback(lambda f: log.error("dropping the unrecorded copy of {uid} failed: {err}",
                                     uid=uid, err=f.getErrorMessage()))
    d.addBoth(lambda _: failure)
    return d


@functools.lru_cache(maxsize=None)
def keeps_unnamed(cls) -> bool:
    """Whether archives of *cls* keep a file from its descriptor (``keep(..., fd=)`` and
    ``flusher``: the embedded one), so that it may have no name (``unnamed``); a site's
    adapter written to ``IKeeps`` (``keep(received, meta)``) is given a named file."""
    try:
        return callable(getattr(cls, "flusher", None)) and \
            "fd" in inspect.signature(cls.keep).parameters
    except (AttributeError, TypeError, ValueError):
        return False


class OneJob(StoreSession):
    """A peer alone with one archive that can ``keep``: the thread that wrote the data
    set fsyncs it at once, while a thread of the ``ingest-keep`` pool reads its header,
    keeps it in the archive, checks placement and commits its catalog row
    (``Catalog.record_now``: the writer's connection, under its lock) — ``written_then``;
    the reactor then only answers. The fsync is most of a small instance's time on this
    disk, so it starts first, in a thread that needs no GIL to start it (a thread woken
    to fsync waited ~0.5 ms for the GIL the header read held); the thread hand-overs per
    C-STORE are four (to the writing thread, to the keeper and back, to the reactor),
    where queueing the record in the reactor and the catalog writer's batch made seven.
    Acknowledged only once fsynced and committed, as before. A file with no name yet
    (``unnamed``) is kept from its descriptor: its one name is the archive's."""

    @property
    def keeps_unnamed(self) -> bool:
        return keeps_unnamed(type(self.archive))

    def __init__(self, ingest, archive):
        super().__init__(ingest)
        self.archive = archive
        self.uid = self.flushed = None
        self.fd = None                         # the file's descriptor, in written_then
        self.seq = None                        # our fact's sequence number, committed
        self.unrecorded = None                 # Failure: kept, but not recorded
        self.not_durable = None                # OSError: recorded, but its fsync failed
        self.refused = None                    # why placement did not want it here
        self.later = False                     # recorded from the reactor (site plugins)

    def written(self, path):
        """Thread pool, the file is complete: start its fsync (in the archive's pool);
        one given by its descriptor (it may have no name) is fsynced when waited for."""
        flusher = getattr(self.archive, "flusher", None)
        if self.fd is not None and flusher is not None:
            self.flushed = flusher(path, self.fd)
        else:
            self.flushed = self.archive.begin_flush(path)

    def written_then(self, path, rest, fd=None, then=None):
        """Thread pool, the file is complete: fsync it here while ``rest`` (the header
        read, then ``header_read``: keep, record) runs in the keeping pool; rest()'s
        result once both are done, and *then(result)* called first by the thread that
        finished last (no hop to the other: the keeping thread's, mostly, which then
        answers the C-STORE). A keeping job not begun when the fsync is done (no
        CPU for its thread on a busy machine, or its pool stopping: a stopped pool drops
        the job) is done here instead: whichever thread claims it first runs it."""
        self.fd = fd
        flusher = getattr(self.archive, "flusher", None)
        keepers = threads.pool(self.ingest.reactor, "ingest-keep", 1, 4, lane=True)
        if flusher is None or not keepers.started or keepers.joined:
            return super().written_then(path, rest, then=then)
        flush = flusher(path, fd)              # open before rest() may unlink it
        self.flushed = lambda: None            # made_durable: this thread's fsync
        done, out, claim = threading.Event(), [], threading.Lock()
        parts, counting = [2], threading.Lock()     # the fsync, and keep()

        def part_done():
            with counting:
                parts[0] -= 1
                if parts[0]:
                    return
            if then is not None and out[0][1] is None:
                try:
                    then(out[0][0])
                except Exception:
                    log.failure("C-STORE {uid}: answering from the thread failed",
                                uid=self.uid or "?")

        def keep():
            if not claim.acquire(blocking=False):
                return                         # the other thread has it
            try:
                out.append((rest(), None))
            except BaseException as e:
                out.append((None, e))
            finally:
                part_done()
                done.set()
        keepers.callInThread(keep)
        try:
            flush()
        except OSError as e:
            log.error("C-STORE {uid}: cannot make the copy durable: {err}",
                      uid=self.uid or "?", err=e)
            self.not_durable = e
        part_done()
        keep()
        done.wait()
        result, error = out[0]
        if error is not None:
            raise error
        return result

    def durable_now(self) -> bool:
        """Kept, fsynced and recorded, placement content, nothing left for the reactor
        (``store`` then only tells the catalog's listeners and counts the copy)."""
        return self.kept is not None and self.unrecorded is None and \
            self.refused is None and self.not_durable is None and not self.later

    def header_read(self, path, meta):
        """Thread pool, its header read: keep, check placement and record (placement
        here only if it is built in: a site plugin is asked in the reactor, as
        everywhere, and the record is then made from there), wait for the fsync.
        Raises OSError if it cannot be kept (the C-STORE then fails with Out of
        Resources); what else goes wrong is left for ``store``: ``refused``,
        ``unrecorded`` (the catalog failed), ``not_durable`` (the fsync failed)."""
        self.uid = meta.sop_instance_uid
        try:
            self.kept = self.archive.keep(path, meta) \
                if self.fd is None or not self.keeps_unnamed else \
                self.archive.keep(path, meta, fd=self.fd)
        except OSError:
            self.abandon()
            raise
        if getattr(self.ingest.strategies, "site_plugins", None):
            self.later = True
        else:
            self.refused = self._placement_refuses(meta)
            if self.refused is None:
                self._record_here(meta, self.kept)
        try:
            self.archive.made_durable(meta, self.kept, self.flushed)
        except OSError as e:
            log.error("C-STORE {uid}: cannot make the copy durable: {err}",
                      uid=meta.sop_instance_uid, err=e)
            self.not_durable = e

    def _record_here(self, meta, stored) -> None:
        catalog = self.ingest.catalog
        try:
            if stored.conflict:
                reactor = self.ingest.reactor
                reactor.callFromThread(conflict_logged, reactor, meta.sop_instance_uid,
                                       stored.sha256, stored.archive)
                catalog.conflict_now(meta.sop_instance_uid, stored.archive, stored.sha256)
            else:
                self.seq = catalog.record_now(stamped(meta, self.stamp), stored_location(
                    meta, stored, self.ingest.peer))
        except Exception:
            self.unrecorded = Failure()

    def _placement_refuses(self, meta) -> str | None:
        """Why placement puts *meta* on no archive of ours that is up, or None."""
        a = meta.attributes
        info = InstanceInfo(meta.sop_instance_uid, meta.sop_class_uid,
                            a.get("StudyInstanceUID", ""), a.get("SeriesInstanceUID", ""),
                            a.get("Modality", ""), meta.size, a)
        try:
            ranked = self.ingest.rank(info)
        except StrategyError as e:
            return str(e)
        if not ranked or ranked[0].name != self.archive.name or not ranked[0].alive:
            return f"placement put {meta.sop_instance_uid} on no archive that is up"
        return None

    def abandon(self):
        """Thread pool: the file is not kept (bad data set); let its fsync finish."""
        try:
            self.flushed()
        except OSError:
            pass

    def store(self, path, meta):
        """Reactor: the copy is durable and recorded (or is recorded now: ``later``) —
        Deferred[StoreResult]; a copy not stored after all is undone first."""
        stored = self.kept
        if stored is None:
            return self.ingest.store(path, meta, None)
        if self.unrecorded is not None:
            return defer.maybeDeferred(unrecorded, self.unrecorded, self.archive, meta,
                                       stored)
        self.ingest.catalog.committed_now(self.seq)
        if self.later and self.not_durable is None:
            self.refused = self._placement_refuses(meta)
        if self.refused is not None:
            log.error("C-STORE {uid}: {err}", uid=meta.sop_instance_uid, err=self.refused)
            return self._undo(meta, stored, StoreError(PROCESSING_FAILURE, self.refused))
        if self.not_durable is not None:
            return self._undo(meta, stored, StoreError(OUT_OF_RESOURCES,
                                                       str(self.not_durable)))
        self.ingest.copies["local"] += 1
        result = StoreResult(meta.sop_instance_uid, (stored,))
        if not self.later:
            return defer.succeed(result)
        d = record(self.ingest.catalog, stamped(meta, self.stamp), stored, self.ingest.peer)
        return d.addCallbacks(lambda _: result, unrecorded,
                              errbackArgs=(self.archive, meta, stored))

    def _undo(self, meta, stored, error):
        """A copy kept and recorded that is not stored after all (its fsync failed, or
        placement refused it): the record undone (else a retry would find the same
        bytes and answer Success for them), the file dropped, then *error*. A copy that
        was there before (a duplicate: stored and answered once already) keeps its
        record and its file: this C-STORE fails, the earlier one's copy is not lost."""
        uid = meta.sop_instance_uid
        d = defer.succeed(None)
        fresh = not (stored.duplicate or stored.conflict)
        if self.seq is not None and fresh:
            d.addCallback(lambda _: self.ingest.catalog.forget(uid, self.archive.name,
                                                               stored.sha256))
        if fresh:
            d.addCallback(lambda _: self.archive.discard(uid, stored.sha256))
        d.addErrback(lambda f: log.error("undoing {uid} failed: {err}", uid=uid,
                                         err=f.getErrorMessage()))
        return d.addCallback(lambda _: defer.fail(error))
