"""Retrieval: fetch a set of instances from all their replicas at once.

As in BitTorrent, every live archive holding some of the instances is a *source* — a
peer and one of its archives, so a peer that manages several archives holding replicas
reads from all of them, exactly as it reads from several peers. Replica selection
(``pacsp2p_rank_replicas``) ranks the reachable replicas of each instance once, when the
retrieval starts; sources then work in parallel, each pulling small batches chosen by the
load-balancing strategy (``pacsp2p_next_batch``; built-in: work stealing weighted by
measured throughput with the ranking as each source's preference, rarest first, with an
endgame in which the last instances may be requested from a second source, the first
copy winning). A source runs at most its archive's ``max_fetches`` fetches at once. A
source that fails (peer dead, archive down, connection lost, stalled) is dropped and its
instances go to the next source of their ranking; an instance with no live holder left
is a failed sub-operation, reported by SOP Instance UID. A copy is served only if its
data set hashes to the catalog's SHA-256 (``transfer.verify``: checked before it is
handed to a consumer); a damaged copy fails over to the next replica, like a missing
one, and is reported to ``on_damaged`` (the scrub replaces it).

Consumers (the C-MOVE delivery, C-GET) call ``open(ref)`` in their own order; fetching
runs ahead of them within a bounded window (instances fetched but not yet opened, or
under way: at most ``window`` of them, and ``window_bytes`` of those held in memory; all
retrievals together at most ``held.SHARED_BYTES``), and the instance a consumer waits
for is rescued on a second source if its only one stalls.
"""

from __future__ import annotations

import itertools
import time

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from pacsp2p.adapters.associations import DimseError
from pacsp2p.adapters.http import Unreachable
from pacsp2p.flow import DEFAULT_MAX_FETCHES, open_gated
from pacsp2p.overlay.node import PeerUnknown
from pacsp2p.strategies import Strategies, StrategyError
from pacsp2p.transfer import held as pool
from pacsp2p.transfer.batches import BatchReads
from pacsp2p.transfer.plan import PlanView, Source, readable, source_name
from pacsp2p.transfer.verify import WHOLE, Damaged, checked
from pacsp2p.types import InstanceRef, PeerInfo

__all__ = ["PlanView", "Retrieval", "Source", "Unavailable", "readable", "source_name"]

log = Logger()

STALL_SECONDS = 20.0
BATCH = 8               # instances: the least room a nearly full window waits for
WINDOW_BYTES = 16 << 20     # bytes of a window's instances held in memory (each up to
                            # verify.WHOLE; larger ones are files): a stopped consumer's
_ids = itertools.count(1)


# failures that mean the source (a peer, or an archive) cannot be reached, not that one
# instance is bad
_LINK_ERRORS = (error.ConnectError, error.ConnectionLost, error.ConnectionDone,
                ResponseFailed, ResponseNeverReceived, defer.CancelledError, PeerUnknown,
                ConnectionError, Unreachable, DimseError)

_default_strategies = None


def default_strategies() -> Strategies:
    """The built-ins alone (nearest, work stealing), for a retrieval given none."""
    global _default_strategies
    if _default_strategies is None:
        _default_strategies = Strategies()
    return _default_strategies


def _dropped(_):
    return None


class Unavailable(Exception):
    """No replica of an instance could be read."""


class Retrieval(BatchReads):
    stall = STALL_SECONDS               # seconds without an answer: the source is dropped

    def __init__(self, refs: list[InstanceRef], archives: dict, peer: str, overlay=None,
                 strategies=None, reactor=None, window: int = 64, per_source: int = 8,
                 site: str | None = None):
        """*archives*: this peer's archives by name; *per_source*: fetches at once from
        another peer's archive that does not advertise its ``max_fetches``; *site*: the
        reader's site (default: the first site label of its archives)."""
        self.id = next(_ids)
        self.refs = refs
        self.archives = archives
        self.peer = peer
        self.overlay = overlay
        self.strategies = strategies if strategies is not None else default_strategies()
        self.reactor = reactor
        self.window = window
        self.window_bytes = WINDOW_BYTES
        self._held = {r.sop_instance_uid: n if 0 < (n := r.size or 0) <= WHOLE else 0
                      for r in refs}             # bytes each takes in memory when fetched
        held = [n for n in self._held.values() if n]
        self._avg_held = sum(held) / len(held) if held else 0
        self._max_held = max(held, default=0)
        self._buffered_bytes = self._flying_bytes = 0    # of the fetched (not yet opened),
        self.pool = pool.POOL                            # the fetching; shared budget
        self.pool.members.add(self)
        self.room = BATCH                # the least room a nearly full window waits for
        self.per_source = per_source
        self.site = site if site is not None else next(
            (a.site for a in archives.values() if getattr(a, "site", None)), None)
        self.plan = PlanView(refs)
        self._results: dict[str, defer.Deferred] = {}
        self._unavailable: dict[str, Failure] = {}    # uid -> why (open() errbacks with it)
        self._opened: set[str] = set()
        self._wanted: dict[str, InstanceRef] = {}     # opened, still pending
        self._batches: dict[str, list] = {}           # source -> claims to read in one job
        self._kick = None
        self._buffered = 0               # fetched, not yet opened
        self._timers: dict = {}
        self._observed = False
        self._scheduling = self._again = False
        self._turns = 0
        self._head = 0                   # refs before it: opened, done or answered
        self.started = False
        self.cancelled = False
        self.started_at = self.finished_at = None     # wall-clock times, for status
        self.on_damaged = None           # callable(Location): a copy that failed its hash
        self.rescued = 0                 # instances a consumer waited for, asked of a 2nd source
        self.duplicates = 0              # second copies fetched and closed (endgame)
        self.waited = 0                  # instances opened before they were fetched

    # -- where each instance can come from --------------------------------------------
    def _member(self, peer: str):
        if self.overlay is None:
            return None
        return getattr(self.overlay.membership, "members", {}).get(peer)

    def _reachable(self, loc) -> bool:
        return readable(loc, self.peer, self.archives, self.overlay)

    def reachable(self, ref: InstanceRef) -> list:
        """Replicas of *ref* this peer can read now, one per archive, in catalog order."""
        out, seen = [], set()
        for loc in ref.locations:
            key = (loc.peer, loc.archive)
            if key not in seen and self._reachable(loc):
                seen.add(key)
                out.append(loc)
        return out

    @property
    def reader(self) -> PeerInfo:
        return PeerInfo(self.peer, self.site)

    def sources(self, ref: InstanceRef):
        """Replicas of *ref* this peer can read now, best first (replica selection)."""
        return self.strategies.rank(ref, self.reachable(ref), self.reader)

    def _limit(self, peer: str, archive: str) -> int:
        if peer == self.peer:
            limit = getattr(self.archives.get(archive), "max_fetches", None)
        else:
            member = self._member(peer)
            entry = next((a for a in (getattr(member.info, "archives", None) or ())
                          if a and a[0] == archive), None) if member is not None else None
            limit = entry[2] if entry is not None and len(entry) > 2 else None
            limit = self._remote_limit(int(limit or self.per_source))
        return max(1, int(limit or DEFAULT_MAX_FETCHES))

    def _learn_sites(self) -> None:
        """What ``nearest`` knows of sites: this peer's archives, and the ones other
        peers advertise."""
        sites = self.strategies.sites
        for name, archive in self.archives.items():
            sites[(self.peer, name)] = getattr(archive, "site", None)
        if self.overlay is not None:
            for member in getattr(self.overlay.membership, "members", {}).values():
                for entry in getattr(member.info, "archives", None) or ():
                    if len(entry) >= 2:
                        sites[(member.info.name, entry[0])] = entry[1]

    # -- running -------------------------------------------------------------------------
    def start(self):
        if self.started:
            return
        self.started = True
        self.started_at = time.time()
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        plan = self.plan
        self._learn_sites()
        complained = False
        for ref in self.refs:
            uid = ref.sop_instance_uid
            self._results[uid] = defer.Deferred()
            try:
                ranked = self.sources(ref)
            except StrategyError as e:
                if not complained:
                    log.error("retrieval {id}: {err}; reading in catalog order",
                              id=self.id, err=e)
                    complained = True
                ranked = self.reachable(ref)
            where, names = {}, []
            for loc in ranked:
                name = source_name(loc.peer, loc.archive)
                if name not in where:
                    where[name] = loc
                    names.append(name)
            plan.where[uid], plan.ranking[uid], plan.holders[uid] = where, names, set(names)
            for name in names:
                src = plan.sources.get(name)
                if src is None:
                    loc = where[name]
                    src = plan.sources[name] = Source(
                        name, loc.peer, loc.archive, self._limit(loc.peer, loc.archive),
                        started=self.reactor.seconds())
                src.holds.add(uid)
        for ref in list(plan.pending):
            if not plan.holders[ref.sop_instance_uid]:
                plan.take(ref)
                self._fail(ref, "no live replica")
        self._tune()                     # small instances from other peers: batches
        if self.overlay is not None:
            self.overlay.membership.on_change.append(self._member_changed)
        self._schedule()

    def cancel(self):
        """Fetch nothing more; whoever waits for an instance not yet here gets
        CancelledError (its sub-operation stays 'remaining'); what was fetched and never
        opened is closed and let go (the retrieval stays in the status list a while)."""
        self.cancelled = True
        self._stop_watching()
        for uid, d in self._results.items():
            if not d.called:
                d.errback(defer.CancelledError("retrieval cancelled"))
                d.addErrback(lambda f: None)
            elif uid not in self._opened and not isinstance(d.result, Failure):
                value = d.result
                d.addCallback(_dropped)
                if callable(close := getattr(value, "close", None)):
                    close()
        self._schedule()                 # finished now, if nothing is in flight

    def _stop_watching(self):
        if self.overlay is not None and self._member_changed in \
                self.overlay.membership.on_change:
            self.overlay.membership.on_change.remove(self._member_changed)

    def _member_changed(self, member, state):
        if state != "dead":
            return
        for src in list(self.plan.sources.values()):
            if src.peer == member.name and src.alive:
                self._drop(src, f"peer {member.name} is dead")

    def _budget(self) -> int:
        """Instances the window has room for: by count, by the bytes in memory (at the
        average size of those held in memory), by what all retrievals hold."""
        fetching = sum(len(s) > 0 for s in self.plan.in_flight.values())
        room = self.window - fetching - self._buffered
        if self._max_held * self.window > self.window_bytes:   # (small ones: count alone)
            room = min(room, int((self.window_bytes - self.in_memory) // self._avg_held))
        if self._max_held * self.window > self.pool.floor:     # (else it cannot bind)
            room = min(room, int(self.pool.room(self) // self._avg_held))
        return room

    @property
    def in_memory(self) -> int:
        """Bytes of instances held in memory: fetched and not opened, or being fetched."""
        return 0 if self.cancelled else self._buffered_bytes + self._flying_bytes

    def _full(self) -> bool:
        """Nearly full of fetched instances: no room for a batch."""
        return self._budget() < self.room <= self._buffered

    def _free(self, name: str) -> bool:
        src = self.plan.sources[name]
        return src.alive and src.in_flight < src.limit

    def _schedule(self):
        """Give free sources work. Not re-entered: a fetch that fails at once (and
        schedules again from its errback) makes the running pass go round once more."""
        if self._scheduling:
            self._again = True
            return
        self._scheduling = True
        try:
            self._again = True
            while self._again and not self.cancelled:
                self._again = False
                self._schedule_once()
                self._read_batches()
        finally:
            self._scheduling = False
        # (cheap test first: every result is called only once done + unavailable
        # covers every instance, or the retrieval was cancelled)
        if self._results and self.finished_at is None and (
                self.cancelled or len(self.plan.done) + len(self._unavailable)
                >= len(self._results)) and all(d.called for d in self._results.values()):
            self.finished_at = time.time()
            self._stop_watching()
            self._observe()

    def _claimable(self, src: Source, ref: InstanceRef) -> bool:
        uid = ref.sop_instance_uid
        return (src.alive and src.name in self.plan.holders.get(uid, ())
                and uid not in self.plan.done and not self._results[uid].called
                and src.name not in self.plan.in_flight.get(uid, ()))

    def _schedule_once(self):
        plan = self.plan
        # A window nearly full of fetched instances takes new work only once there is
        # room for a batch (one read job for several small files, not one per instance
        # opened); meanwhile what a consumer waits for is still fetched (else it would
        # wait for ever), from its first-ranked live source.
        full = self._full()
        wanted = ([r for r in self._wanted.values() if r in plan.pending]
                  if self._wanted and (full or self._budget() <= 0) else [])
        for ref in wanted:      # from its first-ranked live source, once that one is free
            name = next((n for n in plan.ranked(ref.sop_instance_uid)     # (its fetches
                         if plan.sources[n].alive), None)     # end or stall: never stuck)
            if name is not None and self._free(name) and \
                    self._claimable(plan.sources[name], ref):
                self._claim(plan.sources[name], ref)
        progress = not full
        while progress and self._budget() > 0:
            progress = False
            # the least busy first; among equals, the one given work longest ago (so a
            # slow consumer's trickle of work is spread over every source, not one)
            for src in sorted(plan.sources.values(), key=lambda s: (s.in_flight, s._turn)):
                if not src.alive or src.in_flight >= src.limit or self._budget() <= 0:
                    continue
                batch = self._next_batch(src)
                for ref in batch[:max(0, min(src.limit - src.in_flight, self._budget()))]:
                    if src.in_flight >= src.limit or not self._claimable(src, ref):
                        continue       # not a holder (strategy's mistake), or taken meanwhile
                    self._claim(src, ref)
                    progress = True
        self._rescue_head()

    def _observe(self):
        """Tell the strategies how fast each archive served (``nearest`` ranks by it)."""
        if self._observed:
            return
        self._observed = True
        for src in self.plan.sources.values():
            if src.completed:
                self.strategies.observe(src.peer, src.archive, src.rate)

    def _next_batch(self, src):
        try:
            return self.strategies.next_batch(self.plan, src)
        except Exception as e:
            log.error("retrieval {id}: {err}; falling back to first come, first served",
                      id=self.id, err=e)
        return [r for r in self.plan.pending
                if src.name in self.plan.holders[r.sop_instance_uid]][:1]

    def _rescue_head(self):
        """The oldest instance nobody has opened yet, stuck on one source: ask the next
        free source of its ranking."""
        plan = self.plan
        refs = self.refs
        while self._head < len(refs):       # opened/done/called never go back: skip them
            uid = refs[self._head].sop_instance_uid
            if uid in self._opened or uid in plan.done or self._results[uid].called:
                self._head += 1
            else:
                break
        for i in range(self._head, len(refs)):
            ref = refs[i]
            uid = ref.sop_instance_uid
            if uid in self._opened or uid in plan.done or self._results[uid].called:
                continue
            fetching = plan.in_flight.get(uid, set())
            if len(fetching) != 1:
                return
            (only,) = fetching
            if self.reactor.seconds() - self._timers.get((only, uid), (None, 0))[1] < 2.0:
                return
            for name in plan.ranked(uid):
                if name not in fetching and self._free(name):
                    self.rescued += 1
                    self._claim(plan.sources[name], ref)
                    return
            return

    def _claim(self, src: Source, ref: InstanceRef):
        plan = self.plan
        uid = ref.sop_instance_uid
        plan.take(ref)
        self._wanted.pop(uid, None)
        plan.in_flight.setdefault(uid, set()).add(src.name)
        self._flying_bytes += self._held[uid]
        if src.in_flight == 0:
            src._since = self.reactor.seconds()
        src.in_flight += 1
        self._turns += 1
        src._turn = self._turns
        loc = plan.where[uid][src.name]
        if self._batchable(src, loc, ref):          # read with others (``batches``)
            self._batches.setdefault(src.name, []).append(ref)
            self._timers[(src.name, uid)] = (None, self.reactor.seconds())
            return
        self._fetch_one(src, ref, loc)

    def _fetch_one(self, src: Source, ref: InstanceRef, loc):
        """Read the claimed *ref* alone from *src* (its copy *loc*)."""
        if src.peer == self.peer:
            d = open_gated(self.archives[loc.archive], ref.sop_instance_uid, loc.sha256)
        else:
            d = defer.maybeDeferred(self.overlay.fetch, loc)
        self._watch(src, ref, d.addCallback(checked, loc, self.reactor))   # never a
                                                                           # damaged copy
    def _watch(self, src: Source, ref: InstanceRef, d):
        """*d* reads *ref* from *src*: its stall timer, its outcome."""
        timer = self.reactor.callLater(self.stall, self._stalled, src, ref, d)
        self._timers[(src.name, ref.sop_instance_uid)] = (timer, self.reactor.seconds())
        d.addCallbacks(self._got, self._lost, callbackArgs=(src, ref),
                       errbackArgs=(src, ref))

    def _settle(self, src: Source, ref: InstanceRef):
        uid = ref.sop_instance_uid
        timer, _ = self._timers.pop((src.name, uid), (None, 0))
        if timer is not None and timer.active():
            timer.cancel()
        src.in_flight -= 1
        self._flying_bytes -= self._held[ref.sop_instance_uid]
        now = self.reactor.seconds()
        if src._since is not None:
            src.busy += now - src._since
            src._since = now if src.in_flight else None
        flying = self.plan.in_flight.get(uid, set())
        flying.discard(src.name)

    def _got(self, f, src: Source, ref: InstanceRef):
        self._settle(src, ref)
        uid = ref.sop_instance_uid
        if uid in self.plan.done or self.cancelled:
            self.duplicates += uid in self.plan.done
            f.close()                                  # the endgame's second copy
        else:
            src.completed += 1
            src.bytes += ref.size
            self.plan.done.add(uid)
            self.plan.in_flight.pop(uid, None)
            self._buffered += 1
            self._buffered_bytes += self._held[uid]
            self._results[uid].callback(f)
        self._schedule()

    def _lost(self, failure: Failure, src: Source, ref: InstanceRef):
        self._settle(src, ref)
        if failure.check(defer.CancelledError) and not src.alive:
            self._schedule()
            return
        if failure.check(Damaged):           # this copy only: not the source's fault
            log.error("retrieval {id}: {err}; failing over to another replica", id=self.id,
                      err=failure.getErrorMessage())
            if self.on_damaged is not None:
                self.on_damaged(self.plan.where[ref.sop_instance_uid][src.name])
            self._forget(src, ref, failure.getErrorMessage())
            return
        log.warn("retrieval {id}: source {src} failed on {uid}: {err}", id=self.id,
                 src=src.name, uid=ref.sop_instance_uid, err=failure.getErrorMessage())
        src.failed += 1
        if failure.check(FileNotFoundError):          # not held there: moved, dropped
            src.missing += 1
        if failure.check(*_LINK_ERRORS) or src.failed - src.missing >= 3:
            self._drop(src, failure.getErrorMessage())     # the source itself is gone
        else:
            self._forget(src, ref, failure.getErrorMessage())   # just this instance

    def _stalled(self, src: Source, ref: InstanceRef, d):
        self._timers.pop((src.name, ref.sop_instance_uid), None)
        self._drop(src, f"no answer for {self.stall:.0f} s")
        d.cancel()

    def _drop(self, src: Source, why: str):
        """Stop using *src*; its instances go to the next sources of their ranking,
        the orphans fail."""
        if src.alive:
            log.warn("retrieval {id}: dropping source {src}: {why}", id=self.id,
                     src=src.name, why=why)
        src.alive, src.error = False, why
        plan = self.plan
        for ref in self.refs:
            uid = ref.sop_instance_uid
            holders = plan.holders.get(uid, set())
            if src.name not in holders:
                continue
            plan.lose(uid, src.name)
            if uid in plan.done or self._results[uid].called:
                continue
            flying = plan.in_flight.get(uid, set())
            flying.discard(src.name)
            if not holders and not flying:
                plan.take(ref)
                self._fail(ref, f"its only live replica was on {src.name}: {why}")
            elif not flying and ref not in plan.pending:
                self._requeue(ref)
        self._schedule()

    def _forget(self, src: Source, ref: InstanceRef, why: str):
        """*src* cannot give *ref* (e.g. its file is missing): try the next source."""
        uid = ref.sop_instance_uid
        self.plan.lose(uid, src.name)
        if uid in self.plan.done or self._results[uid].called:
            return
        if not self.plan.holders[uid] and not self.plan.in_flight.get(uid):
            self._fail(ref, f"{src.name}: {why}")
        elif not self.plan.in_flight.get(uid) and ref not in self.plan.pending:
            self._requeue(ref)
        self._schedule()

    def _requeue(self, ref: InstanceRef):
        """*ref* pending again (or wanted now): first in line."""
        self.plan.put_front(ref)
        if ref.sop_instance_uid in self._opened:
            self._wanted[ref.sop_instance_uid] = ref

    def _fail(self, ref: InstanceRef, why: str):
        self._wanted.pop(ref.sop_instance_uid, None)
        d = self._results[ref.sop_instance_uid]
        if not d.called:
            failure = Failure(Unavailable(f"{ref.sop_instance_uid}: {why}"))
            self._unavailable[ref.sop_instance_uid] = failure
            d.errback(failure)
            d.addErrback(lambda f: None)      # reported when opened, not as unhandled

    # -- consuming -----------------------------------------------------------------------
    def open(self, ref: InstanceRef) -> defer.Deferred:
        """Deferred[binary file of the Part-10 file] of *ref* (Unavailable if none)."""
        if self.cancelled:
            return defer.fail(defer.CancelledError("retrieval cancelled"))
        self.start()
        uid = ref.sop_instance_uid
        if uid in self._opened:
            return defer.fail(ValueError(f"{uid} was already opened"))
        self._opened.add(uid)
        if uid in self._unavailable and uid not in self.plan.done:
            return defer.fail(self._unavailable[uid])     # failed before it was opened
        plan = self.plan
        # wanted now: to the front (a fetched or fetching one is not pending: no scan)
        if uid not in plan.done and not plan.in_flight.get(uid) and ref in plan.pending:
            self._requeue(ref)
        source = self._results[uid]
        if source.called and not isinstance(source.result, Failure):
            value = source.result                       # fetched already: hand it over
            source.addCallback(_dropped)                # (and keep no reference to it)
            self._handed(uid)
            return defer.succeed(value)
        self.waited += 1                                # the consumer waits for it
        result = defer.Deferred()

        def handed(value):
            if not isinstance(value, Failure):
                self._handed(uid)
            result.callback(value) if not isinstance(value, Failure) else result.errback(value)

        source.addBoth(handed)
        if uid not in plan.done and not plan.in_flight.get(uid):
            self._schedule()                            # wanted, and not on its way
        return result

    def _handed(self, uid: str):
        self._buffered -= 1
        self._buffered_bytes -= self._held[uid]
        if self._kick is None:          # one pass for what was opened meanwhile
            self._kick = self.reactor.callLater(0, self._kicked)

    def _kicked(self):
        self._kick = None
        if not self._wanted and self._full():
            return              # nothing to fetch before there is room for a batch
        self._schedule()

    def status(self) -> dict:
        """Counts, and per source (``peer/archive``) what it served and how fast."""
        return {"id": self.id, "instances": len(self.refs), "done": len(self.plan.done),
                "rescued": self.rescued, "duplicates": self.duplicates,
                "waited": self.waited,
                "pending": len(self.plan.pending), "started_at": self.started_at,
                "finished_at": self.finished_at, "cancelled": self.cancelled,
                "sources": {s.name: {"peer": s.peer, "archive": s.archive,
                                     "alive": s.alive, "completed": s.completed,
                                     "failed": s.failed, "in_flight": s.in_flight,
                                     "limit": s.limit,
                                     "MB_per_s": round(s.rate / 1e6, 2),
                                     **({"error": s.error} if s.error else {})}
                            for s in self.plan.sources.values()}}
