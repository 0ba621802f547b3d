"""Facts: how the catalog's rows are written and read as facts (an instance's
attributes and one location, with its origin's sequence number) — by this peer's writer
(``write_facts``), from another peer's batch (``write_wire``, checked by
``check_wire``), and as a batch for another peer (``read_changes``). Runs in the writer
or a reader thread, on the connection given; never in the reactor.

A patient, study or series row (and an instance row, schema 6) is a last-writer-wins
register (the LWW-register of a state-based CRDT: Shapiro, Preguica, Baquero & Zawirski,
"Conflict-free replicated data types", SSS 2011): each row keeps the ``stamp`` of the
instance whose attributes it holds — the time in ms the accepting peer received it, made
strictly increasing per peer (``Stamps``: the physical half of a hybrid logical clock,
Kulkarni et al. 2014) and carried in the instance's attributes (``STAMP``) to every peer
that records it. A row takes an instance's attributes (all of them, empty ones too) only
if (stamp, values) is greater than its own, so every replica keeps the same winner
whatever the order the facts arrive in (equal stamps: the greater values). A row without
a stamp (0: written before schema 5, by a peer of an older release, by a crawl, rebuild
or repair, which receive nothing new) loses to any stamped one. A sync batch carries
each row's stamp beside the rows (``STAMPS_KEY``): a peer of an older release ignores
it. A stamp received more than ``MAX_AHEAD`` ahead of this peer's clock is taken as
clock + ``MAX_AHEAD`` (else a hostile 2^53-1 or a clock set years ahead wins for ever),
and stamps learned raise this peer's next ones (the HLC receive rule,
``Stamps.observe``). A patient, study or series row takes an instance's stamp cut
to ``STAMP_GRAIN`` ms (``grained``), on every path (our writer, ``Catalog.learn``): this
peer's writer then raises the stamp of a parent row that already holds an instance's
values (its own last write, remembered) only once per grain, so a stream's instances
cost their parents no statement (the raise was 3 of a lone instance's 18 statements
and 3 of its 13 WAL pages), and every peer that has the same facts holds the same
rows (a raise skipped on a stamp of its own would leave the holder below a writer
that learned the fact, a version between them winning at one only); two versions in
one grain: the greater values win, as equal stamps do. A row left without children is
retired with its stamp, not forgotten, and a batch carries the rows of its deleted
instances beside the others (``rows``). An instance row shows its current version's.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time

from twisted.logger import Logger

from pacsp2p.attributes import LEVELS, PARENT, TABLES, UNIQUE
from pacsp2p.catalog import rows as parent_rows
from pacsp2p.catalog import shown, tombstones, versions
from pacsp2p.catalog.rows import level_columns as _level_columns
from pacsp2p.types import InstanceMeta
from pacsp2p.validate import VALUE_MAX, clipped

log = Logger()


def _upsert_sql(table: str, cols: list[str], pk: str) -> str:
    updates = ", ".join(f"{c} = CASE WHEN excluded.{c} != '' THEN excluded.{c} ELSE {c} END"
                        for c in cols if c != pk)
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT({pk}) DO UPDATE SET {updates}")


_LEVEL_SQL = {level: (_level_columns(level), _upsert_sql(TABLES[level], _level_columns(level),
                                                           UNIQUE[level]))
              for level in LEVELS}

STAMP = "stamp"             # an instance's attribute (its receipt), a parent row's column
STAMPS_KEY = "STAMPS"       # beside a wire batch's parent rows: {level: {key: stamp}}
MAX_STAMP = 2 ** 53
MAX_AHEAD = 600_000         # ms a stamp may be ahead of this peer's clock (HLC's epsilon)
REMEMBERED = 10000          # parent rows (and their stamps) the writer remembers per level
STAMP_GRAIN = 100           # ms a parent row's stamp is cut to (``grained``): its stamp
#                             raised by our writer once a grain (a stream: 1 in ~15-50)


def grained(stamp: int) -> int:
    """A parent row's stamp for an instance's *stamp*: cut to ``STAMP_GRAIN`` ms (one
    below it kept: not taken for the stamp-less 0)."""
    return stamp - stamp % STAMP_GRAIN if stamp >= STAMP_GRAIN else stamp


def stamp_of(attrs) -> int:
    """The stamp an instance's attributes carry; 0 if none or not a sane one. One ahead
    of this peer's clock by more than ``MAX_AHEAD`` (a hostile peer's 2^53-1, a clock set
    years ahead) is taken as clock + ``MAX_AHEAD``: it would win over every later version
    for ever otherwise; bounded, a version received after that wins again."""
    s = attrs.get(STAMP, 0) if attrs else 0
    if type(s) is not int or not 0 <= s < MAX_STAMP:
        return 0
    return min(s, ahead_cap())


def ahead_cap() -> int:
    """The highest stamp taken from another peer: this clock + ``MAX_AHEAD``, at the end
    of its grain, so that the next stamp here (``Stamps.observe``) cut to its grain for
    the parent rows is still above it (a correction received after it wins)."""
    return grained(int(time.time() * 1000) + MAX_AHEAD) + STAMP_GRAIN - 1


class Stamps:
    """This peer's stamps for instances it receives: milliseconds of the clock, made
    strictly increasing (two receipts in one ms, a clock set back), thread-safe."""

    def __init__(self, clock=time.time):
        self.clock, self.last, self._lock = clock, 0, threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.last = max(int(self.clock() * 1000), self.last + 1)
            return self.last

    def observe(self, stamp: int) -> None:
        """A stamp learned (bounded: ``stamp_of``): the next ones are above it (the
        receive rule of a hybrid logical clock), so a version received after a row was
        seen wins over it even where this peer's clock is behind the row's writer's."""
        if stamp > self.last:
            with self._lock:
                self.last = max(self.last, stamp)


new_stamp = Stamps()        # this process's: () -> the stamp of an instance received


def stamped(meta: InstanceMeta, stamp: int) -> InstanceMeta:
    """*meta* with *stamp* among its attributes (``STAMP``): what every peer that records
    the instance writes its patient, study and series rows with."""
    return dataclasses.replace(meta, attributes={**meta.attributes, STAMP: stamp})


def _lww_sql(table: str, cols: list[str], pk: str) -> tuple[str, str]:
    """(the upsert of a row [values..., stamp] that changes the row only where (stamp,
    values) is greater than the row's; the UPDATE that only raises the stamp of a row
    that holds those very values: rowcount 0 if it does not)."""
    order = [STAMP] + [c for c in cols if c != pk]
    sets = ", ".join(f"{c} = excluded.{c}" for c in order)
    ours = ", ".join(f"ifnull({table}.{c}, '')" for c in order)     # (a NULL: never greater)
    theirs = ", ".join(f"excluded.{c}" for c in order)
    upsert = (f"INSERT INTO {table} ({', '.join(cols)}, {STAMP}) VALUES "
              f"({', '.join('?' * (len(cols) + 1))}) ON CONFLICT({pk}) DO UPDATE SET {sets} "
              f"WHERE ({theirs}) > ({ours})")
    same = " AND ".join(f"{c} = ?" for c in cols)
    return upsert, f"UPDATE {table} SET {STAMP} = ? WHERE {STAMP} < ? AND {same}"


LWW_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")     # rows that are LWW registers
_LWW_SQL = {level: _lww_sql(TABLES[level], _LEVEL_SQL[level][0], UNIQUE[level])
            for level in LWW_LEVELS}
_LOCATION_SQL = versions.LOCATION_SQL      # (uid, archive, peer, sha256, size, seq, stamp)

# Catalog facts on the wire (anti-entropy), a batch as one JSON list:
#   [{"PATIENT": {PatientID: [columns]}, "STUDY": {...}, "SERIES": {...},
#     "STAMPS": {"PATIENT": {PatientID: stamp}, ..., "IMAGE": {SOPInstanceUID: stamp}},
#     "GONE": {"SERIES": {key: [columns..., stamp]}, ...}},   (rows of deleted instances)
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
    # one row per key and level: the attributes of the fact of the greatest (stamp,
    # values), in first-seen order (the rows of a key are built once, not once per fact: most
    # facts share their parents; a lesser stamp would lose to it in SQL too)
    latest: dict[str, dict] = {level: {} for level in LEVELS}     # key -> (attrs, stamp)
    keyed = [(latest[level], UNIQUE[level], level, level != "IMAGE") for level in LEVELS]
    for attrs, _ in facts:
        if attrs is None:                 # a tombstone: the location only
            continue
        stamp = stamp_of(attrs)           # (once a fact: it reads the clock)
        cut = grained(stamp)              # (a parent row's)
        for seen, key, level, parent in keyed:
            k, s = attrs.get(key, ""), cut if parent else stamp
            k = k if parent else (k, s)     # an instance's: one per version (``shown``)
            if _wins(s, attrs, seen.get(k), level):
                seen[k] = (attrs, s)
    # every level's rows end with the instance's stamp (``_LWW_SQL``: LWW_LEVELS)
    levels = {level: [[a.get(c, "") or "" for c in _LEVEL_SQL[level][0]] + [stamp]
                      for a, stamp in latest[level].values()] for level in LEVELS}
    same: dict[str, list] = {}
    won = None if parents is None else {}
    if parents is not None:
        # the values this connection wrote last: only the stamp may need raising (a
        # stamp-less row's never: it loses to the row, whatever that holds now), and only
        # above the (grained) stamp it is known to hold them with
        held = parents.setdefault(STAMP, {})
        for level in PARENT_LEVELS:
            last, had = parents.setdefault(level, {}), held.setdefault(level, {})
            rows, same[level] = [], []
            for row in levels[level]:
                if last.get(row[0]) != row[:-1]:
                    rows.append(row)
                elif row[-1] and (had.get(row[0]) is None or row[-1] > had[row[0]]):
                    same[level].append(row)
            levels[level] = rows
    retired = _write_levels(conn, levels, [versions.row(loc, stamp_of(a)) for a, loc in facts
                                           if loc is not None], hints, after, same, won)
    if retired and parents is not None:         # rows it remembers may be gone
        parents.clear()
    elif parents is not None:
        for level in PARENT_LEVELS:
            if max(len(parents[level]), len(held[level])) > REMEMBERED:
                parents[level].clear()
                held[level].clear()
            parents[level].update((row[0], row[:-1]) for row in levels[level])
            for row in levels[level] + same[level]:      # the stamp it holds them with
                if row[0] in won[level]:
                    held[level][row[0]] = row[-1]
                else:
                    held[level].pop(row[0], None)


def _wins(stamp: int, attrs: dict, seen: tuple | None, level: str) -> bool:
    """Whether *attrs* (of *stamp*) makes *level*'s row rather than *seen* (attributes,
    stamp), as the upsert of ``_LWW_SQL`` decides: the greater (stamp, values), equal
    ones the later."""
    if seen is None:
        return True
    seen, other = seen
    if stamp != other:
        return stamp > other
    cols = [c for c in _LEVEL_SQL[level][0] if c != UNIQUE[level]]
    return [attrs.get(c, "") or "" for c in cols] >= [seen.get(c, "") or "" for c in cols]


def _write_levels(conn: sqlite3.Connection, levels: dict[str, list], locations: list,
                  hints: list = (), after=None, same: dict | None = None,
                  won: dict | None = None) -> int:
    """*levels*: rows per level (parent rows end with their stamp); *same*: parent rows
    whose values the row held when this connection last wrote it: its stamp raised if
    it still holds them, else written as the others; *won*, if given: {level: {key:
    stamp}} of the parent rows of *levels* and *same* that hold their values after it.
    The highest stamp is observed (``Stamps.observe``). Retired rows are written back
    first and rows left without children retired last (``rows``): returns how many rows
    that changed."""
    new_stamp.observe(max((row[-1] for level in _LWW_SQL for rows in (
        levels.get(level, ()), (same or {}).get(level, ())) for row in rows), default=0))
    conn.execute("BEGIN IMMEDIATE")
    try:
        for level in LEVELS:
            upsert, bump = _LWW_SQL[level]
            rows, got = levels[level], ({} if won is None else won.setdefault(level, {}))
            for row in (same or {}).get(level, ()):
                if conn.execute(bump, [row[-1], row[-1]] + row[:-1]).rowcount:
                    got[row[0]] = row[-1]
                else:
                    rows = rows + [row]
            if not rows:
                continue
            if level != "IMAGE":     # a retired row written again starts from its stamp
                conn.executemany(upsert, parent_rows.ghosts(conn, level, [   # and values
                    row[0] for row in rows]))
            if won is None or level == "IMAGE":
                conn.executemany(upsert, rows)
                continue
            for row in rows:
                if conn.execute(upsert, row).rowcount:
                    got[row[0]] = row[-1]
        if locations:
            conn.executemany(_LOCATION_SQL, locations)
        if hints:
            conn.executemany(_HINT_SQL, hints)
        if after is not None:
            after(conn)
        shown.settle(conn, levels.get("IMAGE", ()), locations)     # rows of the current
        retired = parent_rows.settle(conn)      # rows left without children: retired
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return retired


def merge_rows(conn: sqlite3.Connection, rows: dict[str, list]) -> None:
    """Merge patient, study and series rows [values..., stamp] (*rows*: per level) into
    the catalog in one transaction, as a batch's rows are: where greater, and retired at
    once where no child holds them (``catalog.rebuild``: the old file's stamps)."""
    levels = {level: [] for level in LEVELS}
    for level in PARENT_LEVELS:
        levels[level] = [[v or "" for v in row[:-1]] + [stamp_of({STAMP: row[-1]})]
                         for row in rows.get(level, ())]
    _write_levels(conn, levels, [])


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
            if not all(v is None or type(v) is str for v in row):
                raise ValueError(f"{level} row {key!r} has a value that is not text")
            _clip(row, 0)
    stamps = parents.get(STAMPS_KEY, {})
    if not isinstance(stamps, dict) or not all(
            isinstance(stamps.get(level, {}), dict) and all(
                type(v) is int and 0 <= v < MAX_STAMP for v in stamps.get(level, {}).values())
            for level in LWW_LEVELS):
        raise ValueError("a batch's row stamps are not integers of 0 to 2^53")
    gone = parents.get(parent_rows.WIRE_KEY, {})
    if not isinstance(gone, dict) or not all(
            isinstance(gone.get(level, {}), dict) and all(
                isinstance(row, list) and len(row) == len(_LEVEL_SQL[level][0]) + 1 and
                all(isinstance(v, str) for v in row[:-1]) and type(row[-1]) is int and
                0 <= row[-1] < MAX_STAMP for row in gone.get(level, {}).values())
            for level in PARENT_LEVELS):
        raise ValueError("a batch's rows of deleted instances are not rows and a stamp")
    versions.check_wire(parents)
    shown.check_wire(parents)
    n, top = len(FACT_FIELDS), 0
    for row in facts:
        if not isinstance(row, list) or len(row) != n:
            raise ValueError(f"fact has {len(row)} fields, expected {n}")
        if not all(v is None or type(v) is str for v in row[1:4] + row[len(LOCATION_FIELDS):]):
            raise ValueError("a fact has a value that is not text")
        _clip(row, len(LOCATION_FIELDS))
        int(row[4])
        top = max(top, int(row[0]))
    return top


def _clip(row: list, start: int) -> None:
    """*row*'s values from *start* cut to ``VALUE_MAX`` characters (``validate.clipped``):
    a catalog from before the facade refused longer ones (d4a5ded) may still serve them,
    and sync goes on without growing every catalog and answer by them."""
    if max(map(len, filter(None, row[start:])), default=0) > VALUE_MAX:
        row[start:] = [v if v is None or len(v) <= VALUE_MAX else clipped(v)[:VALUE_MAX]
                       for v in row[start:]]


def write_wire(conn: sqlite3.Connection, batch: list, peer: str = "") -> None:
    """Write a batch of facts from the wire in one transaction (see ``read_changes``),
    the tombstones among them kept and applied in it (``tombstones.received``; *peer*:
    this peer's name)."""
    write_wires(conn, [batch], peer)


def write_wires(conn: sqlite3.Connection, batches: list, peer: str = "") -> int:
    """Write several origins' wire batches (one pull's answer) in ONE transaction: a
    pull that brings facts of k origins costs one commit, not k. A row that comes
    again unchanged (stamp and values) is written once: at 32 peers a pull brings a
    series' patient, study and series rows in each of up to 31 origins' batches, and
    an instance's row in both its holders' (writing an equal row again changes
    nothing, ``_LWW_SQL``). Returns the changes made retiring rows left without
    children (``rows.settle``)."""
    levels: dict[str, list] = {level: [] for level in LEVELS}
    seen: dict[str, dict] = {level: {} for level in LEVELS}    # key -> rows written
    locations, received = [], []
    n = len(LOCATION_FIELDS)
    cls = n + _LEVEL_SQL["IMAGE"][0].index("SOPClassUID")
    sop = n + _LEVEL_SQL["IMAGE"][0].index("SOPInstanceUID")
    cap = ahead_cap()                               # ``stamp_of``'s bound, read once

    def keep(level: str, key, row: list) -> None:
        had = seen[level].setdefault(key, [])
        if row not in had:
            had.append(row)
            levels[level].append(row)

    for batch in batches:
        if not batch:
            continue
        parents, facts = batch[0], batch[1:]
        stamps = parents.get(STAMPS_KEY) or {}
        gone = parents.get(parent_rows.WIRE_KEY) or {}
        for level in PARENT_LEVELS:
            given = stamps.get(level) or {}
            for key, row in parents.get(level, {}).items():
                keep(level, key, [v or "" for v in row] + [_stamp(given.get(key), cap)])
            # rows of deleted instances: merged where held, else kept retired (``rows``)
            for key, row in (gone.get(level) or {}).items():
                keep(level, key, [v or "" for v in row[:-1]] + [_stamp(row[-1], cap)])
        # a fact of a deleted instance travels without its attributes: no instance row
        given = stamps.get("IMAGE") or {}
        for row in facts:
            if row[cls]:
                keep("IMAGE", row[sop], [v or "" for v in row[n:]] +
                     [_stamp(given.get(row[sop]), cap)])
        for uid, row in shown.from_wire(parents, lambda s: _stamp(s, cap), seen["IMAGE"]):
            keep("IMAGE", uid, row)     # its versions' rows (``shown``)
        locs = versions.from_wire(parents, [(row[sop], row[1], row[2], row[3], int(row[4]),
                                             int(row[0])) for row in facts], given,
                                  lambda s: _stamp(s, cap))
        locations += locs
        received.append((locs, parents.get(tombstones.WIRE_KEY)))
    if not locations and not any(levels.values()):
        return 0

    def after(c):
        for locs, payloads in received:
            tombstones.received(c, peer, locs, payloads)
    return _write_levels(conn, levels, locations, after=after)


def write_origins(conn: sqlite3.Connection, groups: list, peer: str = "") -> list:
    """[(retired, None) or (0, error)] for each of *groups* (an origin's wire batches:
    the facts of others a writer learned first-hand): all in ONE transaction (at 32
    peers a C-STORE's two holders', one commit instead of two), one by one only if that
    fails — each origin then its own outcome, as alone."""
    if len(groups) > 1:
        try:
            return [(write_wires(conn, [b for g in groups for b in g], peer), None)] * \
                len(groups)
        except (sqlite3.Error, OSError):
            pass
    out = []
    for batches in groups:
        try:
            out.append((write_wires(conn, batches, peer), None))
        except (sqlite3.Error, OSError) as e:
            out.append((0, e))
    return out


def _stamp(s, cap: int) -> int:
    """``stamp_of({STAMP: s})`` with the clock's bound *cap* read once for a batch."""
    return min(s, cap) if type(s) is int and 0 <= s < MAX_STAMP else 0


def meta_attributes(meta: InstanceMeta) -> dict:
    return {**meta.attributes, "SOPInstanceUID": meta.sop_instance_uid, "SOPClassUID":
            meta.sop_class_uid, "TransferSyntaxUID": meta.transfer_syntax_uid}


def read_changes(conn: sqlite3.Connection, origin: str, after: int, limit: int,
                 upto: int = 2 ** 62, memo: dict | None = None) -> list:
    """The facts of *origin* with a sequence number above *after* (up to *upto*), in
    order, as a wire batch: their patient/study/series rows first (once each; the stamps
    of those that have one beside them, ``STAMPS_KEY``), then one list per fact. Facts
    of deleted instances (tombstone markers among them) come without attributes; the
    markers' payloads ride beside the parent rows (``tombstones.WIRE_KEY``). *memo*
    {level: {key: (row, stamp)}}: parent rows read already in this reader job."""
    icols = ", ".join(("l." if c == "SOPInstanceUID" else "i.") + c
                      for c in _LEVEL_SQL["IMAGE"][0])
    facts = [list(r) for r in conn.execute(
        f"SELECT l.seq, l.archive, l.peer, l.sha256, l.size, {icols}, i.{STAMP}, l.stamp FROM "
        "locations l LEFT JOIN instances i ON i.SOPInstanceUID = l.SOPInstanceUID "
        "WHERE l.peer = ? AND l.seq > ? AND l.seq <= ? ORDER BY l.seq LIMIT ?",
        (origin, after, upto, limit))]
    if not facts:
        return []
    parents: dict[str, dict] = {}
    versions.to_wire(facts, parents)      # (each location's stamp, beside the rows)
    n = len(LOCATION_FIELDS)
    stamps: dict[str, dict] = {}
    for r in facts:                     # the instance rows' stamps, beside the rows
        stamp = r.pop()
        if stamp:
            stamps.setdefault("IMAGE", {})[r[n]] = stamp
    keys = {r[n + _LEVEL_SQL["IMAGE"][0].index("SeriesInstanceUID")] for r in facts}
    memo = {} if memo is None else memo
    for level in ("SERIES", "STUDY", "PATIENT"):
        cols = _LEVEL_SQL[level][0]
        known = memo.setdefault(level, {})
        unread = [k for k in keys if k not in known]
        for k in range(0, len(unread), 500):
            chunk = unread[k:k + 500]
            for r in conn.execute(
                    f"SELECT {', '.join(cols)}, {STAMP} FROM {TABLES[level]} WHERE "
                    f"{UNIQUE[level]} IN ({', '.join('?' * len(chunk))})", chunk):
                known[r[cols.index(UNIQUE[level])]] = (list(r[:-1]), r[-1])
        rows = {}
        for key in keys:
            if key in known:
                rows[key] = list(known[key][0])
                if known[key][1]:
                    stamps.setdefault(level, {})[key] = known[key][1]
        parents[level] = rows
        if level in PARENT:
            up = cols.index(PARENT[level][1])
            keys = {r[up] for r in rows.values()}
    if stamps:
        parents[STAMPS_KEY] = stamps
    gone = parent_rows.gone_parents(conn, [r[n] for r in facts if r[n + 1] is None],
                                    shown.to_wire(conn, [r[n] for r in facts], parents))
    if gone:                # of deleted instances: their rows' stamps and values, retired
        parents[parent_rows.WIRE_KEY] = gone
    sop = len(LOCATION_FIELDS) + _LEVEL_SQL["IMAGE"][0].index("SOPInstanceUID")
    markers = [r[sop] for r in facts if tombstones.is_marker(r[1], r[4])]
    if markers:
        parents[tombstones.WIRE_KEY] = tombstones.payloads(conn, origin, markers)
    return [parents] + facts


def read_changes_of(conn: sqlite3.Connection, wanted: list, limit: int) -> list:
    """[(origin, wire batch)] for *wanted* [(origin, after)] (or (origin, after, upto)),
    in that order, at most *limit* facts in all: one reader job for every origin a pull
    asks for, not one each, and one read of a parent row the origins share (a stream's
    series: its holders' facts, 31 origins at 32 peers) — in one read transaction, so
    that a row read for one origin is the row as the facts of the next one saw it."""
    out, memo = [], {}
    begun = not conn.in_transaction
    if begun:
        conn.execute("BEGIN")
    try:
        for origin, after, *upto in wanted:
            if limit <= 0:
                break
            rows = read_changes(conn, origin, after, limit, *upto, memo=memo)
            if rows:
                out.append((origin, rows))
                limit -= len(rows) - 1
    finally:
        if begun:
            conn.execute("COMMIT")
    return out


def facts_from_wire(batch: list) -> list[tuple[dict, tuple]]:
    """A wire batch as (attributes, location) facts for :func:`write_facts` (a bench's)."""
    check_wire(batch)
    if not batch:
        return []
    parents, out = batch[0], []
    stamps = (parents.get(STAMPS_KEY) or {}).get("SERIES", {})
    n = len(LOCATION_FIELDS)
    named = {level: {k: dict(zip(_LEVEL_SQL[level][0], row)) for k, row in
                     parents.get(level, {}).items()} for level in PARENT_LEVELS}
    for row in batch[1:]:
        attrs = dict(zip(_LEVEL_SQL["IMAGE"][0], row[n:]))
        series = named["SERIES"].get(attrs.get("SeriesInstanceUID"), {})
        study = named["STUDY"].get(series.get("StudyInstanceUID"), {})
        patient = named["PATIENT"].get(study.get("PatientID"), {})
        merged = {**patient, **study, **series, **attrs,
                  STAMP: stamps.get(attrs.get("SeriesInstanceUID"), 0)}
        out.append((merged, (attrs["SOPInstanceUID"], row[1], row[2], row[3], int(row[4]),
                             int(row[0]))))
    return out


def vector(conn: sqlite3.Connection) -> dict[str, int]:
    """{origin peer: highest sequence number held}: a loose index scan of
    ``locations(peer, seq)`` (a seek per peer: next peer, then its max(seq)), not a
    ``GROUP BY`` that reads the whole index (1.5 s at start with 10M copies)."""
    return {peer: seq for peer, seq in conn.execute(
        "WITH RECURSIVE origin(peer) AS (SELECT min(peer) FROM locations UNION ALL "
        "SELECT (SELECT min(peer) FROM locations WHERE peer > origin.peer) FROM origin "
        "WHERE origin.peer IS NOT NULL) SELECT peer, (SELECT max(seq) FROM locations "
        "WHERE peer = origin.peer) FROM origin WHERE peer IS NOT NULL")}


def renumber(conn: sqlite3.Connection, peer: str, after: int, upto: int | None,
             start: int) -> tuple[int, int]:
    """Re-issue this peer's own facts numbered in (*after*, *upto*] (no upper bound if
    None) with fresh numbers from *start* on, in their order, in one transaction (their
    markers' tombstone rows and the follow-ups owed follow them; a tombstone's ``event``
    stays: no deletion is new for it). Returns (facts re-issued, last number given)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = max(start, 1 + (conn.execute("SELECT max(seq) FROM locations WHERE peer = ?",
                                             (peer,)).fetchone()[0] or 0))
        rows = conn.execute(
            "SELECT seq, SOPInstanceUID FROM locations WHERE peer = ? AND seq > ? AND "
            "seq <= ? ORDER BY seq",
            (peer, after, upto if upto is not None else 2 ** 62)).fetchall()
        for i, (old, uid) in enumerate(rows):
            conn.execute("UPDATE locations SET seq = ? WHERE peer = ? AND seq = ?",
                         (start + i, peer, old))
            conn.execute("UPDATE tombstones SET seq = ? WHERE origin = ? AND "
                         "SOPInstanceUID = ? AND seq = ?", (start + i, peer, uid, old))
            conn.execute("UPDATE follow_ups SET seq = ? WHERE SOPInstanceUID = ? AND "
                         "seq = ?", (start + i, uid, old))
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return len(rows), start + len(rows) - 1
