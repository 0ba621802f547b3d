"""Catalog sync by anti-entropy over per-origin logs with version vectors.

Every location fact is owned by one origin (the peer whose archive holds the replica),
which numbers its facts 1, 2, 3, ... A fact that changes is re-issued with a new number,
so each origin's facts form an append-only log compacted to the latest fact per key.
Each peer holds a version vector {origin: highest number held} and sends it with every
heartbeat (Demers et al., "Epidemic algorithms for replicated database maintenance",
PODC 1987; version vectors after Parker et al., 1983). A peer that sees a neighbour
ahead for some origin pulls the missing facts from that neighbour over the bulk channel,
in batches, in order, and applies each batch in one transaction — so memory is bounded
by one batch, a pull interrupted by a crash or partition resumes where it stopped, and
all peers converge on the same catalog.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

BATCH = 5000


class AntiEntropy:
    def __init__(self, catalog, bulk, batch: int = BATCH):
        self.catalog = catalog
        self.bulk = bulk
        self.batch = batch
        self._pulling: set[str] = set()     # origins being pulled
        self.pulled = 0

    def compare(self, member, vector: dict) -> None:
        """Called with a neighbour's vector (from its heartbeat)."""
        mine = self.catalog.vector
        for origin, seq in vector.items():
            if origin == self.catalog.peer:
                continue                     # nobody knows our own facts better than we
            if seq > mine.get(origin, 0) and origin not in self._pulling:
                self._pulling.add(origin)
                self._pull(member, origin, seq).addBoth(
                    lambda _, o=origin: self._pulling.discard(o))

    @defer.inlineCallbacks
    def _pull(self, member, origin: str, target: int):
        start = self.catalog.vector.get(origin, 0)
        ahead = None            # (after, Deferred): the next batch, asked for in advance
        try:
            while self.catalog.vector.get(origin, 0) < target:
                after = self.catalog.vector.get(origin, 0)
                if ahead is not None and ahead[0] == after:
                    rows = yield ahead[1]
                else:
                    _drop(ahead)
                    rows = yield self.bulk.changes(member, origin, after, self.batch)
                ahead = None
                if not rows:
                    break
                applied = self.catalog.apply(origin, rows)   # validates rows first
                last = int(rows[-1][0])
                if after < last < target:
                    # pipelining: the neighbour reads and sends the next batch while this
                    # one is written; at most two batches are held at a time
                    ahead = (last, self.bulk.changes(member, origin, last, self.batch))
                yield applied
                self.pulled += len(rows)
        except Exception as e:
            log.warn("sync of {origin} from {peer} stopped: {err}", origin=origin,
                     peer=member.name, err=e)
            return
        finally:
            _drop(ahead)
        got = self.catalog.vector.get(origin, 0)
        if got > start:
            log.info("synced facts of {origin} from {peer}: sequence {a} -> {b}",
                     origin=origin, peer=member.name, a=start, b=got)


def _drop(ahead) -> None:
    """Abandon a batch asked for in advance (its result or failure is not wanted)."""
    if ahead is not None:
        ahead[1].addErrback(lambda _: None)
