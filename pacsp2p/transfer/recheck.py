"""Recheck: an archive of this peer that may have lost what it held has a sample of its
copies checked at once, and a scrub pass when one is missing or damaged.

An archive restarted empty (a disk replaced, a VM restored from an image, another server
put at its address) answers as before: health sees it up, and the catalog goes on
counting its copies as live until the next background scrub (``scrub_interval``, a
week by default) — every instance on it one copy short meanwhile. So when
``health.ArchiveHealth`` sees an archive answer again after it did not, or report
fewer instances than before or than the catalog places there (Orthanc's
``CountInstances``), ``check``
reads ``SAMPLE`` of this peer's copies there from a random point of the catalog's
sequence (a keyset read, never a scan) and checks them as the scrub does (the archive's
``verify``, else a read hashed against the catalog). One missing or damaged starts a
scrub pass on demand (``Scrub.run``), which replaces every such copy from a good
replica. At most one sample per archive every ``EVERY`` seconds, and a pass only for a
bad copy no pass was started for yet (``_seen``): a copy the scrub cannot replace (no
good replica anywhere) stays in the catalog, the archive goes on reporting fewer
instances than the catalog places there, and each sample that found it started a full
pass again (every minute, stopping the background pass each time).

A copy the scrub finds damaged or missing on an archive that cannot ``restore`` it
(plain DIMSE) is made again elsewhere (``unrestorable``): a good replica, read through
this peer (``transfer.retrieve``, its hash checked), is copied to the archives placement
ranks first that do not hold the instance (``Repair.copy_to``, as repair does), then the
bad copy is forgotten (its tombstone fact; the file stays in the archive, as a drain
leaves it). Without this the bad copy went on counting as live: R copies on paper, R-1
good ones, and repair never ran (nothing was *lost*).

This is the spot check that precedes a full audit (Tahoe-LAFS's check before its
verifier; a sample of a scrub, as Ceph's light scrub is to its deep scrub).
"""

from __future__ import annotations

import dataclasses
import random
import time

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.catalog import copies
from pacsp2p.catalog import scrub as sql
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.transfer.verify import is_sha256
from pacsp2p.types import InstanceInfo, Location, Query

log = Logger()

SAMPLE = 20             # copies checked per archive that may have lost what it held
EVERY = 60.0            # seconds between two samples of one archive at most
SEEN = 100_000          # bad copies remembered as handed to a pass (then forgotten all)


class Recheck:
    def __init__(self, peer: str, catalog, archives: dict, scrubber, repair=None,
                 overlay=None, strategies=None, reactor=None):
        self.peer, self.catalog, self.archives = peer, catalog, archives
        self.scrubber, self.repair, self.overlay = scrubber, repair, overlay
        self.strategies, self.reactor = strategies, reactor
        self._at: dict[str, float] = {}          # archive -> when it was last sampled
        self._seen: set = set()     # (uid, archive, sha256) found bad, a pass started for
        self.stats = {"samples": 0, "passes": 0}

    def check(self, name: str) -> defer.Deferred:
        """Sample archive *name* (see above); Deferred[bool]: a pass was started."""
        now = time.monotonic()
        if name not in self.archives or now - self._at.get(name, -EVERY) < EVERY:
            return defer.succeed(False)
        self._at[name] = now
        d = self._check(name)

        def failed(f):
            log.warn("recheck of archive {archive} failed: {err}", archive=name,
                     err=f.getErrorMessage())
            return False
        return d.addErrback(failed)

    @defer.inlineCallbacks
    def _check(self, name: str):
        archive = self.archives[name]
        caps = getattr(archive, "capabilities", ())
        top = yield self.catalog.read(lambda conn: conn.execute(
            "SELECT coalesce(max(seq), 0) FROM locations WHERE peer = ?",
            (self.peer,)).fetchone()[0])
        start = random.randrange(top) if top else 0
        rows = yield self.catalog.read(
            lambda conn: sql.own_copies(conn, self.peer, start, SAMPLE, [name]))
        if len(rows) < SAMPLE and start:                 # wrap around to the start
            more = yield self.catalog.read(lambda conn: sql.own_copies(
                conn, self.peer, 0, SAMPLE - len(rows), [name]))
            rows += [c for c in more if c.seq <= start]
        rows = [c for c in rows if is_sha256(c.sha256)]
        if not rows:
            return False
        self.stats["samples"] += 1
        if "verify" in caps and not getattr(archive, "scrub_by_sample", False):
            results = yield archive.verify([(c.uid, c.sha256) for c in rows])
            states = [state for _, state, _ in results]
        elif "open" in caps:
            states = []
            for c in rows:
                state, _ = yield self.scrubber._read_and_hash(archive, c, c.sha256)
                states.append(state)
        else:
            return False
        found = {(c.uid, c.archive, c.sha256) for c, s in zip(rows, states)
                 if s in ("missing", "damaged")}
        bad, new = len(found), found - self._seen
        if not new:                 # none, or only copies a pass was started for already
            return False
        if len(self._seen) + len(new) > SEEN:
            self._seen.clear()
        self._seen |= new
        log.warn("archive {archive}: {bad} of {n} copies sampled are missing or damaged "
                 "(restarted empty? replaced?): a scrub pass checks and replaces them all",
                 archive=name, bad=bad, n=len(rows))
        self.stats["passes"] += 1
        yield self.scrubber.run()
        return True


    @defer.inlineCallbacks
    def unrestorable(self, c, sha: str):
        """Deferred[bool]: this peer's copy *c* (``catalog.scrub.Copy``), damaged or
        missing on an archive that cannot restore it, made again elsewhere from a good
        replica hashing to *sha*, then forgotten (see above)."""
        repair = self.repair
        refs = yield self.catalog.resolve(Query("IMAGE", {"SOPInstanceUID": c.uid}))
        good = tuple(loc for r in refs[:1] for loc in r.locations if is_sha256(sha) and
                     loc.sha256 == sha and (loc.peer, loc.archive) != (self.peer, c.archive))
        if not good or repair is None:
            return False
        ref = dataclasses.replace(refs[0], locations=good)
        lv = repair.liveness()
        kept = [loc for loc in good if lv.live(loc.peer, loc.archive)]
        infos = yield self.catalog.read(lambda conn: copies.instance_infos(conn, [c.uid]))
        info = infos.get(c.uid) or InstanceInfo(c.uid, "", "", "", "", c.size)
        need = max(0, repair.replicas - len(kept))
        targets = repair._targets(info, list(refs[0].locations), kept, lv,
                                  repair.ingest.candidates(), need)
        if len(targets) < need:
            return False

        def opener():                 # each target reads a good replica through us
            return Retrieval([ref], self.archives, self.peer, self.overlay, self.strategies,
                             self.reactor).open(ref)
        for target in targets:
            yield repair.copy_to(Location(c.uid, c.archive, self.peer, sha, c.size), target,
                                 opener)
        yield self.catalog.forget(c.uid, c.archive, c.sha256)
        log.warn("archive {archive}: its bad copy of {uid} cannot be replaced there: made "
                 "again on {targets} from a good replica, and forgotten here", uid=c.uid,
                 archive=c.archive, targets=", ".join(f"{t.name}@{t.peer}" for t in targets))
        return True
