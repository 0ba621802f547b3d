"""Catalog sync: batched pulls of per-origin logs with version vectors.

Every location fact is owned by one origin (the peer whose archive holds the replica),
which numbers its facts 1, 2, 3, ... A fact that changes is re-issued with a new number,
so each origin's facts form an append-only log compacted to the latest fact per key.
Each peer holds a version vector {origin: highest number held} (Parker et al., 1983).
*When* and *from whom* a peer pulls is decided by ``dissemination.py`` (epidemic
push-pull over the membership protocol's traffic: Demers et al., "Epidemic algorithms for
replicated database maintenance", PODC 1987); this module does the pulling.

One pull asks ONE neighbour for everything it holds that we lack, every origin at once
(issue 19.5): ``POST /changes`` on its bulk channel with our whole vector; the answer is
its vector and, origin after origin, the facts above ours, at most ``batch`` facts in
all. The answer is decoded and checked in a thread (``catalog-sync``: up to 64 MB of
JSON, never on the reactor); while more is due the next request goes out before this
batch is written, in one transaction, every origin of it together (a pull costs the same whether its facts come from 1 origin or 30) — so memory
is bounded by two batches, a pull cut by a crash or a partition resumes where it
stopped, and a peer that joins late or returns catches up without ever holding more
than that.

An origin numbers its own facts, so no other peer can hold more of them than it does
— unless this catalog lost facts it issued (restored from an older backup, a data
directory replaced). ``reclaim.py`` mends that; for it a pull can ask for the facts of
our own origin in a range instead (``own``: a pull-back), which ``serve`` answers alike.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pacsp2p import threads

from pacsp2p.overlay.dissemination import check_vector
from pacsp2p.overlay.swimparts import Invalid

log = Logger()

BATCH = 5000
MAX_PULL_BODY = 4 << 20       # bytes of a pull request (a vector of ~100,000 origins)
ANSWER_BUDGET = 32 << 20      # bytes of an answer we send (an asker reads at most 64 MB,
                              # ``fetching.MAX_ANSWER``): fewer facts if they are longer


def encode_answer(vector: dict, parts) -> bytes:
    """The body of a ``/changes`` answer: a line with our vector, then for each origin
    a line with its name and a line with its facts (``read_changes``)."""
    lines = [json.dumps({"vector": vector}, separators=(",", ":")).encode()]
    for origin, rows in parts:
        lines.append(json.dumps(origin).encode())
        lines.append(json.dumps(rows, separators=(",", ":")).encode())
    return b"\n".join(lines)


def decode_answer(body: bytes) -> tuple[dict, list]:
    """(their vector, [(origin, facts' bytes)]) of a ``/changes`` answer."""
    lines = body.split(b"\n")
    if not lines or len(lines) % 2 != 1:
        raise Invalid("bad /changes answer")
    head = json.loads(lines[0])
    if not isinstance(head, dict):
        raise Invalid("bad /changes answer")
    vector = check_vector(head.get("vector"))
    parts = []
    for i in range(1, len(lines), 2):
        origin = json.loads(lines[i])
        if not isinstance(origin, str):
            raise Invalid("bad origin")
        parts.append((origin, lines[i + 1]))
    return vector, parts


def checked_rows(origin: str, rows) -> tuple[list, int]:
    """*rows* (a wire batch) if every fact in it is *origin*'s; and its top sequence."""
    if not isinstance(rows, list) or not rows:
        raise Invalid("empty batch")
    top = 0
    for row in rows[1:]:
        if not isinstance(row, list) or len(row) < 3 or row[2] != origin:
            raise Invalid(f"a fact in {origin}'s batch is not of {origin}")
        top = max(top, int(row[0]))
    return rows, top


def serve(catalog, theirs: dict, asker: str | None, limit: int, own: int = 0):
    """Deferred[bytes]: our answer to a pull by *asker* whose vector is *theirs*: our
    vector, then the facts of every origin but the asker's own above theirs, origin by
    origin, at most *limit* facts in all — or, if *own* (a pull-back of what its
    restored catalog lost, ``reclaim``), those of the asker's own origin only, up to
    number *own*. Read and encoded in one catalog reader job: an answer of 5,000 facts
    is tens of ms of JSON, never the reactor's. An answer longer than ``ANSWER_BUDGET``
    bytes is made again of fewer facts (values up to ``validate.VALUE_MAX`` characters
    make a fact up to ~35 KB, 5,000 of them 170 MB: past the asker's bound, every pull
    failed and sync from here stopped); the asker asks again for the rest."""
    mine = dict(catalog.vector)
    if own:
        after = theirs.get(asker, 0)
        wanted = [(asker, after, own)] if asker and mine.get(asker, 0) > after else []
    else:
        wanted = [(o, theirs.get(o, 0)) for o in sorted(mine)
                  if o != asker and mine[o] > theirs.get(o, 0)]
    if not wanted:
        return defer.succeed(encode_answer(mine, []))
    return catalog.changes_of(wanted, limit, lambda read, n: _budgeted(mine, read, n))


def _budgeted(mine: dict, read, limit: int) -> bytes:
    """The answer of ``serve`` (in a reader thread): ``read(n)`` gives the parts."""
    parts = read(limit)
    body = encode_answer(mine, parts)
    n = sum(len(rows) - 1 for _, rows in parts)
    while len(body) > ANSWER_BUDGET and n > 1:
        limit = max(1, min(n - 1, int(n * ANSWER_BUDGET / len(body) * 0.9)))
        parts = read(limit)
        body = encode_answer(mine, parts)
        n = sum(len(rows) - 1 for _, rows in parts)
    return body


def behind(mine: dict, theirs: dict, me: str, own: int = 0) -> bool:
    """True if *theirs* holds facts *mine* lacks: of every origin but *me* — or, in a
    pull-back (*own*), of *me* up to *own*."""
    if own:
        return min(own, theirs.get(me, 0)) > mine.get(me, 0)
    return any(s > mine.get(o, 0) for o, s in theirs.items() if o != me)


class AntiEntropy:
    def __init__(self, catalog, bulk, batch: int = BATCH):
        self.catalog = catalog
        self.bulk = bulk
        self.batch = batch
        self.pulled = 0                 # facts applied
        self.requests = 0               # /changes requests made
        self.own_got = 0                # the last pull-back: the top of our own facts
                                        # it brought, of those numbered up to its *upto*

    def _off(self, fn, *args):
        """Deferred: *fn(*args)* in the ``catalog-sync`` thread (a pull's answer, up to
        64 MB of JSON, decoded and checked off the reactor); at once with a catalog
        that has no reactor (the unit tests' synchronous one)."""
        reactor = getattr(self.catalog, "reactor", None)
        if reactor is None:
            return defer.maybeDeferred(fn, *args)
        return deferToThreadPool(reactor, threads.pool(reactor, "catalog-sync", 1, 1),
                                 fn, *args)

    def _ask(self, member, vector, own=0):
        self.requests += 1
        return self.bulk.pull_body(member, vector, self.batch, own=own)

    @defer.inlineCallbacks
    def pull(self, member, own: tuple[int, int] | None = None):
        """Deferred[member's vector]: every fact *member* holds that we lack, applied;
        with *own* (after, upto), our own facts numbered in that range instead (a
        pull-back: ``own_got`` is then the highest of them it brought, 0 if none)."""
        me = self.catalog.peer
        start = dict(self.catalog.vector)
        sent = dict(start)
        pulled, upto, got_own = self.pulled, 0, 0
        if own is not None:
            sent[me], upto = own
        pending = self._ask(member, sent, upto)
        writing = None
        their = None
        try:
            while pending is not None:
                body = yield pending
                pending = None
                their, batch, tops, got = yield self._off(_decoded, body, sent, me, upto)
                del body
                if tops is None:
                    break
                got_own = max(got_own, got)
                if behind(tops, their, me, upto):      # the next batch, while this is written
                    pending = self._ask(member, tops, upto)
                if writing is not None:
                    w, writing = writing, None
                    yield w
                writing = self._apply(batch)
                sent = tops
            if writing is not None:
                w, writing = writing, None
                yield w
        except Exception as e:
            if writing is not None:        # let the batch being written finish first
                try:
                    yield writing
                except Exception:
                    pass
            _drop(pending)
            log.warn("sync from {peer} stopped: {err}", peer=member.name, err=e)
            raise
        if own is not None:
            self.own_got = got_own
        got = self.catalog.vector
        grown = sorted(o for o in got if got[o] > start.get(o, 0))
        if grown:      # one line a pull, not one an origin (up to 32 a pull at 32 peers)
            log.info("synced {n} facts from {peer}: {seqs}", peer=member.name,
                     n=self.pulled - pulled,
                     seqs=", ".join(f"{o} {start.get(o, 0)} -> {got[o]}" for o in grown))
        return their

    def _apply(self, batch):
        """Deferred: every origin's facts of one answer written, in one transaction."""
        d = defer.maybeDeferred(self.catalog.apply_all, batch)
        return d.addCallback(self._count, sum(len(rows) - 1 for _, rows in batch))

    def _count(self, result, n):
        self.pulled += n
        return result


def _decoded(body: bytes, sent: dict, me: str, upto: int):
    """(their vector, batch [(origin, rows)], tops, the top of our own facts in it) of a
    ``/changes`` answer, decoded and checked (``checked_rows``; in a thread): tops is
    *sent* raised by the batch's facts, None if the answer holds none."""
    their, parts = decode_answer(body)
    if not parts:
        return their, [], None, 0
    batch, tops, got = [], dict(sent), 0
    for origin, raw in parts:
        rows, top = checked_rows(origin, json.loads(raw))
        if origin == me:     # a pull-back: ours above upto are not the gap's
            rows = rows[:1] + [r for r in rows[1:] if int(r[0]) <= upto]
            got = max([got] + [int(r[0]) for r in rows[1:]])
        if origin != me or len(rows) > 1:
            batch.append((origin, rows))
        tops[origin] = max(tops.get(origin, 0), top)
    return their, batch, tops, got


def _drop(pending) -> None:
    """Abandon a batch asked for in advance (its result or failure is not wanted)."""
    if pending is not None:
        pending.addErrback(lambda _: None)
