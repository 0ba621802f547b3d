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

import json

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
        start = after = self.catalog.vector.get(origin, 0)
        # Pipelined: while batch k is written (writer thread), batch k+1 is decoded here
        # and batch k+2 is already asked for -- its start is read from the end of k+1's
        # body before decoding it (a hint, checked once decoded). At most three batches
        # are held at a time; each is still applied in order, in one transaction.
        ahead = None            # (after, Deferred[body]): a batch asked for in advance
        writing = None          # (Deferred, number of facts): the batch being written
        try:
            while after < target:
                if ahead is not None and ahead[0] == after:
                    body = yield ahead[1]
                else:
                    _drop(ahead)
                    body = yield self.bulk.changes_body(member, origin, after, self.batch)
                ahead = None
                hint = _last_seq(body)
                if hint is not None and after < hint < target:
                    ahead = (hint, self.bulk.changes_body(member, origin, hint, self.batch))
                rows = json.loads(body)
                del body
                if writing is not None:
                    (written, n), writing = writing, None
                    yield written
                    self.pulled += n
                if not rows:
                    break
                writing = (self.catalog.apply(origin, rows), len(rows) - 1)  # validates
                after = max(after, max(int(r[0]) for r in rows[1:]),
                            self.catalog.vector.get(origin, 0))
            if writing is not None:
                (written, n), writing = writing, None
                yield written
                self.pulled += n
        except Exception as e:
            if writing is not None:        # let the batch being written finish first
                (written, n), writing = writing, None
                try:
                    yield written
                    self.pulled += n
                except Exception:
                    pass
            log.warn("sync of {origin} from {peer} stopped: {err}", origin=origin,
                     peer=member.name, err=e)
            return
        finally:
            _drop(ahead)
        got = self.catalog.vector.get(origin, 0)
        if got > start:
            log.info("synced facts of {origin} from {peer}: sequence {a} -> {b}",
                     origin=origin, peer=member.name, a=start, b=got)


def _last_seq(body: bytes) -> int | None:
    """The sequence number of the last fact in a ``/changes`` body, found without
    decoding it (``[[seq,...],...,[seq,...]]``); None if not found. Only a hint."""
    i = body.rfind(b"],[")
    i = i + 3 if i >= 0 else (2 if body.startswith(b"[[") else -1)
    j = body.find(b",", i)
    if i < 0 or j < 0 or j - i > 20:
        return None
    try:
        return int(body[i:j])
    except ValueError:
        return None


def _drop(ahead) -> None:
    """Abandon a batch asked for in advance (its result or failure is not wanted)."""
    if ahead is not None:
        ahead[1].addErrback(lambda _: None)
