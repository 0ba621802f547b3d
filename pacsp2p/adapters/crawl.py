"""Join: take an archive that already holds studies into the cluster without re-sending.

A ``Crawler`` walks what the archive holds, page by page through the adapter's
``crawl`` (patient -> study -> series -> instance C-FIND for plain DIMSE, the vendor's
fast path where an adapter knows one), records every instance as a location fact of this
peer (the overlay then gossips it), and saves its cursor after each page so a restart
resumes where it stopped. Queries are paced by a token bucket (``[[archives]]
crawl_qps``) so crawling never starves the archive's clinical traffic. Once done it
follows new content through ``changes`` (or a periodic re-crawl). Identical SOP Instance
UIDs found on two archives become two replicas of one instance. An instance deleted
from the cluster (a tombstone) is never recorded again by a crawl or a change feed: an
archive that could not delete it keeps it, hidden; to bring it back, send it again
through the cluster.

What an archive lists is hostile input: an instance whose SOP Instance, SOP Class, Study
or Series Instance UID (or transfer syntax, when given) is not a UID by PS3.5 §9.1
(``validate``), or whose attribute values are longer than ``validate.VALUE_MAX``
characters, is not recorded (a warning per page names how many and one example).
"""

from __future__ import annotations

import time

from twisted.internet import defer, task
from twisted.logger import Logger

from pacsp2p.types import Location
from pacsp2p.validate import InvalidUID, check_uid, long_value, shown

log = Logger()

_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID")


def listed_error(meta) -> str:
    """Why the instance *meta* an archive listed cannot be recorded ("" if it can)."""
    try:
        check_uid(meta.sop_instance_uid, "SOP Instance UID")
        check_uid(meta.sop_class_uid, "SOP Class UID")
        if meta.transfer_syntax_uid:
            check_uid(meta.transfer_syntax_uid, "Transfer Syntax UID")
        attrs = meta.attributes if isinstance(meta.attributes, dict) else {}
        if attrs.get("SOPInstanceUID", meta.sop_instance_uid) != meta.sop_instance_uid:
            return f"SOPInstanceUID {shown(attrs['SOPInstanceUID'])} is not the instance's"
        for key in _UID_KEYS:
            check_uid(attrs.get(key), key)
        return long_value(attrs)
    except InvalidUID as e:
        return str(e)


class TokenBucket:
    """At most *rate* tokens per second, bursts up to *burst* (Turner's token bucket)."""

    def __init__(self, reactor, rate: float, burst: float | None = None):
        self.reactor, self.rate = reactor, float(rate)
        self.burst = burst or max(1.0, self.rate)
        self.tokens, self.stamp = self.burst, reactor.seconds()

    def __call__(self) -> defer.Deferred:
        now = self.reactor.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        if self.tokens >= 0:
            return defer.succeed(None)
        return task.deferLater(self.reactor, -self.tokens / self.rate, lambda: None)


class Crawler:
    def __init__(self, archive, catalog, peer: str, reactor, qps: float = 50.0,
                 follow_every: float = 10.0):
        self.archive, self.catalog, self.peer, self.reactor = archive, catalog, peer, reactor
        self.throttle = TokenBucket(reactor, qps)
        self.follow_every = follow_every
        self.done = 0              # instances the crawl itself went through
        self.followed = 0          # instances found since by following changes
        self.follows = 0           # rounds of following changes done since this start
        self.total: int | None = None
        self.finished = False
        self.error: str | None = None
        self.t0 = None
        self.t_end = None          # when the crawl finished: the rate stops there
        self.done_at_end = 0
        self.start_done = 0
        self._running = False
        self._follow = None

    def start(self):
        self._running = True
        d = self._crawl()
        d.addErrback(self._failed)
        return d

    def stop(self):
        self._running = False
        if self._follow is not None and self._follow.running:
            self._follow.stop()

    def _failed(self, failure):
        self.error = failure.getErrorMessage()
        log.error("crawl of archive {archive} stopped: {err} (it resumes at the next start)",
                  archive=self.archive.name, err=self.error)

    @defer.inlineCallbacks
    def _record(self, items):
        items = self._valid(items)
        # what this archive is already known to hold (stored through the cluster, or an
        # earlier crawl) keeps its fact: a crawl knows less (no hash, maybe no syntax)
        uids = [meta.sop_instance_uid for meta, _ in items]
        known = yield self.catalog.held(self.peer, self.archive.name, uids)
        known |= yield self.catalog.tombstoned(uids)      # deleted: never back by a crawl
        items = [(meta, size) for meta, size in items if meta.sop_instance_uid not in known]
        yield defer.gatherResults([
            self.catalog.record(meta, Location(meta.sop_instance_uid, self.archive.name,
                                               self.peer, "", size))
            for meta, size in items], consumeErrors=True)
        return len(items)

    def _valid(self, items) -> list:
        """*items* without those the archive listed with invalid UIDs or values."""
        kept, refused, example = [], 0, ""
        for meta, size in items:
            why = listed_error(meta)
            if why:
                refused += 1
                example = example or why
            else:
                kept.append((meta, size))
        if refused:
            log.warn("archive {archive}: {n} listed instance(s) not recorded: invalid UID "
                     "or value (e.g. {why})", archive=self.archive.name, n=refused,
                     why=example)
        return kept

    @defer.inlineCallbacks
    def _crawl(self):
        state = yield self.catalog.crawl_state(self.archive.name)
        cursor, self.done, finished, since = state
        self.t0 = time.monotonic()
        start_done = self.start_done = self.done
        if not finished:
            log.info("crawling archive {archive}{resume}", archive=self.archive.name,
                     resume=f" (resuming after {self.done} instances)" if cursor else "")
            last_log = 0.0
            while self._running:
                items, cursor, total = yield self.archive.crawl(cursor, self.throttle)
                if total is not None:
                    self.total = total
                yield self._record(items)
                self.done += len(items)
                yield self.catalog.save_crawl_state(self.archive.name, cursor, self.done,
                                                    cursor is None, since)
                now = time.monotonic()
                if now - last_log > 5 or cursor is None:
                    last_log = now
                    log.info("crawl of {archive}: {progress}", archive=self.archive.name,
                             progress=self.progress_text(start_done))
                if cursor is None:
                    self.t_end, self.done_at_end = time.monotonic(), self.done
                    break
            if not self._running:
                return
        self.finished = True
        if "changes" in self.archive.capabilities:
            self._follow = task.LoopingCall(self._follow_changes)
            self._follow.clock = self.reactor
            self._follow.start(self.follow_every, now=True).addErrback(self._failed)

    @defer.inlineCallbacks
    def _follow_changes(self):
        state = yield self.catalog.crawl_state(self.archive.name)
        since = state[3]
        items, since = yield self.archive.changes(since, self.throttle)
        if items:
            new = yield self._record(items)
            self.followed += new       # the crawl's own count stays the crawl's
            if new:
                log.info("archive {archive}: {n} new instance(s) found",
                         archive=self.archive.name, n=new)
        yield self.catalog.save_crawl_state(self.archive.name, None, self.done, True, since)
        self.follows += 1

    def progress_text(self, start_done: int = 0) -> str:
        s = self.status(start_done)
        total = f"/{s['total']}" if s["total"] else ""
        eta = f", ETA {s['eta_s']:.0f} s" if s.get("eta_s") is not None else ""
        return f"{s['done']}{total} instances, {s['rate']:.0f}/s{eta}"

    def status(self, start_done: int | None = None) -> dict:
        """Progress of the crawl itself: ``done`` counts the instances the crawl went
        through (not those found later by following changes: ``followed``), the rate
        those crawled since this start (resumed ones excluded) over the crawl's own
        time."""
        if start_done is None:
            start_done = self.start_done
        end = self.t_end or time.monotonic()
        elapsed = end - self.t0 if self.t0 else 0.0
        crawled = (self.done_at_end if self.t_end else self.done) - start_done
        rate = crawled / elapsed if elapsed > 0 else 0.0
        eta = ((self.total - self.done) / rate if self.total and rate > 0
               and not self.finished else None)
        return {"archive": self.archive.name, "done": self.done, "total": self.total,
                "rate": round(rate, 1), "eta_s": eta, "finished": self.finished,
                "followed": self.followed, "follows": self.follows,
                "elapsed_s": round(elapsed, 3), "error": self.error,
                "unlisted": list(getattr(self.archive, "crawl_unlisted", ()))}
