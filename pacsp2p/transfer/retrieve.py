"""Retrieval: fetch a set of instances from all their replicas at once.

As in BitTorrent, every live holder of some of the instances is a *source*; sources
work in parallel, each pulling small batches chosen by the load-balancing strategy
(``pacsp2p_next_batch``; built-in: work stealing weighted by measured throughput, rarest
first, with an endgame in which the last instances may be requested from a second
source, the first copy winning). A source that fails (peer dead, connection lost, read
error, stalled) is dropped and its instances go back to the others; an instance with no
live holder left is a failed sub-operation, reported by SOP Instance UID.

Consumers (the C-MOVE delivery, C-GET) call ``open(ref)`` in their own order; fetching
runs ahead of them within a bounded window (instances fetched but not yet opened), and
the instance a consumer waits for is rescued on a second source if its only one stalls.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.python.failure import Failure

from pacsp2p.overlay.node import PeerUnknown
from pacsp2p.types import InstanceRef

log = Logger()

STALL_SECONDS = 20.0
_ids = itertools.count(1)


# failures that mean the source peer cannot be reached, not that one instance is bad
_LINK_ERRORS = (error.ConnectError, error.ConnectionLost, error.ConnectionDone,
                ResponseFailed, ResponseNeverReceived, defer.CancelledError, PeerUnknown)


class Unavailable(Exception):
    """No replica of an instance could be read."""


@dataclass
class Source:
    """One source of a retrieval: a peer (this one included) and its statistics."""

    name: str
    holds: set = field(default_factory=set)
    in_flight: int = 0
    completed: int = 0
    failed: int = 0
    bytes: int = 0
    started: float = 0.0
    busy: float = 0.0                 # seconds with at least one fetch running
    _since: float | None = None
    alive: bool = True
    error: str = ""

    @property
    def rate(self) -> float:
        """Bytes per second while it had work (0 until something arrived)."""
        return self.bytes / self.busy if self.completed and self.busy > 0 else 0.0


class PlanView:
    """What the load-balancing hook sees of a running retrieval."""

    def __init__(self, refs):
        self.refs = refs
        self.pending: list[InstanceRef] = list(refs)      # not claimed by any source
        self.in_flight: dict[str, set] = {}               # uid -> sources fetching it
        self.done: set[str] = set()
        self.holders: dict[str, set] = {}                 # uid -> live sources holding it
        self.sources: dict[str, Source] = {}
        self.memo: dict = {}                              # for strategies' own state
        sizes = [r.size for r in refs if r.size]
        self.avg_size = sum(sizes) / len(sizes) if sizes else 1 << 19

    def in_flight_refs(self):
        by_uid = {r.sop_instance_uid: r for r in self.refs}
        return [by_uid[u] for u in self.in_flight if self.in_flight[u]]


class Retrieval:
    def __init__(self, refs: list[InstanceRef], archives: dict, peer: str, overlay=None,
                 strategies=None, reactor=None, window: int = 64, per_source: int = 8):
        self.id = next(_ids)
        self.refs = refs
        self.archives = archives
        self.peer = peer
        self.overlay = overlay
        self.strategies = strategies
        self.reactor = reactor
        self.window = window
        self.per_source = per_source
        self.plan = PlanView(refs)
        self._results: dict[str, defer.Deferred] = {}
        self._unavailable: dict[str, Failure] = {}    # uid -> why (open() errbacks with it)
        self._opened: set[str] = set()
        self._buffered = 0               # fetched, not yet opened
        self._timers: dict = {}
        self.started = False
        self.cancelled = False
        self.created = time.time()

    # -- where each instance can come from --------------------------------------------
    def _reachable(self, loc) -> bool:
        if loc.peer == self.peer:
            archive = self.archives.get(loc.archive)
            return archive is not None and "open" in archive.capabilities and bool(archive.up)
        if self.overlay is None or not self.overlay.alive(loc.peer):
            return False
        member = getattr(self.overlay.membership, "members", {}).get(loc.peer)
        down = getattr(member.info, "archives_down", ()) if member is not None else ()
        return loc.archive not in (down or ())

    def sources(self, ref: InstanceRef):
        """Replicas of *ref* this peer can read now: local archives first, then live peers."""
        reach = [loc for loc in ref.locations if self._reachable(loc)]
        return sorted(reach, key=lambda loc: loc.peer != self.peer)

    # -- running -------------------------------------------------------------------------
    def start(self):
        if self.started:
            return
        self.started = True
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        plan = self.plan
        for ref in self.refs:
            uid = ref.sop_instance_uid
            self._results[uid] = defer.Deferred()
            holders = {loc.peer for loc in self.sources(ref)}
            plan.holders[uid] = holders
            for name in holders:
                plan.sources.setdefault(name, Source(name, started=self.reactor.seconds()))
                plan.sources[name].holds.add(uid)
        for ref in list(plan.pending):
            if not plan.holders[ref.sop_instance_uid]:
                plan.pending.remove(ref)
                self._fail(ref, "no live replica")
        if self.overlay is not None:
            self.overlay.membership.on_change.append(self._member_changed)
        self._schedule()

    def cancel(self):
        """Fetch nothing more; whoever waits for an instance not yet here gets
        CancelledError (its sub-operation stays 'remaining')."""
        self.cancelled = True
        self._stop_watching()
        for d in self._results.values():
            if not d.called:
                d.errback(defer.CancelledError("retrieval cancelled"))
                d.addErrback(lambda f: None)

    def _stop_watching(self):
        if self.overlay is not None and self._member_changed in \
                self.overlay.membership.on_change:
            self.overlay.membership.on_change.remove(self._member_changed)

    def _member_changed(self, member, state):
        src = self.plan.sources.get(member.name)
        if src is not None and src.alive and state == "dead":
            self._drop(src, f"peer {member.name} is dead")

    def _budget(self) -> int:
        fetching = sum(len(s) > 0 for s in self.plan.in_flight.values())
        return self.window - fetching - self._buffered

    def _schedule(self):
        if self.cancelled:
            return
        plan = self.plan
        # when out-of-order arrivals have filled the window, what consumers already
        # wait for is fetched anyway (else they would wait for ever)
        wanted = ([r for r in plan.pending if r.sop_instance_uid in self._opened]
                  if self._budget() <= 0 else [])
        for ref in wanted:
            free = [plan.sources[n] for n in plan.holders[ref.sop_instance_uid]
                    if plan.sources[n].alive and plan.sources[n].in_flight < self.per_source]
            if free:
                self._claim(max(free, key=lambda s: (s.rate, -s.in_flight)), ref)
        progress = True
        while progress and self._budget() > 0:
            progress = False
            for src in sorted(plan.sources.values(), key=lambda s: s.in_flight):
                if not src.alive or src.in_flight >= self.per_source or self._budget() <= 0:
                    continue
                batch = self._next_batch(src)
                for ref in batch[:max(0, min(self.per_source - src.in_flight,
                                             self._budget()))]:
                    self._claim(src, ref)
                    progress = True
        self._rescue_head()
        if all(d.called for d in self._results.values()):
            self._stop_watching()

    def _next_batch(self, src):
        if self.strategies is not None:
            try:
                return self.strategies.next_batch(self.plan, src)
            except Exception as e:
                log.error("retrieval {id}: {err}; falling back to first come, first served",
                          id=self.id, err=e)
        return [r for r in self.plan.pending
                if src.name in self.plan.holders[r.sop_instance_uid]][:1]

    def _rescue_head(self):
        """The oldest instance nobody has opened yet, stuck on one source: ask another."""
        plan = self.plan
        for ref in self.refs:
            uid = ref.sop_instance_uid
            if uid in self._opened or uid in plan.done or self._results[uid].called:
                continue
            fetching = plan.in_flight.get(uid, set())
            if len(fetching) != 1:
                return
            (only,) = fetching
            if self.reactor.seconds() - self._timers.get((only, uid), (None, 0))[1] < 2.0:
                return
            for name in plan.holders[uid] - fetching:
                src = plan.sources[name]
                if src.alive and src.in_flight < self.per_source:
                    self._claim(src, ref)
                    return
            return

    def _claim(self, src: Source, ref: InstanceRef):
        plan = self.plan
        uid = ref.sop_instance_uid
        if ref in plan.pending:
            plan.pending.remove(ref)
        plan.in_flight.setdefault(uid, set()).add(src.name)
        if src.in_flight == 0:
            src._since = self.reactor.seconds()
        src.in_flight += 1
        mine = [loc for loc in ref.locations if loc.peer == src.name]
        loc = next((loc for loc in mine if self._reachable(loc)), mine[0])
        if src.name == self.peer:
            d = self.archives[loc.archive].open(ref.sop_instance_uid, loc.sha256)
        else:
            d = self.overlay.fetch(loc)
        timer = self.reactor.callLater(STALL_SECONDS, self._stalled, src, ref, d)
        self._timers[(src.name, uid)] = (timer, self.reactor.seconds())
        d.addCallbacks(self._got, self._lost, callbackArgs=(src, ref),
                       errbackArgs=(src, ref))

    def _settle(self, src: Source, ref: InstanceRef):
        uid = ref.sop_instance_uid
        timer, _ = self._timers.pop((src.name, uid), (None, 0))
        if timer is not None and timer.active():
            timer.cancel()
        src.in_flight -= 1
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
            f.close()                                  # the endgame's second copy
        else:
            src.completed += 1
            src.bytes += ref.size
            self.plan.done.add(uid)
            self.plan.in_flight.pop(uid, None)
            self._buffered += 1
            self._results[uid].callback(f)
        self._schedule()

    def _lost(self, failure: Failure, src: Source, ref: InstanceRef):
        self._settle(src, ref)
        if failure.check(defer.CancelledError) and not src.alive:
            self._schedule()
            return
        log.warn("retrieval {id}: source {src} failed on {uid}: {err}", id=self.id,
                 src=src.name, uid=ref.sop_instance_uid, err=failure.getErrorMessage())
        src.failed += 1
        if failure.check(*_LINK_ERRORS) or src.failed >= 3:
            self._drop(src, failure.getErrorMessage())     # the source itself is gone
        else:
            self._forget(src, ref, failure.getErrorMessage())   # just this instance

    def _stalled(self, src: Source, ref: InstanceRef, d):
        self._timers.pop((src.name, ref.sop_instance_uid), None)
        self._drop(src, f"no answer for {STALL_SECONDS:.0f} s")
        d.cancel()

    def _drop(self, src: Source, why: str):
        """Stop using *src*; give its instances to the others, fail the orphans."""
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
            holders.discard(src.name)
            if uid in plan.done or self._results[uid].called:
                continue
            flying = plan.in_flight.get(uid, set())
            flying.discard(src.name)
            if not holders and not flying:
                if ref in plan.pending:
                    plan.pending.remove(ref)
                self._fail(ref, f"its only live replica was on {src.name}: {why}")
            elif not flying and ref not in plan.pending:
                plan.pending.insert(0, ref)
        self._schedule()

    def _forget(self, src: Source, ref: InstanceRef, why: str):
        """*src* cannot give *ref* (e.g. its file is missing): try another holder."""
        uid = ref.sop_instance_uid
        self.plan.holders[uid].discard(src.name)
        if uid in self.plan.done or self._results[uid].called:
            return
        if not self.plan.holders[uid] and not self.plan.in_flight.get(uid):
            self._fail(ref, f"{src.name}: {why}")
        elif not self.plan.in_flight.get(uid) and ref not in self.plan.pending:
            self.plan.pending.insert(0, ref)
        self._schedule()

    def _fail(self, ref: InstanceRef, why: str):
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
        if ref in self.plan.pending:                  # wanted now: to the front
            self.plan.pending.remove(ref)
            self.plan.pending.insert(0, ref)
        result = defer.Deferred()
        source = self._results[uid]

        def handed(value):
            if not isinstance(value, Failure):
                self._buffered -= 1
                self.reactor.callLater(0, self._schedule)
            result.callback(value) if not isinstance(value, Failure) else result.errback(value)
            return None

        source.addBoth(handed)
        self._schedule()
        return result

    def status(self) -> dict:
        return {"id": self.id, "instances": len(self.refs), "done": len(self.plan.done),
                "pending": len(self.plan.pending),
                "sources": {s.name: {"alive": s.alive, "completed": s.completed,
                                     "failed": s.failed, "in_flight": s.in_flight,
                                     "MB_per_s": round(s.rate / 1e6, 2),
                                     **({"error": s.error} if s.error else {})}
                            for s in self.plan.sources.values()}}
