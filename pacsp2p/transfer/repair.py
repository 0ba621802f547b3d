"""Repair: give every instance back its ``replicas`` live copies, and no more.

What counts. A copy is *live* when its peer is alive (the overlay's phi accrual
judgement) and its archive answers (``health.py``: this peer's archives' ``up``, other
peers' ``archives_down``). A copy is *lost* once its peer or archive has not been live
for ``[cluster] repair_after`` seconds (a peer this peer has not heard of since it
started counts from its start). Until then the cluster waits: a reboot or a short
network cut costs no copying.

Who repairs. Every peer walks its own catalog — the progress is the catalog itself, so
a peer that restarts simply walks again — looking for instances with a lost copy and
fewer than ``replicas`` copies not lost (``catalog.copies.work``) — and, once ``replicas``
was raised (the catalog keeps the value copies were last made for: ``floor``), for
instances short with nothing lost, until a count finds none left. For each, every peer
computes the same *repairer*: the first live holder in placement order
(``pacsp2p_place`` over the cluster's archives, with the per-archive counts left out so
that every peer ranks alike). Only the repairer copies it, so two peers never copy the
same instance at once. It copies its own copy (checked against the catalog's SHA-256
on arrival) to the archives placement ranks first among the live ones that do not hold
it — distinct peers first, as for a new instance, so site rules still hold — over the
overlay (``Replicate`` + ``Commit``, as hinted hand-off does; the target fetches the
bytes from our bulk channel), or into another archive of its own. A copy that fails
has the repairer's own copy checked (the scrubber's ``suspect``): one gone or damaged
behind the cluster's back is replaced from a good replica, and the next try copies it;
the archive it failed to is ranked last for ``SHUN`` seconds (a full disk: another
archive with room takes the copy; drains choose the same way).

Throttle. Copies start no faster than ``[cluster] repair_rate`` MB/s allow (a pacing token
bucket: each copy books size/rate seconds; 0: no limit), ``PARALLEL`` at a time per peer.

Surplus. A peer that comes back after its copies were replaced leaves instances with
more than ``replicas`` live copies. Once every holder has been live for ``settle``
seconds (``min(repair_after, 60)``: hinted hand-off, which moves stand-in copies back,
goes first), the first live holder in placement order keeps the first ``replicas`` live
holders in placement order and drops the others (``Drop``: the file, then a tombstone
fact). Only live, settled copies are counted, and only those beyond the first
``replicas`` of the same bytes are dropped: never below ``replicas`` live copies of any.

The count. ``under_replicated`` (instances with fewer than ``replicas`` live copies, and
with none) comes from ``catalog.copies.census``, one pass over the locations' index
(skipped while nothing it counts changed: ``census_cached``), run by this loop when
liveness changes, else every ``max(1 s while copies are to be made / 5 s while some is
short or in surplus / 30 s, 20 x its own duration)``, cached with its time (less the
copies made since; a ``/status`` never scans). Each version is counted and copied apart
(one whose located copies are all lost: from a conflict copy its repairer keeps).

This is the re-replication of replicated stores (Tahoe-LAFS repair, HDFS's
re-replication of under-replicated blocks after a DataNode is declared dead, Cassandra
repair), with placement's rendezvous order deciding both who copies and which copies
stay.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import Logger

from pacsp2p.catalog import copies
from pacsp2p.catalog.copies import SEP, Liveness
from pacsp2p.flow import Throttle
from pacsp2p.overlay.commands import Commit, Drop, Replicate
from pacsp2p.strategies import StrategyError
from pacsp2p.transfer.backoff import Backoff
from pacsp2p.transfer.delete import pushed_before
from pacsp2p.transfer.durable import copy_in
from pacsp2p.types import Location

log = Logger()

PARALLEL = 8            # copies in flight per repairing peer
CHUNK = 500             # instances read from the catalog per step of a walk
TICK = 1.0              # seconds between two looks at liveness
GRACE = 3.0             # seconds after start before the first count (members learned)
RECENT_TTL = 300.0      # seconds a copy made/dropped is remembered until the catalog has it
SHUN = 300.0            # seconds an archive a copy failed to is chosen last (a full disk)
SETTLE_MAX = 60.0
WINDOW = 10.0           # seconds of the rate shown in status


@dataclasses.dataclass
class _Job:
    kind: str                   # "copy" or "drop"
    info: object                # InstanceInfo
    source: Location | None     # copy: our copy to read
    targets: list               # copy: ArchiveInfo; drop: Location
    live: int                   # live copies before
    keep: list = dataclasses.field(default_factory=list)   # drop: the copies that stay
    planned: float = 0.0        # time.monotonic() when the catalog was read for it


class Repair:
    def __init__(self, settings, catalog, archives: dict, strategies, ingest, overlay,
                 reactor, scrubber=None):
        c = settings.cluster
        self.peer = settings.peer.name
        self.replicas = c.replicas
        self.floor = c.replicas     # what copies were made for: less after replicas rose
        self.after = c.repair_after
        self.rate_limit = c.repair_rate                       # MB/s, 0: none
        self.settle = min(self.after, SETTLE_MAX)
        self.catalog, self.archives, self.strategies = catalog, archives, strategies
        self.ingest, self.overlay, self.reactor = ingest, overlay, reactor
        self.scrubber = scrubber        # checks (and replaces) our copy when a copy failed
        self.tmpdir = Path(settings.data_dir) / "incoming"
        self.throttle = Throttle(reactor, c.repair_rate * 1e6)
        self.running, self._loop = False, None
        # durations by the reactor's monotonic clock (pacsp2p.clock), not the wall clock
        self._clock = reactor.seconds if reactor is not None else time.monotonic
        self.started_at = 0.0           # self._clock() of start()
        self.gone: set[str] = set()     # our archives in the catalog, not the config (health)
        self._down_since: dict[str, float] = {}      # "peer\tarchive" -> first seen down
        self._up_since: dict[str, float] = {}        # "peer\tarchive" -> seen back
        self._signature = None
        self._next_census = 0.0
        self._census_running = False
        self._walking = False
        self.counted: dict | None = None             # the last census, with its time
        self._fixed = 0          # instances our copies brought to R since that census
        self._repaired = 0       # instances we gave their missing copies since then
        self._recent: dict[str, tuple[set, set, float]] = {}
        self._failed = Backoff()             # instances whose copy failed: when again
        self._failed_to: dict[tuple, float] = {}     # (peer, archive) -> a copy failed
        self._window: collections.deque = collections.deque()   # (time, bytes)
        self._active = {"copy": 0, "drop": 0}
        self._blocked = 0        # instances of the last walk with no archive to copy to
        self._saved_at = 0.0
        self.stats = {"done": 0, "bytes": 0, "dropped": 0, "failed": 0, "started": None,
                      "last": None, "finished": None}

    # -- life cycle ------------------------------------------------------------------
    def start(self):
        self.running = True
        self.started_at = self._clock()
        self._next_census = self.started_at + GRACE
        d = self.catalog.read(lambda conn: copies.load_state(conn, "repair"))
        d.addCallback(self._loaded)
        d.addErrback(lambda f: log.warn("repair: cannot read its saved progress: {err}",
                                        err=f.getErrorMessage()))
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(TICK, now=False).addErrback(
            lambda f: log.failure("repair loop failed", f))

    def _loaded(self, state: dict) -> None:
        state = state or {}
        self.stats.update({k: v for k, v in state.items() if k in self.stats})
        # replicas raised since copies were last made: short ones get copies too
        saved = state.get("replicas")
        self.floor = min(int(saved), self.replicas) if saved else self.replicas
        if not saved:                   # from now on the catalog knows what copies are for
            self._save(force=True)

    def stop(self):
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._save(force=True)

    # -- who is live -----------------------------------------------------------------
    def liveness(self) -> Liveness:
        now = self._clock()
        dead, lost, unsettled = set(), set(), set()
        members = self.overlay.membership.members if self.overlay is not None else {}
        known = (set(self.catalog.vector) | set(members)) - {self.peer}
        for name in known:
            m = members.get(name)
            if m is not None and m.state == "alive":
                if now - m.since < self.settle:
                    unsettled.add(name)
                continue
            dead.add(name)
            since = max(m.since if m is not None else 0.0, self.started_at)
            if now - since >= self.after:
                lost.add(name)
        down = {f"{self.peer}{SEP}{name}" for name, a in self.archives.items()
                if not getattr(a, "up", True)} | {f"{self.peer}{SEP}{n}" for n in self.gone}
        for m in members.values():
            if m.state == "alive":
                down |= {f"{m.name}{SEP}{a}" for a in (m.info.archives_down or ())}
        for key in down:
            self._down_since.setdefault(key, now)
        for key in list(self._down_since):
            if key not in down:
                del self._down_since[key]
                self._up_since[key] = now
        for key, t in list(self._up_since.items()):
            if now - t >= self.settle:
                del self._up_since[key]
            else:
                unsettled.add(key)
        lost_archives = {k for k in down if now - self._down_since[k] >= self.after}
        return Liveness(frozenset(dead), frozenset(down), frozenset(lost),
                        frozenset(lost_archives), frozenset(unsettled), frozenset(n for n, a in
                        self.archives.items() if getattr(a, "keeps_versions", 0)))

    # -- the loop --------------------------------------------------------------------
    def tick(self):
        if not self.running:
            return
        lv = self.liveness()
        now = self._clock()
        if now < self.started_at + GRACE:
            return
        if (lv != self._signature or now >= self._next_census) and not self._census_running:
            self._signature = lv
            self.census(lv).addErrback(lambda f: log.failure("repair: count failed", f))

    @defer.inlineCallbacks
    def census(self, lv: Liveness | None = None):
        """Count the under-replicated instances; start a walk if there is work."""
        lv = lv or self.liveness()
        self._census_running = True
        t0 = time.monotonic()
        try:
            counts, key = yield self.catalog.read(
                lambda conn: copies.census_cached(conn, self.replicas, lv,
                                                  self.floor < self.replicas))
        finally:
            self._census_running = False
        if key is not None:                 # a new count: the next start may reuse it
            self.catalog.write(lambda conn: copies.save_census(conn, counts, key)).addErrback(
                lambda f: log.warn("repair: cannot save its count: {err}",
                                   err=f.getErrorMessage()))
        took = time.monotonic() - t0
        if not counts["repairable"] and self.floor < self.replicas:
            self.floor = self.replicas      # every instance has its copies, or waits
            self._save(force=True)
        self.counted = {**counts, "at": time.time(), "took_s": round(took, 3)}
        self._prune()
        self._fixed = self._repaired = 0
        # again soon while copies are being made (here or by others), rarely when all is
        # well; never more than 5 % of the time of a reader thread
        base = 1.0 if counts["repairable"] else \
            5.0 if counts["instances"] or counts["surplus"] else 30.0
        self._next_census = self._clock() + max(base, 20 * took)
        if (counts["repairable"] or counts["surplus"]) and not self._walking and self.running:
            self.walk().addErrback(lambda f: log.failure("repair: walk failed", f))
        elif not counts["repairable"] and not (counts["instances"] and _waiting(lv)) and \
                self.stats["started"] and not self.stats["finished"] and not self._walking:
            self._finish_episode()          # (not while copies may yet be lost)
        return self.counted

    def _prune(self):
        """Forget what the catalog must know by now, and failures old enough to retry."""
        now = self._clock()
        for uid in [u for u, (_, _, at) in self._recent.items() if now - at > RECENT_TTL]:
            del self._recent[uid]
        self._failed.prune()
        for key in [k for k, at in self._failed_to.items() if now - at > SHUN]:
            del self._failed_to[key]

    @defer.inlineCallbacks
    def walk(self):
        """One walk over the instances that need copies or hold too many."""
        self._walking = True
        after, progress, blocked, dropped = "", 0, 0, 0
        try:
            while self.running:
                lv = self.liveness()
                read_at = time.monotonic()
                batch = yield self.catalog.read(
                    lambda conn, a=after: copies.work(conn, self.replicas, lv, a, CHUNK,
                                                      self.floor < self.replicas))
                if not batch:
                    break
                after = batch[-1][0].sop_instance_uid
                jobs = self._plan(batch, lv)
                for job in jobs:
                    job.planned = read_at
                blocked += sum(1 for j in jobs if j.kind == "copy" and not j.targets)
                jobs = [j for j in jobs if j.kind == "drop" or j.targets]
                if jobs:
                    results = yield self._run(jobs)
                    progress += sum(results)
                    dropped += sum(len(j.targets) for j, ok in zip(jobs, results)
                                   if ok and j.kind == "drop")
        finally:
            self._walking = False
        if blocked != self._blocked and blocked:
            log.warn("repair: {n} instance(s) need a copy but no live archive can take "
                     "one", n=blocked)
        self._blocked = blocked
        if dropped:
            log.info("repair: {n} surplus copies dropped (placement keeps {r} per instance)",
                     n=dropped, r=self.replicas)
        if progress:
            self._next_census = 0.0          # count again now, and walk again if needed
        yield self._save()
        return progress

    # -- deciding --------------------------------------------------------------------
    def _plan(self, batch, lv: Liveness) -> list[_Job]:
        candidates = self.ingest.candidates()
        neutral = [dataclasses.replace(a, instances=0, free_bytes=None) for a in candidates]
        jobs = []
        for info, locs, current in batch:
            uid = info.sop_instance_uid
            if self._failed.waiting(uid):
                continue
            locs = self._with_recent(uid, locs)
            try:
                order = self.strategies.place(info, neutral, self.replicas)
                for i, ours in enumerate((current, *getattr(current, "others", ()))):
                    job = self._decide(info, locs, lv, order, candidates, ours,  # each
                                       getattr(current, "kept", ()))              # version
                    jobs += [job] if job and (not i or job.kind == "copy") else []
            except StrategyError as e:
                log.error("repair of {uid}: {err}", uid=uid, err=e)
                continue
        return jobs

    def _decide(self, info, locs, lv: Liveness, order, candidates, current=None, here=()):
        """*current*: the hashes of the copies of a version, if the UID has several: only
        they count (and are copied); every copy is held, for targets. *here*: (archive,
        sha256) of conflicts kept here (``Liveness.keeping``): a source if none is live."""
        rank = {(a.peer, a.name): i for i, a in enumerate(order)}

        def in_order(loc):
            return (rank.get((loc.peer, loc.archive), len(rank)), loc.peer, loc.archive)
        live = sorted((loc for loc in locs if lv.live(loc.peer, loc.archive)), key=in_order)
        ours = [loc for loc in locs if current is None or loc.sha256 in current]
        if not live:
            return None
        kept = [loc for loc in ours if not lv.lost(loc.peer, loc.archive)]
        raised = self.floor < self.replicas          # short with nothing lost too
        if len(kept) < self.replicas and (len(kept) < len(ours) or raised):
            source = next((loc for loc in live if loc in ours), None) or next((Location(
                info.sop_instance_uid, a, self.peer, sha, max(x.size for x in locs)) for a, sha
                in here if current and sha in current and not kept), None)
            if source is None or source.peer != self.peer or "open" not in getattr(
                    self.archives.get(source.archive), "capabilities", ()):
                return None                 # another peer's to repair, or unreadable
            targets = self._targets(info, locs, kept, lv, candidates, self.replicas - len(kept))
            return _Job("copy", info, source, targets, sum(loc in ours for loc in live))
        settled = [loc for loc in live if lv.settled(loc.peer, loc.archive)]
        if len(settled) > self.replicas and settled[0].peer == self.peer:
            versions = {loc.sha256 for loc in settled if loc.sha256}   # ("": crawled)
            same, keep, drop = collections.Counter(), [], []
            for loc in settled:          # other bytes are no spare of these: each kept R
                key = loc.sha256 if len(versions) > 1 else ""
                same[key] += 1
                (keep if same[key] <= self.replicas else drop).append(loc)
            return _Job("drop", info, None, drop, len(live), keep) if drop else None
        return None

    def _targets(self, info, locs, kept, lv, candidates, need: int) -> list:
        ranked = self.strategies.place(info, candidates, self.replicas)
        now = self._clock()   # an archive a copy just failed to (full?) comes last
        ranked.sort(key=lambda a: now - self._failed_to.get((a.peer, a.name), -SHUN) < SHUN)
        held = {(loc.peer, loc.archive) for loc in locs}
        peers = {loc.peer for loc in kept}
        free = [a for a in ranked if a.alive and (a.peer, a.name) not in held
                and lv.live(a.peer, a.name)]
        first = [a for a in free if a.peer not in peers]
        chosen: list = []
        for a in first:                       # one per peer that holds none, in rank order
            if len(chosen) < need and all(c.peer != a.peer for c in chosen):
                chosen.append(a)
        for a in first + [a for a in free if a.peer in peers]:     # then any archive
            if len(chosen) < need and a not in chosen:
                chosen.append(a)
        return chosen[:need]

    def _with_recent(self, uid, locs):
        entry = self._recent.get(uid)
        if entry is None:
            return locs
        added, dropped, at = entry
        if self._clock() - at > RECENT_TTL:
            del self._recent[uid]
            return locs
        have = {(loc.peer, loc.archive) for loc in locs}
        if {a[:2] for a in added} <= have and not dropped & have:
            del self._recent[uid]              # the catalog knows it all now
            return locs
        size = max((loc.size for loc in locs), default=0)
        out = [loc for loc in locs if (loc.peer, loc.archive) not in dropped]
        out += [Location(uid, archive, peer, sha, size) for peer, archive, sha in added
                if (peer, archive) not in have]     # (the bytes copied: of their version)
        return out

    def _remember(self, uid, added=(), dropped=()):
        a, d, _ = self._recent.get(uid, (set(), set(), 0.0))
        self._recent[uid] = (a | set(added), d | set(dropped), self._clock())

    # -- doing -----------------------------------------------------------------------
    def _run(self, jobs) -> defer.Deferred:
        """Run *jobs* at most PARALLEL at a time; Deferred[list of 1 (done) / 0]."""
        sem = defer.DeferredSemaphore(PARALLEL)
        ds = [sem.run(self._do, job) for job in jobs]
        return defer.gatherResults(ds)

    @defer.inlineCallbacks
    def _do(self, job: _Job):
        if not self.running:
            return 0
        uid = job.info.sop_instance_uid
        self._active[job.kind] += 1
        try:
            if job.kind == "copy":
                yield self._copy_all(job)
            else:
                yield self._drop_all(job)
            self._failed.succeeded(uid)
            return 1
        except Exception as e:
            wait = self._failed.failed(uid)
            self.stats["failed"] += 1
            log.warn("repair of {uid} failed: {err} (tried again in {s:.0f} s)", uid=uid,
                     err=e, s=wait)
            if job.kind == "copy" and job.live and self.scrubber is not None:
                self.scrubber.suspect(job.source)     # our copy may be gone or damaged
            return 0
        finally:
            self._active[job.kind] -= 1

    def _new_episode(self):
        if self.stats["started"] is None or self.stats["finished"] is not None:
            self.stats.update(done=0, bytes=0, dropped=0, failed=0, started=time.time(),
                              last=None, finished=None)
            self._window.clear()
            log.info("repair: started (copies lost for {after:.0f} s or more)",
                     after=self.after)

    def _finish_episode(self):
        self.stats["finished"] = time.time()
        s = self.stats
        log.info("repair: done: {n} copies made ({mb:.1f} MB), {d} surplus copies dropped, "
                 "{f} failures", n=s["done"], mb=s["bytes"] / 1e6, d=s["dropped"],
                 f=s["failed"])
        self._save(force=True)

    @defer.inlineCallbacks
    def _copy_all(self, job: _Job):
        uid = job.info.sop_instance_uid
        size = job.source.size
        self._new_episode()
        for target in job.targets:
            yield self.throttle.wait(size)
            if not self.running:
                return
            if (yield pushed_before(self.catalog, uid, job.planned)):
                log.info("repair: {uid} was deleted since its repair was planned: not "
                         "copied", uid=uid)
                return
            yield self.copy_to(job.source, target)
            self._remember(uid, added=[(target.peer, target.name, job.source.sha256)])
            now = time.time()
            self.stats["done"] += 1
            self.stats["bytes"] += size
            self.stats["last"] = now
            self._window.append((now, size))
            log.debug("repair: {uid} copied to {archive}@{peer}", uid=uid,
                      archive=target.name, peer=target.peer)
        self._repaired += 1
        if job.live < self.replicas <= job.live + len(job.targets):
            self._fixed += 1
        self._save()

    @defer.inlineCallbacks
    def copy_to(self, source: Location, target, opener=None):
        """Copy *source* (ours; or what *opener*() gives) to the archive *target*; if it
        fails, the archive is chosen last for SHUN seconds (``_targets``): a full one is
        not retried for ever while another has room."""
        opener = opener or (lambda: self.archives[source.archive].open(
            source.sop_instance_uid, source.sha256))
        try:
            if target.peer == self.peer:
                yield self._copy_local(source, target.name, opener)
            else:
                yield self._copy_remote(source, target, opener)
        except Exception:
            self._failed_to[(target.peer, target.name)] = self._clock()
            raise

    @defer.inlineCallbacks
    def _copy_remote(self, source: Location, target, opener):
        uid = source.sop_instance_uid
        token = secrets.token_urlsafe(16)
        offers = self.overlay.offers
        offers[token] = opener
        m = self.overlay.membership
        try:
            answer = yield m.call(target.peer, Replicate, archive=target.name, uid=uid,
                                  sha256=source.sha256, token=token)
            yield m.call(target.peer, Commit, archive=target.name, uid=uid,
                         sha256=answer["sha256"])
        finally:
            offers.pop(token, None)
        self.overlay.sync_from(target.peer)

    @defer.inlineCallbacks
    def _copy_local(self, source: Location, name: str, opener):
        """A copy into another archive of this peer (bytes checked against *source*)."""
        uid = source.sop_instance_uid
        f = yield opener()
        yield copy_in(f, self.archives[name], uid, source.sha256, self.tmpdir, self.catalog,
                      self.peer)

    @defer.inlineCallbacks
    def _drop_all(self, job: _Job):
        uid = job.info.sop_instance_uid
        for loc in job.targets:
            lv = self.liveness()               # the copies that stay: still live?
            if not all(lv.settled(k.peer, k.archive) for k in job.keep):
                return
            if loc.peer == self.peer:
                yield self.archives[loc.archive].discard(uid, loc.sha256)
                yield self.catalog.forget(uid, loc.archive, loc.sha256)
            else:
                yield self.overlay.membership.call(loc.peer, Drop, archive=loc.archive,
                                                   uid=uid, sha256=loc.sha256)
                self.overlay.sync_from(loc.peer)
            self._remember(uid, dropped=[(loc.peer, loc.archive)])
            self.stats["dropped"] += 1
            log.debug("repair: surplus copy of {uid} on {archive}@{peer} dropped "
                      "({n} live copies left)", uid=uid, archive=loc.archive, peer=loc.peer,
                      n=job.live - 1)
            job.live -= 1
        self._save()

    def _save(self, force: bool = False) -> defer.Deferred:
        now = time.time()
        if not force and now - self._saved_at < 1.0:
            return defer.succeed(None)
        self._saved_at = now
        state = dict(self.stats, replicas=self.floor)
        d = self.catalog.write(lambda conn: copies.save_state(conn, "repair", state))
        d.addErrback(lambda f: log.warn("repair: cannot save its progress: {err}",
                                        err=f.getErrorMessage()))
        return d

    # -- what status shows -----------------------------------------------------------
    def _rate(self) -> float:
        now = time.time()
        while self._window and now - self._window[0][0] > WINDOW:
            self._window.popleft()
        if not self._window:
            return 0.0
        span = min(WINDOW, max(1.0, now - (self.stats["started"] or now)))
        return sum(n for _, n in self._window) / span / 1e6

    def under_replicated(self) -> dict:
        c = self.counted
        if c is None:
            return {"instances": None, "unavailable": None, "replicas": self.replicas,
                    "at": None}
        return {"instances": max(0, c["instances"] - self._fixed),
                "unavailable": c["unavailable"], "surplus": c["surplus"],
                "replicas": self.replicas, "at": c["at"], "took_s": c["took_s"]}

    def status(self) -> dict:
        now = self._clock()
        lv = self._signature or Liveness()
        waiting = []
        for what, since in [(p, self._member_since(p)) for p in lv.dead_peers - lv.lost_peers] + \
                [(k, self._down_since.get(k, now)) for k in lv.dead_archives - lv.lost_archives]:
            waiting.append({"what": what.replace(SEP, "@"),
                            "repair_in_s": round(max(0.0, self.after - (now - since)), 1)})
        c = self.counted or {}
        if self._active["copy"]:
            state = "repairing"
        elif self._active["drop"]:
            state = "trimming"
        elif not self.running:
            state = "off"
        elif waiting and c.get("instances"):
            state = "waiting"
        elif self._blocked and c.get("repairable"):
            state = "blocked"
        else:
            state = "idle"
        s = self.stats
        active = (s["last"] or time.time()) - s["started"] if s["started"] else 0.0
        return {"state": state, "after_s": self.after,
                "limit_MB_s": self.rate_limit or None,
                "done": s["done"], "bytes": s["bytes"], "dropped": s["dropped"],
                "failed": s["failed"],
                "remaining": max(0, c.get("repairable", 0) - self._repaired),
                "rate": round(self._rate(), 2),
                "avg_rate": round(s["bytes"] / active / 1e6, 2) if active > 0 else 0.0,
                "started": s["started"], "last": s["last"], "finished": s["finished"],
                "blocked": self._blocked, "waiting": waiting}

    def _member_since(self, name) -> float:
        members = self.overlay.membership.members if self.overlay is not None else {}
        m = members.get(name)
        return max(m.since if m is not None else 0.0, self.started_at)


def _waiting(lv: Liveness) -> bool:
    """Are some copies not live, but not yet lost (repair_after not reached)?"""
    return bool(lv.dead_peers - lv.lost_peers or lv.dead_archives - lv.lost_archives)

