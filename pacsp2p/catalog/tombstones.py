"""Tombstones: deletions that travel through anti-entropy, so deleted instances never return.

A deletion is an *observed remove*, as in the OR-Set of Shapiro, Preguiça, Baquero and
Zawirski ("A comprehensive study of Convergent and Commutative Replicated Data Types",
INRIA RR-7506, 2011): a remove deletes the adds it has observed, never the ones it has
not. Here an "add" is a location fact (this instance is on that archive of that peer,
numbered by its origin peer), and what a peer has observed is its version vector.

**The tombstone.** Deleting instance X at peer D writes a *marker* fact into D's own log
— a location row ``(X, archive "", peer D, sha256 "", size -2, seq)`` (no archive has an
empty name) — so the marker is numbered, pulled, resumed and compared exactly like any
other fact, with no change to the sync protocol. Its payload rides in the same batch
(``"TOMBSTONES"`` beside the patient/study/series rows of ``read_changes``) and is kept
in the ``tombstones`` table, one row per (instance, origin):

    vector   D's version vector when it deleted X ({origin: highest sequence seen})
    reason   why ("admin", "113001 Rejected for Quality Reasons", ...)
    created  when (D's clock, for people), learned: when this peer last learned news of it
             (wall clock; this process also keeps it on the monotonic clock: ``learned_after``)
    event    the sequence number of D's latest deletion of X (0: D only owes follow-ups)

A later marker of X by the same origin replaces the row; its vector is merged
(pointwise maximum), so it covers at least what the earlier one did.

**What it removes** (``apply``, in the very transaction that writes the facts):

- R1: every location fact of X whose sequence number is within the tombstone's vector
  for that fact's origin (``seq <= vector[origin]``): the copies the deleter knew of.
  Whenever such a fact arrives — from a peer that was down, a late pull, a stale
  neighbour — it is written as removed (size -1), on every peer alike (catalogs
  converge: the digest stays equal).
- R2: when a peer first learns a tombstone, every copy of X *it holds itself* at that
  moment: copies the deleter could not know of (a late push, a hinted hand-off by a
  peer that had not heard of the delete yet). Those not covered by R1 are covered for
  the others by a follow-up tombstone this peer issues with the vector {itself: highest
  such sequence} (``follow_ups``, issued by ``transfer.delete``). R2 runs once per
  deletion (``event``): a follow-up, or a row seen again, never runs it again — so a
  copy sent again after the delete is not removed by news of that same delete.
- Copies made later are new facts with higher sequence numbers: not covered. That is
  why sending the same instance again after a delete stores it again (the tombstone is
  for the old copies, not a ban), while no copy path brings an old copy back: the copy
  paths (hand-off, repair, crawl, the commit of a copy pushed before the delete) check
  ``state``/``tombstoned`` first (``transfer.replicas``, ``adapters.crawl``).

An instance left without a live copy is hidden: its instance row goes, and its series,
study and patient rows if they have no other children; its hints go too. C-FIND reads
those tables: it never returns a deleted instance. This peer's own covered copies are
queued in ``purge`` for ``transfer.delete`` to remove from their archives (or to list
as ``retained`` where the archive cannot delete); the queue survives a crash.

Tombstones are kept (one small row per deleted instance and origin); nothing expires.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import OrderedDict
from typing import Iterable

from pacsp2p.catalog import rows

MARKER_ARCHIVE = ""        # a marker fact's archive: config refuses an empty name
MARKER_SIZE = -2           # a marker fact's size (live copies are >= 0, forgotten -1)
MAX_REASON = 128           # characters of a reason kept
MAX_VECTOR = 4096          # origins in one tombstone's vector (a cluster is far smaller)
WIRE_KEY = "TOMBSTONES"    # key of the payloads in a wire batch's first element


def create_schema(conn: sqlite3.Connection) -> None:
    """The tables of this module (``IF NOT EXISTS``: safe at every start)."""
    conn.execute("CREATE TABLE IF NOT EXISTS tombstones (SOPInstanceUID TEXT NOT NULL, "
                 "origin TEXT NOT NULL, seq INTEGER NOT NULL, vector TEXT NOT NULL, "
                 "reason TEXT NOT NULL DEFAULT '', created TEXT NOT NULL DEFAULT '', "
                 "learned REAL NOT NULL DEFAULT 0, event INTEGER NOT NULL DEFAULT 0, "
                 "PRIMARY KEY (SOPInstanceUID, origin))")
    # this peer's own copies to remove from their archives (transfer.delete)
    conn.execute("CREATE TABLE IF NOT EXISTS purge (SOPInstanceUID TEXT NOT NULL, "
                 "archive TEXT NOT NULL, sha256 TEXT NOT NULL DEFAULT '', "
                 "reason TEXT NOT NULL DEFAULT '', created REAL NOT NULL DEFAULT 0, "
                 "PRIMARY KEY (SOPInstanceUID, archive))")
    # own copies an archive could not delete: hidden from the view, listed in status
    conn.execute("CREATE TABLE IF NOT EXISTS retained (SOPInstanceUID TEXT NOT NULL, "
                 "archive TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', "
                 "since TEXT NOT NULL DEFAULT '', PRIMARY KEY (SOPInstanceUID, archive))")
    # own copies removed by R2 that no tombstone's vector covers: a tombstone of ours owed
    conn.execute("CREATE TABLE IF NOT EXISTS follow_ups (SOPInstanceUID TEXT PRIMARY KEY, "
                 "seq INTEGER NOT NULL, reason TEXT NOT NULL DEFAULT '')")
    # instances with a tombstone, counted by a trigger (status reads one row, never scans)
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                    "name = 'tombstone_count'").fetchone() is None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE tombstone_count (n INTEGER NOT NULL)")
            conn.execute("INSERT INTO tombstone_count SELECT count(DISTINCT SOPInstanceUID) "
                         "FROM tombstones")
            conn.execute("CREATE TRIGGER tombstone_counted AFTER INSERT ON tombstones WHEN "
                         "(SELECT count(*) FROM tombstones WHERE SOPInstanceUID = "
                         "new.SOPInstanceUID) = 1 BEGIN UPDATE tombstone_count SET n = n + 1; "
                         "END")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# -- payloads ------------------------------------------------------------------------------

def clean_reason(reason) -> str:
    """*reason* as kept: printable, bounded."""
    text = reason if isinstance(reason, str) else ""
    return "".join(c if c.isprintable() else "?" for c in text)[:MAX_REASON]


def clean_vector(vector) -> dict[str, int]:
    """A version vector from the wire: {str: non-negative int}, bounded; the rest dropped."""
    out: dict[str, int] = {}
    if not isinstance(vector, dict):
        return out
    for origin, seq in list(vector.items())[:MAX_VECTOR]:
        if isinstance(origin, str) and 0 < len(origin) <= 255 and \
                isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            out[origin] = seq
    return out


def is_marker(archive, size) -> bool:
    return archive == MARKER_ARCHIVE and int(size) == MARKER_SIZE


def payloads(conn: sqlite3.Connection, origin: str, uids: Iterable[str]) -> dict:
    """{uid: [vector, reason, created, event]} of *origin*'s tombstones of *uids* (for
    the wire)."""
    out = {}
    uids = list(dict.fromkeys(uids))
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        for uid, vector, reason, created, event in conn.execute(
                "SELECT SOPInstanceUID, vector, reason, created, event FROM tombstones "
                f"WHERE origin = ? AND SOPInstanceUID IN ({', '.join('?' * len(chunk))})",
                [origin, *chunk]):
            out[uid] = [json.loads(vector), reason, created, event]
    return out


# -- in the writer's transaction ------------------------------------------------------------

def learn(conn: sqlite3.Connection, uid: str, origin: str, seq: int, vector: dict,
          reason: str, created: str, event: int) -> bool:
    """Keep (or update) *origin*'s tombstone of *uid* from its marker numbered *seq*;
    True if it tells this peer of a deletion it did not know (*event*, the sequence
    number of that deletion, is new to it): R2 is then due."""
    old = conn.execute("SELECT seq, vector, event, learned FROM tombstones WHERE "
                       "SOPInstanceUID = ? AND origin = ?", (uid, origin)).fetchone()
    if old is not None and old[0] >= seq:
        return False
    merged = dict(json.loads(old[1])) if old is not None else {}
    for o, s in vector.items():
        merged[o] = max(merged.get(o, 0), s)
    known = old[2] if old is not None else 0
    news = old is None or event > known          # "learned" dates news of a deletion
    now = time.time()
    if news:
        _learned_now(conn, uid)
    conn.execute("INSERT INTO tombstones VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
                 "(SOPInstanceUID, origin) DO UPDATE SET seq = excluded.seq, vector = "
                 "excluded.vector, reason = excluded.reason, created = excluded.created, "
                 "learned = excluded.learned, event = excluded.event",
                 (uid, origin, seq, json.dumps(merged, sort_keys=True), clean_reason(reason),
                  str(created)[:40], now if news else old[3], max(known, event)))
    return event > known


# Whether a copy was made before this peer learned of a deletion is a question about one
# process run: both times are taken by ``time.monotonic`` (a wall clock stepped back
# between them, the copy "made before" for the step's length: a study sent again after
# a delete kept one copy; found by the audit of bcbbe90). The times of the latest
# ``NEWS_KEPT`` deletions learned are kept here; an older copy is judged by the
# catalog's wall-clock ``learned`` as before.
NEWS_KEPT = 20_000     # (~5 MB at most)
_last_news = [float("-inf")]    # time.monotonic() of the last news of a deletion here
_news: OrderedDict = OrderedDict()  # (catalog file, uid) -> time.monotonic() of its last news
_forgot = [float("-inf")]       # news up to then are no longer in _news


def _key(conn: sqlite3.Connection, uid: str) -> tuple:
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    return _paths.setdefault(path, path), uid           # one string per catalog file


_paths: dict = {}


def _learned_now(conn: sqlite3.Connection, uid: str) -> None:
    """The writer's thread (set before the commit that writes it, so never later than a
    reader could see it): news of a deletion of *uid* learned now."""
    now, key = time.monotonic(), _key(conn, uid)
    _last_news[0] = max(_last_news[0], now)
    _news.pop(key, None)
    _news[key] = now
    while len(_news) > NEWS_KEPT:
        _forgot[0] = max(_forgot[0], _news.popitem(last=False)[1])


def no_news_since(when: float) -> bool:
    """True if no catalog of this process learned news of a deletion after *when* (a
    ``time.monotonic()``): ``state`` need not be read to know that."""
    return _last_news[0] <= when


def learned_after(conn: sqlite3.Connection, uid: str, since: float) -> bool:
    """Did this peer learn news of a deletion of *uid* after *since* (a
    ``time.monotonic()`` of this process)?"""
    if no_news_since(since):
        return False
    at = _news.get(_key(conn, uid))
    if at is not None:
        return at > since
    if since >= _forgot[0]:         # every news after *since* is in _news: none of uid
        return False
    learned = _learned(conn, uid)
    return learned is not None and learned > time.time() - (time.monotonic() - since)


def late_copy(conn: sqlite3.Connection, peer: str, uid: str, since: float) -> bool:
    """A copy of *uid* this peer took at *since* (a ``time.monotonic()``; a push of
    another peer's: repair, hand-off) was just recorded, in this transaction. If a
    deletion of *uid* was learned after *since*, the copy was on its way before the
    delete and R2 did not see it: remove it now as R2 would have (a follow-up tombstone
    owed, the file queued for the purge); True if so. Checked here, in the writer's
    transaction, not by a read before the record: a tombstone learned in between would
    otherwise miss it for ever."""
    if not learned_after(conn, uid, since):
        return False
    apply(conn, peer, [uid], {uid})
    return True


def issued(conn: sqlite3.Connection, peer: str, uid: str, seq: int, vector: dict,
           reason: str, follow_up: bool = False) -> None:
    """This peer's own marker of *uid* was just written with *seq* (``Catalog.record``'s
    ``then``): keep its payload and remove what it covers. A deletion covers every own
    fact before it; a follow-up (*follow_up*) only what its *vector* says, and settles
    the follow-up it answers."""
    vector = dict(vector)
    if not follow_up:
        vector[peer] = max(vector.get(peer, 0), seq - 1)     # every own fact before it
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    learn(conn, uid, peer, seq, vector, reason, created, 0 if follow_up else seq)
    conn.execute("DELETE FROM follow_ups WHERE SOPInstanceUID = ? AND seq <= ?",
                 (uid, vector.get(peer, 0)))
    apply(conn, peer, [uid])


def received(conn: sqlite3.Connection, peer: str, locations: list, found) -> None:
    """Facts of another peer were just written (anti-entropy, ``learn``): keep the
    tombstones among them (*found*: the batch's payloads) and apply every tombstone to
    the instances the batch touched. *locations*: (uid, archive, origin, sha256, size,
    seq) each."""
    found = found if isinstance(found, dict) else {}
    newly = set()
    for uid, archive, origin, _sha, size, seq, *_ in locations:
        if not is_marker(archive, size):
            continue
        payload = found.get(uid)
        vector, reason, created, event = {}, "", "", int(seq)
        if isinstance(payload, list) and len(payload) == 4:
            vector, reason, created = clean_vector(payload[0]), payload[1], payload[2]
            if isinstance(payload[3], int) and 0 <= payload[3] <= int(seq):
                event = payload[3]
        if learn(conn, uid, origin, int(seq), vector, reason, created, event):
            newly.add(uid)
    apply(conn, peer, {loc[0] for loc in locations}, newly)


def apply(conn: sqlite3.Connection, peer: str, uids: Iterable[str],
          newly: set | frozenset = frozenset()) -> None:
    """Remove what the tombstones of *uids* cover (R1 for every fact; R2 for this peer's
    own copies of the instances in *newly*, whose tombstones it just learned); hide an
    instance left without a live copy; queue this peer's removed copies for purging."""
    if conn.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is None:
        return                                   # no deletion ever: nothing to look at
    known = _tombstones(conn, list(uids))
    for uid, (vectors, reason) in known.items():
        live, unobserved = 0, 0
        for p, archive, sha, seq in conn.execute(
                "SELECT peer, archive, sha256, seq FROM locations WHERE SOPInstanceUID = ? "
                "AND size >= 0", (uid,)).fetchall():
            observed = any(seq <= v.get(p, 0) for v in vectors)
            if not observed and not (p == peer and uid in newly):
                live += 1
                continue
            conn.execute("UPDATE locations SET size = -1 WHERE SOPInstanceUID = ? AND "
                         "peer = ? AND archive = ?", (uid, p, archive))
            if p == peer:
                conn.execute("INSERT OR REPLACE INTO purge VALUES (?, ?, ?, ?, ?)",
                             (uid, archive, sha or "", reason, time.time()))
                if not observed:
                    unobserved = max(unobserved, seq)
        if unobserved:
            conn.execute("INSERT INTO follow_ups VALUES (?, ?, ?) ON CONFLICT "
                         "(SOPInstanceUID) DO UPDATE SET seq = max(seq, excluded.seq)",
                         (uid, unobserved, reason))
        if live == 0:
            hide(conn, uid)


def _tombstones(conn, uids: list[str]) -> dict[str, tuple[list[dict], str]]:
    """{uid: ([vector, ...], reason of the latest)} for those of *uids* with tombstones."""
    out: dict[str, tuple[list, str]] = {}
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        for uid, vector, reason in conn.execute(
                "SELECT SOPInstanceUID, vector, reason FROM tombstones WHERE SOPInstanceUID "
                f"IN ({', '.join('?' * len(chunk))}) ORDER BY learned", chunk):
            vectors, _ = out.get(uid, ([], ""))
            vectors.append(json.loads(vector))
            out[uid] = (vectors, reason)
    return out


def hide(conn: sqlite3.Connection, uid: str) -> None:
    """Take instance *uid* out of the view: its row, then its series, study and patient
    rows if they have no other children (``rows.retire_instance``: kept out of the view
    with their stamps); and the hints and conflicts of it."""
    rows.retire_instance(conn, uid)
    conn.execute("DELETE FROM version_rows WHERE SOPInstanceUID = ?", (uid,))   # (``shown``)
    conn.execute("DELETE FROM hints WHERE SOPInstanceUID = ?", (uid,))
    conn.execute("DELETE FROM conflicts WHERE SOPInstanceUID = ?", (uid,))


# -- reading (any connection) ------------------------------------------------------------------

def tombstoned(conn: sqlite3.Connection, uids: list[str]) -> set[str]:
    """The subset of *uids* that some tombstone names."""
    found: set[str] = set()
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        found.update(r[0] for r in conn.execute(
            "SELECT DISTINCT SOPInstanceUID FROM tombstones WHERE SOPInstanceUID IN "
            f"({', '.join('?' * len(chunk))})", chunk))
    return found


def state(conn: sqlite3.Connection, uid: str) -> tuple[float | None, int]:
    """(when this peer last learned a tombstone of *uid* (None: never), its live copies)."""
    learned = _learned(conn, uid)
    live = conn.execute("SELECT count(*) FROM locations WHERE SOPInstanceUID = ? AND "
                        "size >= 0", (uid,)).fetchone()[0]
    return learned, live


def _learned(conn: sqlite3.Connection, uid: str) -> float | None:
    """When this peer last learned a tombstone of *uid* (None: never)."""
    return conn.execute("SELECT max(learned) FROM tombstones WHERE SOPInstanceUID = ?",
                        (uid,)).fetchone()[0]


def own_live(conn: sqlite3.Connection, peer: str, uid: str, archive: str) -> bool:
    """Does this peer's catalog place a live copy of *uid* on its *archive* (again)?"""
    return conn.execute("SELECT 1 FROM locations WHERE SOPInstanceUID = ? AND peer = ? AND "
                        "archive = ? AND size >= 0", (uid, peer, archive)).fetchone() \
        is not None


def to_purge(conn: sqlite3.Connection, limit: int = 200) -> list[tuple]:
    """(uid, archive, sha256, reason) of own copies waiting to be removed, oldest first."""
    return conn.execute("SELECT SOPInstanceUID, archive, sha256, reason FROM purge "
                        "ORDER BY created LIMIT ?", (limit,)).fetchall()


def follow_ups(conn: sqlite3.Connection, limit: int = 500) -> list[tuple]:
    """(uid, seq, reason) of follow-up tombstones this peer owes."""
    return conn.execute("SELECT SOPInstanceUID, seq, reason FROM follow_ups LIMIT ?",
                        (limit,)).fetchall()


def summary(conn: sqlite3.Connection, peer: str, listed: int = 20) -> dict:
    """For status: tombstones held, own copies still to remove, and the deleted instances
    archives retain (they cannot delete), per archive and the first few by name."""
    tombs = conn.execute("SELECT n FROM tombstone_count").fetchone()[0]
    pending = conn.execute("SELECT count(*) FROM purge").fetchone()[0]
    still = ("NOT EXISTS (SELECT 1 FROM locations l WHERE l.SOPInstanceUID = "
             "r.SOPInstanceUID AND l.peer = ? AND l.archive = r.archive AND l.size >= 0)")
    by_archive = dict(conn.execute(
        f"SELECT archive, count(*) FROM retained r WHERE {still} GROUP BY archive", (peer,)))
    first = [{"instance": u, "archive": a, "reason": r, "since": s} for u, a, r, s in
             conn.execute(f"SELECT SOPInstanceUID, archive, reason, since FROM retained r "
                          f"WHERE {still} ORDER BY since DESC LIMIT ?", (peer, listed))]
    return {"tombstones": tombs, "purge_pending": pending, "retained": by_archive,
            "retained_instances": first}


# -- the purge's bookkeeping (writer) ---------------------------------------------------------

def purged(conn: sqlite3.Connection, uid: str, archive: str, retained_reason=None) -> None:
    """The purge of *uid* on *archive* is over; *retained_reason*: the archive keeps it."""
    conn.execute("DELETE FROM purge WHERE SOPInstanceUID = ? AND archive = ?", (uid, archive))
    if retained_reason is not None:
        conn.execute("INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?)",
                     (uid, archive, clean_reason(retained_reason),
                      time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
