"""The catalog database: one batched writer, readers on their own connections.

SQLite in WAL mode. All writes go through :meth:`Catalog.record`, which queues facts in
the reactor and commits them from a single writer thread in batches (group commit: a
burst of stores costs one transaction) — or, for the ingest's one-job path, through
``record_now``: the thread that received an instance commits its fact itself, on the
writer's connection under the writer's lock (no hand-over to the writer thread and back);
the facts of other peers that ``learn`` takes (a replicated write's remote copies) and
the hints ``drop_hint`` forgets wait up to ``LATER`` s to ride in the same writer job.
Reads run in a small reader pool, one connection per thread. Nothing here touches SQLite
from the reactor thread. The schema, counters and clean-stop mark are in ``schema``; the
background integrity check in ``integrity``; WAL checkpoints (off the writers' path) in
``checkpoints``.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p.catalog import matching, names, remembered, rows, schema, tombstones, versions
from pacsp2p.catalog.checkpoints import BACKSTOP, Checkpoints
from pacsp2p.catalog.facts import (_HINT_SQL, _LEVEL_SQL, LWW_LEVELS,  # noqa: F401
                                   PARENT_LEVELS, STAMPS_KEY, check_wire, facts_from_wire,
                                   grained, meta_attributes, stamp_of, read_changes,
                                   read_changes_of, renumber, rollback, vector, write_facts,
                                   write_origins, write_wire, write_wires)
from pacsp2p.catalog.integrity import Integrity, digest
from pacsp2p.catalog.schema import SCHEMA_VERSION, create_schema  # noqa: F401 (re-exported)
from pacsp2p.attributes import UNIQUE
from pacsp2p.types import InstanceMeta, InstanceRef, Location, Query, Stored

log = Logger()

LATER = 0.05        # seconds facts of others and hint drops may wait for our next batch
_CONFLICT_SQL = "INSERT OR IGNORE INTO conflicts VALUES (?, ?, ?, datetime('now'))"


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash (kill -9)
    conn.execute("PRAGMA foreign_keys=OFF")
    names.register(conn)                      # pn_key(): the person-name index, matching
    return conn


class Catalog:
    """The peer's catalog. Use from the reactor thread; every method returns a Deferred.
    ``vector`` is kept in memory: {origin peer: highest fact sequence held}, the digest
    that anti-entropy compares."""

    def __init__(self, path: Path, reactor, peer: str = "", readers: int = 4,
                 durable: bool = False):
        self.path, self.reactor, self.peer = Path(path), reactor, peer
        self.durable = durable     # each commit's WAL fsynced too: survives a power cut
        self._writer_pool = ThreadPool(1, 1, "catalog-writer")
        self._reader_pool = ThreadPool(1, readers, "catalog-reader")
        self.integrity = Integrity(self.path, reactor, _connect)    # .state: /status
        self.checkpoints = Checkpoints(self.path, reactor, _connect)
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._lock = threading.Lock()          # the writer's connection: one user at once
        self._own_seq = 0                      # our highest fact written (under _lock)
        self._own_real = 0                     # ... of those not skipped over (under _lock)
        self._gaps: dict[int, int] = {}        # our first fact after a skip -> the one before
        self._forgot = 0                       # below this, a skip may have been forgotten
        self.opened_at = 0                     # our highest fact when the file was opened
        self.numbers_from = None               # (opened_at) -> our facts numbered above
        self._pending: list[tuple[object, defer.Deferred]] = []
        self._drained: list[defer.Deferred] = []    # stop() waiting for the last flush
        self._parents: dict = {}              # writer thread: see write_facts
        self._flushing = False
        self._holding = 0                     # inside batch(): record() does not flush
        self.vector: dict[str, int] = {}
        self.facts = 0                        # facts committed since start (see reclaim)
        self._promised: dict[str, int] = {}     # facts of others queued by learn(),
        self._learned: list[tuple[str, int, list]] = []    # (origin, seq, rows): our next batch
        self._drops: list[tuple[tuple, defer.Deferred]] = []  # hints done
        self._soon = None                     # a flush of only those, at most LATER s on
        self._created = False                 # the file did not exist when opened
        self.rebuilt = False                  # made by catalog rebuild (overlay.reclaim)
        self.listeners: list[Callable[[], None]] = []   # told after each commit

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> defer.Deferred:
        """Open (create, migrate) the catalog; its check comes later (``integrity``)."""
        self._writer_pool.start()
        self._reader_pool.start()
        d = self._in_writer(self._open_writer)

        def opened(result):
            self.vector.update(result[0])
            self.opened_at = self._own_real = self.vector.get(self.peer, 0)
            if self.numbers_from is not None:
                self._own_seq = self.numbers_from(self.opened_at)
            self.integrity.opened(clean=result[1], new=self._created)
            self.checkpoints.start()
        return d.addCallback(opened)

    def _open_writer(self) -> tuple[dict, bool]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.path.exists()      # for the log line: a first start
        try:
            self._writer = _connect(self.path)
            self._writer.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP}")   # checkpoints
            if self.durable:        # [storage] sync_directories: the WAL fsynced at commit
                self._writer.execute("PRAGMA synchronous=FULL")
            create_schema(self._writer, self.path)
            tombstones.create_schema(self._writer)
            rows.reannounce(self._writer, self.peer, self.path)    # once, after upgrade
            self.rebuilt = bool(self.peer) and schema.take_rebuilt_mark(self._writer)
            return vector(self._writer), schema.take_clean_mark(self._writer)
        except sqlite3.DatabaseError as e:
            raise sqlite3.DatabaseError(f"catalog {self.path} cannot be opened ({e}); "
                                        "run 'pacsp2p catalog rebuild'") from e

    def stop(self) -> defer.Deferred:
        """Interrupt a running integrity check, finish the queued writes, close the writer
        (with the clean mark if the catalog is known good), stop the threads."""
        self.integrity.stop()
        drained = defer.Deferred()
        self._drained.append(drained)
        if not self._flushing:
            self._next()
        drained.addCallback(lambda _: self.checkpoints.stop())
        d = drained.addCallback(lambda _: self._writer and self._in_writer(self._close))
        d.addErrback(lambda f: log.error("catalog {path}: not closed cleanly: {err}",
                                         path=str(self.path), err=f.getErrorMessage()))
        return d.addCallback(lambda _: (self._writer_pool.stop(), self._reader_pool.stop()))

    def _close(self) -> None:
        conn, self._writer = self._writer, None
        schema.close_clean(conn, self.integrity.known_good)

    # -- writing ---------------------------------------------------------------------
    def _in_writer(self, fn: Callable, *a) -> defer.Deferred:
        batch = fn == self._write_batch       # anything else may change parent rows

        def locked(*args):
            with self._lock:
                if not batch:
                    self._parents.clear()
                return fn(*args)
        return deferToThreadPool(self.reactor, self._writer_pool, locked, *a)

    def record_now(self, meta: InstanceMeta, location: Location, hints=()) -> int:
        """Blocking, from a thread that is not the reactor (the ingest's one-job path):
        write one fact of ours now, in a transaction of its own on the writer's
        connection (under its lock, between the writer's batches), with *hints* as
        ``record``'s; its sequence number, which the reactor then passes to
        ``committed_now``. Raises sqlite3.Error."""
        with self._lock:
            if self._writer is None:
                raise sqlite3.OperationalError("the catalog is closed")
            return self._write_own([(meta, location, tuple(hints), None)])[0]

    def record_all_now(self, facts) -> list:
        """Blocking, as ``record_now``: several facts of ours [(meta, location, then)]
        in one transaction (a push port's ``COMMIT``: a group commit); their sequence
        numbers (*then(conn, seq)* as ``record``'s)."""
        with self._lock:
            if self._writer is None:
                raise sqlite3.OperationalError("the catalog is closed")
            return self._write_own([(meta, loc, (), then) for meta, loc, then in facts])

    def conflict_now(self, uid: str, archive: str, sha256: str) -> None:
        """Blocking, like ``record_now``: a conflicting version kept beside *uid*."""
        with self._lock:
            if self._writer is None:
                raise sqlite3.OperationalError("the catalog is closed")
            self._writer.execute(_CONFLICT_SQL, (uid, archive, sha256))

    def committed_now(self, seq: int | None, n: int = 1) -> None:
        """Reactor: *n* facts ``record_now`` or ``record_all_now`` wrote, the highest
        *seq*, are committed (the version vector, the listeners)."""
        if seq:
            self._committed(self.peer, seq, n)

    def record(self, meta: InstanceMeta, location: Location | None,
               hints=(), then=None) -> defer.Deferred:
        """Queue one local fact; the Deferred fires with its sequence number once it is
        committed. *hints* (peer, archive, via_peer, via_archive) for this instance are
        committed with it (``add_hints``); *then(conn, seq)*, if given, runs in the same
        transaction once the fact is written (a tombstone's payload: ``tombstones``)."""
        d = defer.Deferred()
        self._pending.append(((meta, location, tuple(hints), then), d))
        if not self._flushing and not self._holding:
            self._flush()
        return d

    @contextlib.contextmanager
    def batch(self):
        """Facts ``record``ed inside the block are written together, in one writer job
        (a group commit: ``Commits``), not the first alone and the others after it."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if not self._holding and self._pending and not self._flushing:
                self._flush()

    def _write_own(self, batch) -> list:
        """Write this peer's facts; the sequence number given to each (None: no location)."""
        seq = max(self._own_seq, self.vector.get(self.peer, 0))
        last = max(self._own_real, self.vector.get(self.peer, 0))
        facts, seqs, hints, thens = [], [], [], []
        for meta, loc, owed, then in batch:
            hints += [(loc.sop_instance_uid, *o) for o in owed] if loc is not None else []
            row = None
            if loc is not None:
                seq += 1
                row = (loc.sop_instance_uid, loc.archive, loc.peer, loc.sha256, loc.size, seq)
                if then is not None:
                    thens.append((then, seq))
            seqs.append(seq if loc is not None else None)
            facts.append((meta_attributes(meta) if meta is not None else None, row))
        changed: list = []                    # whether the thens changed rows
        write_facts(self._writer, facts, hints, self._parents,
                    after=remembered.run_thens(thens, changed) if thens else None)
        if seq > self._own_seq:
            first = next(q for q in seqs if q)
            if first - 1 != last:              # skipped over: remember what came before
                self._gaps[first] = last
                if len(self._gaps) > 64:       # a restart or reissue each: a few at most
                    self._forgot = min(self._gaps)
                    del self._gaps[self._forgot]
            self._own_seq = self._own_real = seq
        if any(changed):                      # they may have removed parent rows
            self._parents.clear()
        return seqs

    def previous(self, seq: int) -> int | None:
        """The number of our fact written just before our fact *seq* (a number skipped over
        between them held no fact of ours): told with a ``Commits`` answer, it lets the
        writer ``learn`` our first fact after a restart in order. None: not known."""
        return self._gaps.get(seq, None if seq <= self._forgot else seq - 1)

    def own_counter(self) -> int:
        """The highest number this peer has given one of its facts (or skipped to)."""
        return max(self._own_seq, self.vector.get(self.peer, 0))

    def reissue(self, after: int, upto: int | None, start: int) -> defer.Deferred:
        """Deferred[(n, last)]: our own facts numbered in (*after*, *upto*] given fresh
        numbers from *start* on (``facts.renumber``); our next fact is numbered above
        *start* - 1 and *last* (``overlay.reclaim``)."""
        def run():
            n, last = renumber(self._writer, self.peer, after, upto, start)
            self._own_seq = max(self._own_seq, last)
            self._own_real = max(self._own_real, last)
            return n, last

        def done(result):
            if result[0]:
                self._committed(self.peer, result[1], result[0])
            return result
        return self._in_writer(run).addCallback(done)

    def _committed(self, origin: str, seq: int, n: int = 1) -> None:
        self.facts += n
        self.checkpoints.committed()
        if seq > self.vector.get(origin, 0):
            self.vector[origin] = seq
        for listener in list(self.listeners):
            listener()

    def _write_batch(self, own: list, learned: list, drops: list):
        """Writer thread: our own facts (``_write_own``), then the facts of others that
        ``learn`` queued and the hints ``drop_hint`` queued: one thread job for all.
        Returns (sequence numbers of ours, [(origin, seq, error or None)], error of the
        hint drops or None)."""
        seqs = self._write_own(own) if own else []
        outcome = []
        by_origin: dict[str, list] = {}          # (one transaction for all)
        for origin, seq, batch in learned:
            merged, batches, _ = by_origin.setdefault(origin, [{}, [], 0])
            for level in PARENT_LEVELS:
                merged.setdefault(level, {}).update(batch[0].get(level, {}))
            batches.append(batch)          # each fact's rows with their own stamps
            by_origin[origin][2] = max(by_origin[origin][2], seq)
        results = write_origins(self._writer, [b for _, b, _ in by_origin.values()], self.peer)
        for (origin, (parents, _, seq)), (retired, error) in zip(by_origin.items(), results):
            if error is None:
                remembered.keep_where_same(self._parents, self._writer, parents, retired)
            else:
                self._parents.clear()
            outcome.append((origin, seq, error))
        dropped = None
        if drops:
            try:
                self._writer.executemany("DELETE FROM hints WHERE SOPInstanceUID = ? AND "
                                         "peer = ? AND archive = ?", drops)
            except (sqlite3.Error, OSError) as e:
                dropped = e
        return seqs, outcome, dropped

    def _later(self) -> None:
        """Facts of others and hint drops wait for our next batch, LATER s at most: a
        stream of C-STOREs then costs one writer job per instance, not three."""
        if self._soon is None and not self._flushing:
            call_later = getattr(self.reactor, "callLater", None)
            if call_later is None:               # a reactor that cannot wait: now
                self._flush()
            else:
                self._soon = call_later(LATER, self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = None
        if not self._flushing and (self._pending or self._learned or self._drops):
            self._flush()

    def _flush(self) -> None:
        if self._soon is not None:
            if self._soon.active():
                self._soon.cancel()
            self._soon = None
        batch, self._pending = self._pending, []
        learned, self._learned = self._learned, []
        drops, self._drops = self._drops, []
        self._flushing = True
        d = self._in_writer(self._write_batch, [f for f, _ in batch], learned,
                            [key for key, _ in drops])

        def done(result):
            seqs, outcome, dropped = result
            self._flushing = False
            if batch:
                self._committed(self.peer, max((q for q in seqs if q), default=0),
                                sum(1 for q in seqs if q))
            for origin, seq, err in outcome:
                if err is None:
                    self._committed(origin, seq, sum(1 for o, _, _ in learned if o == origin))
                else:
                    log.error("recording a fact of {o} failed: {err}", o=origin, err=err)
            for (_, waiter), seq in zip(batch, seqs):
                waiter.callback(seq)
            for _, waiter in drops:
                waiter.callback(None) if dropped is None else waiter.errback(dropped)
            self._next()

        def failed(f):
            self._flushing = False
            if f.check(sqlite3.OperationalError, OSError):    # a full disk, ...: one line
                log.error("catalog write of {n} facts failed: {err}", n=len(batch),
                          err=f.getErrorMessage())
            else:
                log.failure("catalog write of {n} facts failed", f, n=len(batch))
            for _, waiter in batch + drops:
                waiter.errback(f)
            self._next()

        d.addCallbacks(done, failed)

    def _next(self) -> None:
        """After a flush: the next batch, or tell stop() that everything is written."""
        if self._pending or (self._drained and (self._learned or self._drops)):
            self._flush()
        elif self._learned or self._drops:
            self._later()
        else:
            drained, self._drained = self._drained, []
            for waiter in drained:
                waiter.callback(None)

    def apply(self, origin: str, rows: list[list]) -> defer.Deferred:
        """Write facts of another peer (anti-entropy), in one transaction."""
        return self.apply_all([(origin, rows)])

    def apply_all(self, parts: list) -> defer.Deferred:
        """Write the facts of several origins [(origin, rows)] (one pull's answer) in
        one transaction, checked (``check_wire``) in the writer thread, not the reactor."""
        def job():
            tops = [(origin, check_wire(rows), len(rows) - 1) for origin, rows in parts if rows]
            write_wires(self._writer, [rows for _, rows in parts], self.peer)
            return tops

        def committed(tops):
            for origin, top, n in tops:
                self._committed(origin, top, n)
        return self._in_writer(job).addCallback(committed)

    def learn(self, origin: str, seq: int, meta: InstanceMeta, location: Location,
              prev: int | None = None) -> bool:
        """Record a fact another peer just told us it wrote, if it is that origin's next
        one — numbered next, or *prev* (its fact before, ``previous``) the last we hold —
        so the version vector stays exact; False: leave it to anti-entropy."""
        known = max(self.vector.get(origin, 0), self._promised.get(origin, 0))
        if seq != known + 1 and not (prev == known < seq):
            return False
        self._promised[origin] = seq
        attrs = meta_attributes(meta)
        parents = {level: {attrs.get(UNIQUE[level], ""): [attrs.get(c, "") or "" for c in
                                                          _LEVEL_SQL[level][0]]}
                   for level in PARENT_LEVELS}
        stamp = stamp_of(attrs)  # the stamps the origin wrote them with: the same rows
        if stamp:
            parents[STAMPS_KEY] = {level: {attrs.get(UNIQUE[level], ""): stamp if
                                           level == "IMAGE" else grained(stamp)}
                                   for level in LWW_LEVELS}
        parents[versions.WIRE_KEY] = {str(seq): stamp} if stamp else {}
        fact = [seq, location.archive, origin, location.sha256, location.size] + [
            attrs.get(c, "") or "" for c in _LEVEL_SQL["IMAGE"][0]]
        self._learned.append((origin, seq, [parents, fact]))    # with our next batch
        self._later()
        return True

    def changes(self, origin: str, after: int, limit: int, shape=list) -> defer.Deferred:
        """``shape`` of *origin*'s facts above *after* (<= *limit*), in a reader thread."""
        return self.read(lambda conn: shape(read_changes(conn, origin, after, limit)))

    def changes_of(self, wanted: list, limit: int, shape=None) -> defer.Deferred:
        """[(origin, rows)]: the facts above each (origin, after) of *wanted*, at most
        *limit* in all, in one reader job; or ``shape(read, limit)`` made in it, where
        ``read(n)`` reads them at most *n* in all (``sync.serve``)."""
        def job(conn):
            read = functools.partial(read_changes_of, conn, wanted)
            return shape(read, limit) if shape else read(limit)
        return self.read(job)

    def write(self, fn: Callable[[sqlite3.Connection], object]) -> defer.Deferred:
        """Run *fn(conn)* on the writer thread (bulk jobs like a rebuild)."""
        return self._in_writer(lambda: fn(self._writer))

    def tombstoned(self, uids: list[str]) -> defer.Deferred:
        """Deferred[set]: those of *uids* deleted from the cluster (``tombstones``)."""
        return self.read(lambda conn: tombstones.tombstoned(conn, list(uids)))

    def record_conflict(self, uid: str, archive: str, sha256: str) -> defer.Deferred:
        """Deferred[None]: a conflicting version kept beside *uid* (no fact: no number;
        not the cursor, which a holder's commit answered as the copy's number)."""
        return self.write(lambda conn: conn.execute(_CONFLICT_SQL, (uid, archive, sha256))
                          and None)

    # -- reading ---------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            conn.execute("PRAGMA query_only=1")
        return conn

    def read(self, fn: Callable[[sqlite3.Connection], object]) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self._reader_pool,
                                 lambda: fn(self._reader()))

    def find(self, query: Query, return_keys: list[str], limit: int | None = None,
             offset: int = 0) -> defer.Deferred:
        """Matches of a C-FIND identifier: a list of {keyword: value} dicts; with *limit*,
        at most that many from *offset* in a stable order (studies newest first)."""
        sql, params, selected = matching.build(query, return_keys)
        if limit is not None:
            sql += f" ORDER BY {PAGE_ORDER[query.level]} LIMIT ? OFFSET ?"
            params = [*params, max(0, int(limit)), max(0, int(offset))]

        def run(conn):
            rows = conn.execute(sql, params).fetchall()
            return [dict(zip(selected, ("" if v is None else str(v) for v in row)))
                    for row in rows]
        return self.read(run)

    def resolve(self, query: Query, limit: int | None = None, current: bool = False):
        """The instances a C-MOVE/C-GET identifier names, each with its locations (at
        most *limit*: ``TooMany`` if more match, ``matching.first_column``); *current*:
        only the copies of the version the catalog describes (``versions``: retrieval)."""
        sql, params, _ = matching.build(query, [])
        sql = sql.replace("SELECT 1 FROM", "SELECT DISTINCT i.SOPInstanceUID FROM", 1)
        if query.level != "IMAGE":
            # widen the FROM clause down to instances
            sql = sql.replace(f"FROM {matching.from_clause(query.level)}",
                              f"FROM {matching.from_clause('IMAGE')}", 1)

        def run(conn):
            return self.refs_of(conn, matching.first_column(conn, sql, params, limit),
                                current)
        return self.read(run)

    def versions(self, uids: list[str]) -> defer.Deferred:
        """Deferred[{uid: the current version's copies' hashes}] of those held in several."""
        return self.read(lambda conn: versions.current_copies(conn, list(uids)))

    @staticmethod
    def refs_of(conn, uids: list[str], current: bool = False) -> list[InstanceRef]:
        other = f" AND NOT {versions.OTHER}" if current else ""
        refs = []
        for i in range(0, len(uids), 500):
            chunk = uids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT i.SOPInstanceUID, i.SOPClassUID, i.TransferSyntaxUID, l.archive, "
                f"l.peer, l.sha256, l.size, l.available FROM instances i JOIN locations l "
                f"USING (SOPInstanceUID) WHERE i.SOPInstanceUID IN ({marks}) AND l.size >= 0"
                f"{other} ORDER BY i.rowid", chunk).fetchall()
            by_uid: dict[str, list] = {}
            for r in rows:
                by_uid.setdefault(r[0], [r[1], r[2], []])[2].append(
                    Location(r[0], r[3], r[4], r[5], r[6], bool(r[7])))
            for uid in chunk:
                if uid in by_uid:
                    sop_class, ts, locs = by_uid[uid]
                    refs.append(InstanceRef(uid, sop_class, ts, locs[0].size, tuple(locs)))
        return refs

    def held(self, peer: str, archive: str, uids: list[str], now: bool = False):
        """The subset of *uids* the catalog already places on *archive* of *peer* (a
        Deferred; with *now*, the set, read in the calling thread, a pool's, never the
        reactor's, on a read-only connection of its own: the bulk channel's read port)."""
        def run(conn):
            found = set()
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                found.update(r[0] for r in conn.execute(
                    f"SELECT SOPInstanceUID FROM locations WHERE peer = ? AND archive = ? "
                    f"AND size >= 0 AND SOPInstanceUID IN ({', '.join('?' * len(chunk))})",
                    [peer, archive, *chunk]))
            return found
        return run(self._reader()) if now else self.read(run)

    def hierarchy(self, uid: str) -> defer.Deferred:
        """Where instance *uid* sits: (StudyInstanceUID, SeriesInstanceUID, SOPClassUID,
        TransferSyntaxUID ("" if unknown)), or None if the catalog does not know all of
        the first three. For adapters that must name the hierarchy to fetch it."""
        def run(conn):
            row = conn.execute(
                "SELECT se.StudyInstanceUID, i.SeriesInstanceUID, i.SOPClassUID, "
                "i.TransferSyntaxUID FROM instances i JOIN series se "
                "USING (SeriesInstanceUID) WHERE i.SOPInstanceUID = ?", (uid,)).fetchone()
            return (row[0], row[1], row[2], row[3] or "") if row and all(row[:3]) else None
        return self.read(run)

    def crawl_state(self, archive: str) -> defer.Deferred:
        """(cursor, done, finished, since) of an archive's crawl; (None, 0, False, None)."""
        def run(conn):
            r = conn.execute("SELECT cursor, done, finished, since FROM crawl_state "
                             "WHERE archive = ?", (archive,)).fetchone()
            return (r[0], r[1], bool(r[2]), r[3]) if r else (None, 0, False, None)
        return self.read(run)

    def save_crawl_state(self, archive, cursor, done, finished, since) -> defer.Deferred:
        return self.write(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO crawl_state VALUES (?, ?, ?, ?, ?)",
            (archive, cursor, done, int(finished), since)))

    def add_hints(self, uid: str, owed) -> defer.Deferred:
        """Remember copies owed: (peer, archive, via_peer, via_archive) each; peer "*" is
        a copy owed to any archive; via is the stand-in holding it meanwhile, if any."""
        return self.write(lambda conn: conn.executemany(_HINT_SQL,
                                                        [(uid, *o) for o in owed]))

    def hints(self, limit: int = 200) -> defer.Deferred:
        return self.read(lambda conn: conn.execute(
            "SELECT SOPInstanceUID, peer, archive, via_peer, via_archive FROM hints "
            "ORDER BY created LIMIT ?", (limit,)).fetchall())

    def drop_hint(self, uid: str, peer: str, archive: str) -> defer.Deferred:
        """Forget a hint (the copy it owed is made): with the next batch of facts."""
        d = defer.Deferred()
        self._drops.append(((uid, peer, archive), d))
        self._later()
        return d

    def forget(self, uid: str, archive: str, sha256: str) -> defer.Deferred:
        """Record that this peer's archive no longer holds *uid*: a tombstone (the
        location fact re-issued with size -1), so anti-entropy spreads the removal."""
        return self.record(None, Location(uid, archive, self.peer, sha256, -1))

    def archive_counts(self) -> defer.Deferred:
        """{(peer, archive): live copies}, as the schema's triggers keep them (a
        ``GROUP BY`` over the locations took ~7 s at 10M copies)."""
        return self.read(schema.read_archive_counts)

    def digest(self) -> defer.Deferred:
        """sha256 over the whole content in a canonical order: equal iff catalogs agree."""
        return self.read(digest)

    def counts(self) -> defer.Deferred:
        """Rows per table (locations: live copies), as the schema's triggers keep them:
        a few rows read, whatever the catalog's size (it counted 10M rows: 3 s)."""
        return self.read(schema.read_counts)


# the order of a page of find(limit=): newest studies first, else by the unique key
PAGE_ORDER = {"PATIENT": "p.PatientName, p.PatientID",
              "STUDY": "st.StudyDate DESC, st.StudyTime DESC, st.StudyInstanceUID",
              "SERIES": "CAST(se.SeriesNumber AS INTEGER), se.SeriesInstanceUID",
              "IMAGE": "CAST(i.InstanceNumber AS INTEGER), i.SOPInstanceUID"}


def stored_location(meta: InstanceMeta, stored: Stored, peer: str) -> Location:
    """The location fact of an instance an archive of *peer* has just stored."""
    return Location(meta.sop_instance_uid, stored.archive, peer, stored.sha256, stored.size)
