"""Drain: move every copy off an archive (or every archive of a peer) before it is removed.

``pacsp2p drain --peer NAME`` (or ``--archive NAME``) asks the peer that holds the
copies — this one, or another over the overlay (``Drain``) — to drain. That peer:

1. marks the archives *draining* and says so to every peer: in its member record
   (``draining``: {archive: state}, gossiped with every heartbeat like
   ``archives_down``, so every peer — and one that joins later — knows within a second)
   and in its catalog (so it drains on after a restart). From then on placement
   (``Ingest.candidates``) leaves those archives out on every peer: no new instance, no
   repair copy and no hinted hand-off goes there, and repair's surplus trimming, which
   keeps the first ``replicas`` holders in placement order, drops a draining copy first;
2. walks its copies on them (the catalog's locations, by sequence number) and, for each,
   copies it to the archives placement ranks first among those that are live, not
   draining and do not hold it — distinct peers first, as for a new instance — until the
   instance has ``replicas`` copies of the same bytes outside the draining archives
   (``Replicate`` + ``Commit``: the target checks the bytes against the catalog's SHA-256;
   another version of the UID is no copy of ours), then drops its
   own copy (the file, then a tombstone fact that anti-entropy spreads). A copy is
   dropped only once the instance holds ``replicas`` live copies elsewhere, so no
   instance is ever under-replicated by a drain; copies share the repair's throttle
   (``[cluster] repair_rate``);
3. walks again until the archives hold nothing (a copy whose move failed is tried again
   5 s later, the wait doubling up to 5 min while it fails: ``transfer.backoff``), then reports them ``drained``: safe to remove. An
   instance for which no archive can take a copy (every other archive holds it or is
   down) keeps its copy and the state is ``blocked`` until one can.

An archive that cannot delete (plain DIMSE, a read-only archive) keeps its files: the
cluster forgets its copies and no longer reads or counts them there.

A drained archive stays out of placement until the peer is removed (or ``--stop``,
which ends the drain and lets placement use it again; what moved stays moved).
Removing a drained peer leaves no instance under-replicated: it holds nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time

from twisted.internet import defer, task
from twisted.logger import Logger

from pacsp2p.catalog import copies
from pacsp2p.catalog import scrub as sql
from pacsp2p.overlay.commands import Drain as DrainCommand
from pacsp2p.strategies import StrategyError
from pacsp2p.transfer.backoff import Backoff
from pacsp2p.types import InstanceInfo, Location

log = Logger()

TICK = 2.0              # seconds between two walks while draining
RECHECK = 30.0          # seconds between two looks at drained archives (a late copy)
CHUNK = 200             # copies read from the catalog per step
PARALLEL = 8            # copies moved at once
_KEY = "drain"


class DrainError(ValueError):
    """A drain that cannot be asked for (unknown peer or archive, a dead peer)."""


class Drain:
    def __init__(self, settings, catalog, archives: dict, strategies, ingest, repair,
                 overlay, reactor, scrubber=None):
        self.peer = settings.peer.name
        self.replicas = settings.cluster.replicas
        self.catalog, self.archives, self.strategies = catalog, archives, strategies
        self.ingest, self.repair, self.overlay = ingest, repair, overlay
        self.reactor, self.scrubber = reactor, scrubber
        self._failed = Backoff()          # (uid, archive) of moves that failed: when again
        self.state: dict[str, str] = {}          # archive of ours -> draining/blocked/drained
        self.running = False
        self._loop = None
        self._walking = False
        self._walked_at = 0.0
        self.stats = {"started": None, "moved": 0, "dropped": 0, "bytes": 0, "failed": 0,
                      "remaining": None, "blocked": 0, "finished": None}

    # -- life cycle ------------------------------------------------------------------
    @defer.inlineCallbacks
    def start(self):
        self.running = True
        try:
            saved = yield self.catalog.read(lambda conn: sql.load_state(conn, _KEY))
        except Exception as e:
            log.warn("drain: cannot read its saved state: {err}", err=e)
            saved = {}
        names = [n for n in saved.get("archives") or () if n in self.archives]
        if names:
            self.stats.update({k: v for k, v in (saved.get("stats") or {}).items()
                               if k in self.stats})
            log.info("drain: archive(s) {names} still draining (since before the restart)",
                     names=", ".join(names))
            self._set({n: "draining" for n in names})
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(TICK, now=False).addErrback(
            lambda f: log.failure("drain loop failed", f))

    def stop(self):
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._save()

    def _set(self, state: dict) -> None:
        """Our draining archives and their states: placement here, member record there."""
        self.state = dict(state)
        self.ingest.drain_here = set(self.state)
        if self.overlay is not None:
            ms = self.overlay.membership
            ms.me = dataclasses.replace(ms.me, draining=dict(self.state))

    def _save(self):
        saved = {"archives": sorted(self.state), "stats": dict(self.stats)}
        d = self.catalog.write(lambda conn: sql.save_state(conn, _KEY, saved))
        d.addErrback(lambda f: log.warn("drain: cannot save its state: {err}",
                                        err=f.getErrorMessage()))
        return d

    # -- asking ----------------------------------------------------------------------
    def request(self, peer: str | None = None, archive: str | None = None,
                stop: bool = False):
        """Drain (or, with *stop*, stop draining) *archive* of *peer* (default: this
        peer; no archive: every archive of the peer). Deferred[dict]: peer, archives,
        copies (on them now, as that peer counts)."""
        peer = peer or self.peer
        names = [archive] if archive else []
        if peer == self.peer:
            return self.begin(names, stop)
        if self.overlay is None:
            return defer.fail(DrainError(f"peer {peer!r}: this peer runs on its own"))
        ms = self.overlay.membership
        member = ms.members.get(peer)
        if member is None:
            return defer.fail(DrainError(f"no peer {peer!r} in the cluster"))
        if not ms.alive(peer):
            return defer.fail(DrainError(
                f"peer {peer} is not alive: a dead peer cannot move its copies; repair "
                f"makes them again elsewhere after repair_after"))
        d = ms.call(peer, DrainCommand, archives=json.dumps(names), stop=stop)
        d.addCallback(lambda answer: {"peer": peer, "archives": json.loads(answer["archives"]),
                                      "copies": answer["copies"], "stop": stop})
        return d

    @defer.inlineCallbacks
    def begin(self, names: list, stop: bool = False):
        """Drain *names* of this peer's archives (all of them if empty); the answer of
        ``request``. Raises DrainError for an archive this peer does not have."""
        unknown = [n for n in names if n not in self.archives]
        if unknown:
            raise DrainError(f"peer {self.peer} has no archive {unknown[0]!r} (it has: "
                             f"{', '.join(sorted(self.archives))})")
        names = list(names or self.archives)
        if stop:
            left = {n: s for n, s in self.state.items() if n not in names}
            if len(left) != len(self.state):
                log.info("drain: stopped for {names}; placement may use them again",
                         names=", ".join(sorted(set(self.state) - set(left))))
            self._set(left)
        else:
            new = [n for n in names if n not in self.state]
            if new:
                if not self.state:
                    self.stats.update(started=time.time(), moved=0, dropped=0, bytes=0,
                                      failed=0, remaining=None, blocked=0, finished=None,
                                      last_error=None)
                log.info("drain: archive(s) {names} of peer {peer} draining: placement "
                         "sends nothing new there; their copies move to other archives",
                         names=", ".join(new), peer=self.peer)
                self._set({**self.state, **{n: "draining" for n in new}})
                self.stats["finished"] = None
        yield self._save()
        n = yield self.catalog.read(lambda conn: sql.count_copies(conn, self.peer, names))
        if not stop:
            self.reactor.callLater(0, self.tick)
        return {"peer": self.peer, "archives": names, "copies": n, "stop": stop}

    def progress(self, peer: str | None = None, archive: str | None = None):
        """Deferred[dict] of a drain as this peer sees it: the copies its catalog still
        places on the archive(s), and the state the draining peer advertises."""
        peer = peer or self.peer
        if peer == self.peer:
            states = dict(self.state)
            extra = {"stats": dict(self.stats)}
        else:
            member = self.overlay.membership.members.get(peer) if self.overlay else None
            if member is None:
                return defer.fail(DrainError(f"no peer {peer!r} in the cluster"))
            states = dict(getattr(member.info, "draining", None) or {})
            extra = {"alive": self.overlay.membership.alive(peer)}
        names = [archive] if archive else None
        shown = {n: s for n, s in states.items() if names is None or n in names}
        d = self.catalog.read(lambda conn: sql.count_copies(conn, peer, names))
        d.addCallback(lambda n: {"peer": peer, "archive": archive, "states": shown,
                                 "remaining": n, **extra})
        return d

    # -- moving ----------------------------------------------------------------------
    def tick(self):
        if not self.running or self._walking or not self.state:
            return
        if all(s == "drained" for s in self.state.values()) and \
                time.monotonic() - self._walked_at < RECHECK:
            return
        self._walked_at = time.monotonic()
        self.walk().addErrback(lambda f: log.failure("drain: walk failed", f))

    @defer.inlineCallbacks
    def walk(self):
        """One walk over our copies on the draining archives."""
        self._walking = True
        self._failed.prune()
        names = set(self.state)
        after, left, blocked = 0, 0, 0
        try:
            while self.running and names and names <= set(self.state):
                rows = yield self.catalog.read(
                    lambda conn, a=after: sql.own_copies(conn, self.peer, a, CHUNK, names))
                if not rows:
                    break
                after = rows[-1].seq
                uids = sorted({c.uid for c in rows})
                infos, where = yield self.catalog.read(lambda conn: _lookup(conn, uids))
                jobs = []
                for c in rows:
                    if self._failed.waiting((c.uid, c.archive)):
                        left += 1
                        continue
                    job = self._plan(c, infos.get(c.uid), where.get(c.uid, []))
                    if job is None:
                        blocked += 1
                    else:
                        jobs.append(job)
                sem = defer.DeferredSemaphore(PARALLEL)
                results = yield defer.gatherResults([sem.run(self._move, *j) for j in jobs])
                left += sum(1 for ok in results if not ok)
            remaining = yield self.catalog.read(
                lambda conn: sql.count_copies(conn, self.peer, names))
        finally:
            self._walking = False
        if not names <= set(self.state):
            return                                 # stopped meanwhile
        self.stats.update(remaining=remaining, blocked=blocked)
        if remaining == 0:
            if any(s != "drained" for s in self.state.values()):
                self.stats["finished"] = time.time()
                log.info("drain: archive(s) {names} of peer {peer} drained ({n} copies "
                         "moved, {d} dropped as surplus): safe to remove",
                         names=", ".join(sorted(names)), peer=self.peer,
                         n=self.stats["moved"], d=self.stats["dropped"])
            self._set({n: "drained" for n in self.state})
        elif blocked:
            if any(s != "blocked" for s in self.state.values()):
                log.warn("drain: {n} instance(s) have no other archive to take a copy: "
                         "their copies stay until one can", n=blocked)
            self._set({n: "blocked" for n in self.state})
        else:
            self._set({n: "draining" for n in self.state})
        yield self._save()

    def _plan(self, c, info, locs):
        """(copy, our Location, targets) to move *c*, or None when blocked."""
        draining = self.ingest.draining()
        lv = self.repair.liveness()
        mine = Location(c.uid, c.archive, self.peer, c.sha256, c.size)
        outside = [loc for loc in locs if (loc.peer, loc.archive) not in draining
                   and lv.live(loc.peer, loc.archive)
                   and (loc.sha256 == mine.sha256 or not (loc.sha256 and mine.sha256))]
        need = max(0, self.replicas - len(outside))
        if not need:
            return (mine, [])                    # enough copies elsewhere: just drop ours
        info = info or InstanceInfo(c.uid, "", "", "", "", c.size)
        candidates = self.ingest.candidates()
        try:
            targets = self.repair._targets(info, locs, outside, lv, candidates, need)
        except StrategyError as e:
            log.error("drain of {uid}: {err}", uid=c.uid, err=e)
            return None
        if len(targets) < need:
            return None
        return (mine, targets)

    @defer.inlineCallbacks
    def _move(self, mine: Location, targets: list):
        uid = mine.sop_instance_uid
        try:
            for target in targets:
                yield self.repair.throttle.wait(mine.size)
                if not self.running or mine.archive not in self.state:
                    return False
                yield self.repair.copy_to(mine, target)
                self.stats["moved"] += 1
                self.stats["bytes"] += max(0, mine.size)
                log.debug("drain: {uid} copied to {archive}@{peer}", uid=uid,
                          archive=target.name, peer=target.peer)
            if not targets:
                self.stats["dropped"] += 1
            discard = getattr(self.archives[mine.archive], "discard", None)
            if discard is not None:            # (a read-only archive keeps its file)
                yield discard(uid, mine.sha256)
            yield self.catalog.forget(uid, mine.archive, mine.sha256)
            self._failed.succeeded((uid, mine.archive))
            return True
        except Exception as e:
            self.stats["failed"] += 1
            self.stats["last_error"] = f"{uid}: {e}"[:300]      # what `pacsp2p drain` shows
            wait = self._failed.failed((uid, mine.archive))
            log.warn("drain: moving {uid} off {archive} failed: {err} (tried again in "
                     "{s:.0f} s)", uid=uid, archive=mine.archive, err=e, s=wait)
            if self.scrubber is not None:        # our copy may be damaged: check it
                self.scrubber.suspect(mine)
            return False

    def status(self) -> dict:
        """This peer's drain, and the drains other peers advertise."""
        others = {}
        if self.overlay is not None:
            for m in self.overlay.membership.members.values():
                states = getattr(m.info, "draining", None) or {}
                if states:
                    others[m.name] = {"states": dict(states), "state": m.state}
        return {"here": {"states": dict(self.state), **self.stats} if self.state else None,
                "peers": others}


def _lookup(conn, uids):
    """({uid: InstanceInfo}, {uid: [Location]}) of *uids* (copies of every peer)."""
    infos = copies.instance_infos(conn, uids)
    where: dict[str, list] = {}
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        for uid, archive, peer, sha, size in conn.execute(
                "SELECT SOPInstanceUID, archive, peer, sha256, size FROM locations "
                f"WHERE size >= 0 AND SOPInstanceUID IN ({', '.join('?' * len(chunk))})",
                chunk):
            where.setdefault(uid, []).append(Location(uid, archive, peer, sha, size))
    return infos, where

