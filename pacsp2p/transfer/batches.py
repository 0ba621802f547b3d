"""A retrieval's batched reads: many small instances in one job or one request.

A retrieval (``transfer.retrieve``) claims instances source by source; the claims of one
scheduling pass on a source that can take them together go as ONE read instead of one
per instance:

- this peer's archive with ``read_many`` (the embedded archive): one job of its pool
  opens, reads whole and hashes the batch (``adapters.interface.IReadsMany``);
- another peer's archive: one request on the bulk channel (``BulkClient.fetch_many``,
  ``POST /instances/<archive>``), served there by one ``read_many`` job and received,
  split and hashed here in one pool job — of at most ``MAX_BATCH`` instances and
  ``MAX_BYTES`` bytes, each at most ``SMALL`` (a larger one is fetched alone, streamed);
  an instance the holder asks to be fetched alone (an archive without ``read_many``),
  and every instance of a holder that serves no batches (an older peer), is fetched
  alone as before. As they go many to a read, up to ``IN_FLIGHT`` small instances are
  asked of one such source at once (its ``max_fetches`` counts reads there), claimed
  ``ROOM`` at a time within a window of ``WINDOW`` instances.

Per small instance that is a fraction of a thread hop, of a request and of a scheduling
pass instead of several of each: the batching of many small pieces per request that
makes peer-to-peer transfers of small blocks efficient (as BitTorrent pipelines many
block requests on one connection: Cohen, "Incentives build robustness in BitTorrent",
2003). A batch's copies are checked like any copy (``transfer.verify``): one that does
not hash to the catalog's SHA-256 is damaged and fails over alone.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.python.failure import Failure

from pacsp2p.dicom.part10 import Part10Bytes
from pacsp2p.flow import fetch_gate
from pacsp2p.overlay.fetching import Unbatched
from pacsp2p.transfer.verify import WHOLE, checked, is_sha256, mismatch

MAX_BATCH = 32          # instances in one request to another peer ...
MAX_BYTES = 2 << 20     # ... and their bytes (by the catalog's sizes)
SMALL = 256 << 10       # an instance up to this size is asked in a batch; a larger one
                        # alone, streamed as it arrives (a CT image: its own request
                        # costs little beside its bytes, and it is handed over sooner)
IN_FLIGHT = 64          # instances asked of another peer's archive at once when the
                        # retrieval's are small (batches: each one read job there) ...
ROOM = 32               # ... claimed once the window has room for this many (a request
WINDOW = 128            # costs ~1 ms at each end: 8 to a request cost twice the CPU per
                        # instance of 32), in a window of several such batches


def chunks(refs, locs, max_count: int = MAX_BATCH, max_bytes: int = MAX_BYTES):
    """(refs, locs) in runs of at most *max_count* instances and *max_bytes* bytes."""
    start, size = 0, 0
    for i, ref in enumerate(refs):
        if i > start and (i - start >= max_count or size + ref.size > max_bytes):
            yield refs[start:i], locs[start:i]
            start, size = i, 0
        size += ref.size
    if start < len(refs):
        yield refs[start:], locs[start:]


class BatchReads:
    """Mixin of ``Retrieval``: its claims batched per source (``_batches``), read by
    ``_read_batches`` at the end of each scheduling pass."""

    def _batchable(self, src, loc, ref) -> bool:
        if src.peer == self.peer:
            return "read_many" in self.archives[loc.archive].capabilities
        return self._batches_remote() and 0 < ref.size <= SMALL

    def _batches_remote(self) -> bool:
        return getattr(self.overlay, "fetch_many", None) is not None

    def _tune(self) -> None:
        """Small instances from other peers: claimed ``ROOM`` at a time (the requests
        they go in are the cost per instance) within a ``WINDOW``."""
        if self._batches_remote() and self.plan.avg_size <= SMALL and any(
                s.peer != self.peer for s in self.plan.sources.values()):
            self.room = max(self.room, ROOM)
            self.window = max(self.window, WINDOW)

    def _remote_limit(self, limit: int) -> int:
        """Instances asked of another peer's archive at once (its ``max_fetches``):
        more when they are small, as they go in batches (one read job each there)."""
        if self._batches_remote() and self.plan.avg_size <= SMALL:
            return max(limit, IN_FLIGHT)
        return limit

    def _read_batches(self):
        """Each source's claims of this pass, read in one job or asked in few requests."""
        batches, self._batches = self._batches, {}
        for name, refs in batches.items():
            src = self.plan.sources[name]
            locs = [self.plan.where[r.sop_instance_uid][name] for r in refs]
            if src.peer != self.peer:
                for part, where in chunks(refs, locs):
                    self._run_batch(src, part, where,
                                    defer.maybeDeferred(self.overlay.fetch_many, where))
                continue
            archive = self.archives[src.archive]
            self._run_batch(src, refs, locs, fetch_gate(archive).run(
                archive.read_many, [(loc.sop_instance_uid, loc.sha256) for loc in locs],
                WHOLE))

    def _run_batch(self, src, refs, locs, d):
        timer = self.reactor.callLater(self.stall, self._stalled, src, refs[0], d)
        since = self.reactor.seconds()
        for ref in refs:
            self._timers[(src.name, ref.sop_instance_uid)] = (timer, since)
        d.addCallbacks(self._got_batch, self._lost_batch,
                       callbackArgs=(src, refs, locs, timer),
                       errbackArgs=(src, refs, locs, timer))

    def _got_batch(self, results, src, refs, locs, timer):
        """Serve a batch's copies that hash right; fail the others over. One scheduling
        pass for the batch, not one per instance."""
        if timer.active():
            timer.cancel()
        held, self._scheduling = self._scheduling, True
        try:
            for ref, loc, result in zip(refs, locs, results):
                if isinstance(result, Unbatched):
                    self._fetch_one(src, ref, loc)             # asked to fetch it alone
                elif isinstance(result, BaseException):
                    self._lost(Failure(result), src, ref)
                elif isinstance(result, tuple):                # read here: (bytes, meta)
                    data, meta = result
                    got = meta[3] if meta else ""
                    f = Part10Bytes(data, *meta[:3]) if meta else io.BytesIO(data)
                    if not is_sha256(loc.sha256):              # its UIDs checked
                        self._watch(src, ref, checked(f, loc, self.reactor))
                    elif got != loc.sha256:
                        self._lost(Failure(mismatch(loc, got)), src, ref)
                    else:
                        self._got(f, src, ref)
                elif getattr(result, "sha256", None) is not None and is_sha256(loc.sha256):
                    if result.sha256 != loc.sha256:           # fetched, hashed
                        result.close()
                        self._lost(Failure(mismatch(loc, result.sha256)), src, ref)
                    else:
                        self._got(result, src, ref)
                else:                                # larger, or no hash: checked alone
                    self._watch(src, ref, checked(result, loc, self.reactor))
        finally:
            self._scheduling = held
        self._schedule()

    def _lost_batch(self, failure: Failure, src, refs, locs, timer):
        if timer.active():
            timer.cancel()
        alone = failure.check(Unbatched) is not None       # a peer that serves no batches
        held, self._scheduling = self._scheduling, True
        try:
            for ref, loc in zip(refs, locs):
                if alone and src.alive:
                    self._fetch_one(src, ref, loc)
                else:
                    self._lost(failure, src, ref)
        finally:
            self._scheduling = held
        self._schedule()
