"""The catalog database: one batched writer, readers on their own connections.

SQLite in WAL mode. All writes go through :meth:`Catalog.record`, which queues facts in
the reactor and commits them from a single writer thread in batches (group commit: a
burst of stores costs one transaction). Reads run in a small reader pool, one connection
per thread. Nothing here touches SQLite from the reactor thread. The schema, counters
and clean-stop mark are in ``schema``; the background integrity check in ``integrity``.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p.catalog import matching, names, schema, tombstones
from pacsp2p.catalog.integrity import Integrity
from pacsp2p.catalog.schema import SCHEMA_VERSION, create_schema  # noqa: F401 (re-exported)
from pacsp2p.attributes import LEVELS, PARENT, TABLES, UNIQUE, columns
from pacsp2p.types import InstanceMeta, InstanceRef, Location, Query, Stored

log = Logger()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash (kill -9)
    conn.execute("PRAGMA foreign_keys=OFF")
    names.register(conn)                      # pn_key(): the person-name index, matching
    return conn


def _upsert_sql(table: str, cols: list[str], pk: str) -> str:
    updates = ", ".join(f"{c} = CASE WHEN excluded.{c} != '' THEN excluded.{c} ELSE {c} END"
                        for c in cols if c != pk)
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT({pk}) DO UPDATE SET {updates}")


def _level_columns(level: str) -> list[str]:
    cols = columns(level)
    if level in PARENT and PARENT[level][1] not in cols:
        cols = cols + [PARENT[level][1]]
    if level == "IMAGE":
        cols = cols + ["TransferSyntaxUID"]
    return cols


_LEVEL_SQL = {level: (_level_columns(level), _upsert_sql(TABLES[level], _level_columns(level),
                                                           UNIQUE[level]))
              for level in LEVELS}
_LOCATION_SQL = (
    "INSERT INTO locations (SOPInstanceUID, archive, peer, sha256, size, available, seq) "
    "VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT(SOPInstanceUID, peer, archive) DO UPDATE SET "
    "sha256 = excluded.sha256, size = excluded.size, available = 1, seq = excluded.seq "
    "WHERE excluded.seq > locations.seq")

# Catalog facts on the wire (anti-entropy), a batch as one JSON list:
#   [{"PATIENT": {PatientID: [columns]}, "STUDY": {...}, "SERIES": {...}},
#    [seq, archive, peer, sha256, size, <instance columns>], ...]
# Patient, study and series rows come once per batch, not once per fact.
LOCATION_FIELDS = ["seq", "archive", "peer", "sha256", "size"]
PARENT_LEVELS = ("PATIENT", "STUDY", "SERIES")
FACT_FIELDS = LOCATION_FIELDS + _LEVEL_SQL["IMAGE"][0]
ATTRIBUTE_FIELDS = list(dict.fromkeys(c for level in LEVELS for c in _LEVEL_SQL[level][0]))


_HINT_SQL = ("INSERT OR IGNORE INTO hints (SOPInstanceUID, peer, archive, created, via_peer, "
             "via_archive) VALUES (?, ?, ?, datetime('now'), ?, ?)")


def write_facts(conn: sqlite3.Connection, facts: list[tuple[dict, tuple]],
                hints: list = (), parents: dict | None = None, after=None) -> None:
    """Write facts in one transaction.

    A fact is (attributes, location) where attributes maps keywords (all levels, incl.
    SOPInstanceUID, SOPClassUID, TransferSyntaxUID) to strings and location is
    (SOPInstanceUID, archive, peer, sha256, size, seq). Patient, study and series rows
    shared by several facts of the batch are written once. *hints* (rows of the hints
    table: uid, peer, archive, via_peer, via_archive) are written in the same
    transaction. *parents*, if given, remembers the patient, study and series rows this
    connection wrote last: a row written again unchanged is skipped (a stream of one
    series' instances writes its parents once); the caller clears it whenever anything
    else writes. *after(conn)*, if given, runs in the same transaction, last.
    """
    # one row per key and level: the last fact's attributes, in first-seen order (the
    # rows of a key are built once, not once per fact: most facts share their parents)
    latest: dict[str, dict] = {level: {} for level in LEVELS}
    keyed = [(latest[level], UNIQUE[level]) for level in LEVELS]
    for attrs, _ in facts:
        if attrs is None:                 # a tombstone: the location only
            continue
        for seen, key in keyed:
            seen[attrs.get(key, "")] = attrs
    levels = {level: [[a.get(c, "") or "" for c in _LEVEL_SQL[level][0]]
                      for a in latest[level].values()] for level in LEVELS}
    if parents is not None:
        for level in PARENT_LEVELS:
            last = parents.setdefault(level, {})
            levels[level] = [row for row in levels[level] if last.get(row[0]) != row]
    _write_levels(conn, levels, [loc for _, loc in facts if loc is not None], hints, after)
    if parents is not None:
        for level in PARENT_LEVELS:
            if len(parents[level]) > 10000:
                parents[level].clear()
            parents[level].update((row[0], row) for row in levels[level])


def _write_levels(conn: sqlite3.Connection, levels: dict[str, list], locations: list,
                  hints: list = (), after=None) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for level in LEVELS:
            conn.executemany(_LEVEL_SQL[level][1], levels[level])
        conn.executemany(_LOCATION_SQL, locations)
        if hints:
            conn.executemany(_HINT_SQL, hints)
        if after is not None:
            after(conn)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does by itself on
    SQLITE_FULL, SQLITE_IOERR, ...): the caller re-raises the error that caused it, not
    "cannot rollback - no transaction is active"."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            log.error("catalog: ROLLBACK failed too: {err}", err=e)


def check_wire(batch: list) -> int:
    """Validate a batch of facts from the wire; return its highest sequence number."""
    if not batch:
        return 0
    parents, facts = batch[0], batch[1:]
    if not isinstance(parents, dict):
        raise ValueError("a batch of facts starts with its patient/study/series rows")
    for level in PARENT_LEVELS:
        width = len(_LEVEL_SQL[level][0])
        for key, row in parents.get(level, {}).items():
            if not isinstance(row, list) or len(row) != width:
                raise ValueError(f"{level} row {key!r} is not {width} fields")
    n, top = len(FACT_FIELDS), 0
    for row in facts:
        if not isinstance(row, list) or len(row) != n:
            raise ValueError(f"fact has {len(row)} fields, expected {n}")
        int(row[4])
        top = max(top, int(row[0]))
    return top


def write_wire(conn: sqlite3.Connection, batch: list, peer: str = "") -> None:
    """Write a batch of facts from the wire in one transaction (see ``read_changes``),
    the tombstones among them kept and applied in it (``tombstones.received``; *peer*:
    this peer's name)."""
    if not batch:
        return
    parents, facts = batch[0], batch[1:]
    levels = {level: [[v or "" for v in row] for row in parents.get(level, {}).values()]
              for level in PARENT_LEVELS}
    n = len(LOCATION_FIELDS)
    cls = n + _LEVEL_SQL["IMAGE"][0].index("SOPClassUID")
    # a fact of a deleted instance travels without its attributes: no instance row
    levels["IMAGE"] = [[v or "" for v in row[n:]] for row in facts if row[cls]]
    sop = n + _LEVEL_SQL["IMAGE"][0].index("SOPInstanceUID")
    locations = [(row[sop], row[1], row[2], row[3], int(row[4]), int(row[0]))
                 for row in facts]
    _write_levels(conn, levels, locations, after=lambda c: tombstones.received(
        c, peer, locations, parents.get(tombstones.WIRE_KEY)))


def meta_attributes(meta: InstanceMeta) -> dict:
    attrs = dict(meta.attributes)
    attrs["SOPInstanceUID"] = meta.sop_instance_uid
    attrs["SOPClassUID"] = meta.sop_class_uid
    attrs["TransferSyntaxUID"] = meta.transfer_syntax_uid
    return attrs


def read_changes(conn: sqlite3.Connection, origin: str, after: int, limit: int) -> list:
    """The facts of *origin* with a sequence number above *after*, in order, as a wire
    batch: their patient/study/series rows first (once each), then one list per fact.
    Facts of deleted instances (tombstone markers among them) come without attributes;
    the markers' payloads ride beside the parent rows (``tombstones.WIRE_KEY``)."""
    icols = ", ".join(("l." if c == "SOPInstanceUID" else "i.") + c
                      for c in _LEVEL_SQL["IMAGE"][0])
    facts = [list(r) for r in conn.execute(
        f"SELECT l.seq, l.archive, l.peer, l.sha256, l.size, {icols} FROM locations l "
        "LEFT JOIN instances i ON i.SOPInstanceUID = l.SOPInstanceUID "
        "WHERE l.peer = ? AND l.seq > ? ORDER BY l.seq LIMIT ?", (origin, after, limit))]
    if not facts:
        return []
    parents: dict[str, dict] = {}
    n = len(LOCATION_FIELDS)
    keys = {r[n + _LEVEL_SQL["IMAGE"][0].index("SeriesInstanceUID")] for r in facts}
    for level in ("SERIES", "STUDY", "PATIENT"):
        cols = _LEVEL_SQL[level][0]
        rows = {}
        keys = list(keys)
        for k in range(0, len(keys), 500):
            chunk = keys[k:k + 500]
            for r in conn.execute(
                    f"SELECT {', '.join(cols)} FROM {TABLES[level]} WHERE {UNIQUE[level]} "
                    f"IN ({', '.join('?' * len(chunk))})", chunk):
                rows[r[cols.index(UNIQUE[level])]] = list(r)
        parents[level] = rows
        if level in PARENT:
            up = cols.index(PARENT[level][1])
            keys = {r[up] for r in rows.values()}
    sop = len(LOCATION_FIELDS) + _LEVEL_SQL["IMAGE"][0].index("SOPInstanceUID")
    markers = [r[sop] for r in facts if tombstones.is_marker(r[1], r[4])]
    if markers:
        parents[tombstones.WIRE_KEY] = tombstones.payloads(conn, origin, markers)
    return [parents] + facts


def facts_from_wire(batch: list) -> list[tuple[dict, tuple]]:
    """A wire batch as (attributes, location) facts for :func:`write_facts`."""
    check_wire(batch)
    if not batch:
        return []
    parents, out = batch[0], []
    n = len(LOCATION_FIELDS)
    named = {level: {k: dict(zip(_LEVEL_SQL[level][0], row)) for k, row in
                     parents.get(level, {}).items()} for level in PARENT_LEVELS}
    for row in batch[1:]:
        attrs = dict(zip(_LEVEL_SQL["IMAGE"][0], row[n:]))
        series = named["SERIES"].get(attrs.get("SeriesInstanceUID"), {})
        study = named["STUDY"].get(series.get("StudyInstanceUID"), {})
        patient = named["PATIENT"].get(study.get("PatientID"), {})
        merged = {**patient, **study, **series, **attrs}
        out.append((merged, (attrs["SOPInstanceUID"], row[1], row[2], row[3], int(row[4]),
                             int(row[0]))))
    return out


def vector(conn: sqlite3.Connection) -> dict[str, int]:
    return {peer: seq for peer, seq in
            conn.execute("SELECT peer, max(seq) FROM locations GROUP BY peer")}


class Catalog:
    """The peer's catalog. Use from the reactor thread; every method returns a Deferred.

    ``vector`` is kept in memory: {origin peer: highest fact sequence held}, the digest
    that anti-entropy compares.
    """

    def __init__(self, path: Path, reactor, peer: str = "", readers: int = 4):
        self.path = Path(path)
        self.reactor = reactor
        self.peer = peer
        self._writer_pool = ThreadPool(1, 1, "catalog-writer")
        self._reader_pool = ThreadPool(1, readers, "catalog-reader")
        self.integrity = Integrity(self.path, reactor, _connect)    # .state: /status
        self._local = threading.local()
        self._writer: sqlite3.Connection | None = None
        self._pending: list[tuple[object, defer.Deferred]] = []
        self._drained: list[defer.Deferred] = []    # stop() waiting for the last flush
        self._parents: dict = {}              # writer thread: see write_facts
        self._flushing = False
        self.vector: dict[str, int] = {}
        self._promised: dict[str, int] = {}     # facts of others queued by learn()
        self.listeners: list[Callable[[], None]] = []   # told after each commit

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> defer.Deferred:
        """Open (create, migrate) the catalog; its check comes later (``integrity``)."""
        self._writer_pool.start()
        self._reader_pool.start()
        d = self._in_writer(self._open_writer)

        def opened(result):
            self.vector.update(result[0])
            self.integrity.opened(clean=result[1])
        return d.addCallback(opened)

    def _open_writer(self) -> tuple[dict, bool]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = _connect(self.path)
            create_schema(self._writer, self.path)
            tombstones.create_schema(self._writer)
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
        d = drained.addCallback(lambda _: self._writer and self._in_writer(self._close))
        d.addErrback(lambda f: log.error("catalog {path}: not closed cleanly: {err}",
                                         path=str(self.path), err=f.getErrorMessage()))
        return d.addCallback(lambda _: (self._writer_pool.stop(), self._reader_pool.stop()))

    def _close(self) -> None:
        conn, self._writer = self._writer, None
        schema.close_clean(conn, self.integrity.known_good)

    # -- writing ---------------------------------------------------------------------
    def _in_writer(self, fn: Callable, *a) -> defer.Deferred:
        if fn != self._write_own:             # anything else may change parent rows
            inner = fn

            def fn(*args):
                self._parents.clear()
                return inner(*args)
        return deferToThreadPool(self.reactor, self._writer_pool, fn, *a)

    def record(self, meta: InstanceMeta, location: Location | None,
               hints=(), then=None) -> defer.Deferred:
        """Queue one local fact; the Deferred fires with its sequence number once it is
        committed. *hints* (peer, archive, via_peer, via_archive) for this instance are
        committed with it (``add_hints``); *then(conn, seq)*, if given, runs in the same
        transaction once the fact is written (a tombstone's payload: ``tombstones``)."""
        d = defer.Deferred()
        self._pending.append(((meta, location, tuple(hints), then), d))
        if not self._flushing:
            self._flush()
        return d

    def _write_own(self, batch) -> list:
        """Write this peer's facts; the sequence number given to each (None: no location)."""
        seq = self.vector.get(self.peer, 0)
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
        write_facts(self._writer, facts, hints, self._parents,
                    after=(lambda conn: [then(conn, q) for then, q in thens]) if thens
                    else None)
        if thens:                             # they may have removed parent rows
            self._parents.clear()
        return seqs

    def _committed(self, origin: str, seq: int) -> None:
        if seq > self.vector.get(origin, 0):
            self.vector[origin] = seq
        for listener in list(self.listeners):
            listener()

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = True
        d = self._in_writer(self._write_own, [f for f, _ in batch])

        def done(seqs):
            self._flushing = False
            self._committed(self.peer, max((q for q in seqs if q), default=0))
            for (_, waiter), seq in zip(batch, seqs):
                waiter.callback(seq)
            self._next()

        def failed(f):
            self._flushing = False
            if f.check(sqlite3.OperationalError, OSError):    # a full disk, ...: one line
                log.error("catalog write of {n} facts failed: {err}", n=len(batch),
                          err=f.getErrorMessage())
            else:
                log.failure("catalog write of {n} facts failed", f, n=len(batch))
            for _, waiter in batch:
                waiter.errback(f)
            self._next()

        d.addCallbacks(done, failed)

    def _next(self) -> None:
        """After a flush: the next batch, or tell stop() that everything is written."""
        if self._pending:
            self._flush()
        else:
            drained, self._drained = self._drained, []
            for waiter in drained:
                waiter.callback(None)

    def apply(self, origin: str, rows: list[list]) -> defer.Deferred:
        """Write facts of another peer (anti-entropy), in one transaction."""
        top = check_wire(rows)
        d = self._in_writer(write_wire, self._writer, rows, self.peer)
        d.addCallback(lambda _: self._committed(origin, top))
        return d

    def learn(self, origin: str, seq: int, meta: InstanceMeta, location: Location) -> bool:
        """Record a fact another peer just told us it wrote, if it is that origin's next
        one (so the version vector stays exact); False: leave it to anti-entropy."""
        if seq != max(self.vector.get(origin, 0), self._promised.get(origin, 0)) + 1:
            return False
        self._promised[origin] = seq
        attrs = meta_attributes(meta)
        parents = {level: {attrs.get(UNIQUE[level], ""): [attrs.get(c, "") or "" for c in
                                                          _LEVEL_SQL[level][0]]}
                   for level in PARENT_LEVELS}
        fact = [seq, location.archive, origin, location.sha256, location.size] + [
            attrs.get(c, "") or "" for c in _LEVEL_SQL["IMAGE"][0]]
        self.apply(origin, [parents, fact]).addErrback(
            lambda f: log.failure("recording a fact of {o} failed", f, o=origin))
        return True

    def changes(self, origin: str, after: int, limit: int) -> defer.Deferred:
        return self.read(lambda conn: read_changes(conn, origin, after, limit))

    def write(self, fn: Callable[[sqlite3.Connection], object]) -> defer.Deferred:
        """Run *fn(conn)* on the writer thread (bulk jobs like a rebuild)."""
        return self._in_writer(lambda: fn(self._writer))

    def tombstoned(self, uids: list[str]) -> defer.Deferred:
        """Deferred[set]: those of *uids* deleted from the cluster (``tombstones``)."""
        return self.read(lambda conn: tombstones.tombstoned(conn, list(uids)))

    def record_conflict(self, uid: str, archive: str, sha256: str) -> defer.Deferred:
        def insert(conn):
            conn.execute("INSERT OR IGNORE INTO conflicts VALUES (?, ?, ?, datetime('now'))",
                         (uid, archive, sha256))
        return self.write(insert)

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

    def resolve(self, query: Query) -> defer.Deferred:
        """The instances a C-MOVE/C-GET identifier names, each with its locations."""
        sql, params, _ = matching.build(query, [])
        sql = sql.replace("SELECT 1 FROM", "SELECT DISTINCT i.SOPInstanceUID FROM", 1)
        if query.level != "IMAGE":
            # widen the FROM clause down to instances
            sql = sql.replace(f"FROM {matching.from_clause(query.level)}",
                              f"FROM {matching.from_clause('IMAGE')}", 1)

        def run(conn):
            uids = [r[0] for r in conn.execute(sql, params)]
            return self._refs(conn, uids)
        return self.read(run)

    @staticmethod
    def _refs(conn, uids: list[str]) -> list[InstanceRef]:
        refs = []
        for i in range(0, len(uids), 500):
            chunk = uids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT i.SOPInstanceUID, i.SOPClassUID, i.TransferSyntaxUID, l.archive, "
                f"l.peer, l.sha256, l.size, l.available FROM instances i JOIN locations l "
                f"USING (SOPInstanceUID) WHERE i.SOPInstanceUID IN ({marks}) AND l.size >= 0 "
                f"ORDER BY i.rowid", chunk).fetchall()
            by_uid: dict[str, list] = {}
            for r in rows:
                by_uid.setdefault(r[0], [r[1], r[2], []])[2].append(
                    Location(r[0], r[3], r[4], r[5], r[6], bool(r[7])))
            for uid in chunk:
                if uid in by_uid:
                    sop_class, ts, locs = by_uid[uid]
                    refs.append(InstanceRef(uid, sop_class, ts, locs[0].size, tuple(locs)))
        return refs

    def held(self, peer: str, archive: str, uids: list[str]) -> defer.Deferred:
        """The subset of *uids* the catalog already places on *archive* of *peer*."""
        def run(conn):
            found = set()
            for i in range(0, len(uids), 500):
                chunk = uids[i:i + 500]
                found.update(r[0] for r in conn.execute(
                    f"SELECT SOPInstanceUID FROM locations WHERE peer = ? AND archive = ? "
                    f"AND size >= 0 AND SOPInstanceUID IN ({', '.join('?' * len(chunk))})",
                    [peer, archive, *chunk]))
            return found
        return self.read(run)

    def hierarchy(self, uid: str) -> defer.Deferred:
        """Where instance *uid* sits: (StudyInstanceUID, SeriesInstanceUID, SOPClassUID,
        TransferSyntaxUID ("" if unknown)), or None if the catalog does not know all of
        the first three. For adapters that must name the hierarchy to fetch it."""
        def run(conn):
            row = conn.execute(
                "SELECT se.StudyInstanceUID, i.SeriesInstanceUID, i.SOPClassUID, "
                "i.TransferSyntaxUID FROM instances i JOIN series se "
                "USING (SeriesInstanceUID) WHERE i.SOPInstanceUID = ?", (uid,)).fetchone()
            if not row or not all(row[:3]):
                return None
            return (row[0], row[1], row[2], row[3] or "")
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
        return self.write(lambda conn: conn.execute(
            "DELETE FROM hints WHERE SOPInstanceUID = ? AND peer = ? AND archive = ?",
            (uid, peer, archive)))

    def forget(self, uid: str, archive: str, sha256: str) -> defer.Deferred:
        """Record that this peer's archive no longer holds *uid*: a tombstone (the
        location fact re-issued with size -1), so anti-entropy spreads the removal."""
        return self.record(None, Location(uid, archive, self.peer, sha256, -1))

    def archive_counts(self) -> defer.Deferred:
        return self.read(lambda conn: {(p, a): n for p, a, n in conn.execute(
            "SELECT peer, archive, count(*) FROM locations WHERE size >= 0 "
            "GROUP BY peer, archive")})

    def digest(self) -> defer.Deferred:
        """sha256 over the whole content in a canonical order: equal iff catalogs agree."""
        def run(conn):
            import hashlib
            h = hashlib.sha256()
            for table, key in (("patients", "PatientID"), ("studies", "StudyInstanceUID"),
                               ("series", "SeriesInstanceUID"),
                               ("instances", "SOPInstanceUID"),
                               ("locations", "SOPInstanceUID, peer, archive")):
                cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")
                        if r[1] != "available"]
                for row in conn.execute(f"SELECT {', '.join(cols)} FROM {table} "
                                        f"ORDER BY {key}"):
                    h.update(repr(row).encode())
            return h.hexdigest()
        return self.read(run)

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
