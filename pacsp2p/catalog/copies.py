"""SQL of repair: how many live copies each instance has, and which need work.

Liveness is not in the catalog (it is the overlay's and the health checks' judgement):
callers pass a :class:`Liveness` — the peers and archives that are not live now, and
those of them that have been dead for ``repair_after`` seconds (their copies are
*lost*). Every function takes a read connection (``Catalog.read``) except the small
``repair_state`` table's writers (``Catalog.write``).

- ``census``: one pass over ``locations`` (its primary-key index, in order, grouped by
  instance): how many instances have fewer than ``replicas`` live copies, how many have
  none, how many a repair can fix and how many hold surplus copies. 13 CPU-s on ten
  million rows: the repair pass runs it and caches the answer with its time; it is never
  run per ``/status`` request. ``census_cached`` runs it only when something it depends
  on changed since the census saved in ``repair_state`` (``census_key``), so a restart,
  or an idle or read-only peer, does not read every location again.
- ``work``: the next instances after a cursor (keyset on SOPInstanceUID) that need a
  copy (a copy lost, fewer than ``replicas`` left, a live one to copy from) or hold more
  live copies than ``replicas``, with their locations and what placement needs to know.

Both count the copies of each version apart (``versions``): a copy of another version of
the UID is no copy of it, and every version is brought back to ``replicas`` after a loss
(the other versions counted in a second pass over the instances held in several).
  A restarted peer starts again from the first: the catalog is the progress.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from pacsp2p.catalog import versions
from pacsp2p.catalog.facts import vector
from pacsp2p.catalog.schema import read_counts
from pacsp2p.types import InstanceInfo, Location

SEP = "\t"
# a location row (l) holds the version the catalog describes (``versions``)
CURRENT = f"NOT {versions.OTHER}"


def _current(conn: sqlite3.Connection) -> str:
    """``CURRENT``, or "1" while no instance has two versions (the usual case: a seek per
    copy saved, 1.2 of 10.8 CPU-s of a census at 10M copies)."""
    return CURRENT if conn.execute("SELECT 1 FROM versions LIMIT 1").fetchone() else "1"


@dataclass(frozen=True)
class Liveness:
    """Which copies count. Archives are "peer<TAB>archive" keys."""

    dead_peers: frozenset = frozenset()        # not live now (dead, joining, unknown)
    dead_archives: frozenset = frozenset()     # down, on a live peer
    lost_peers: frozenset = frozenset()        # dead for repair_after seconds or more
    lost_archives: frozenset = frozenset()
    unsettled: frozenset = field(default_factory=frozenset)   # live, but back too recently
    # this peer's archives whose conflicts are copies to repair from (``keeps_versions``)
    keeping: frozenset = frozenset()

    def live(self, peer: str, archive: str) -> bool:
        return peer not in self.dead_peers and f"{peer}{SEP}{archive}" not in self.dead_archives

    def lost(self, peer: str, archive: str) -> bool:
        return peer in self.lost_peers or f"{peer}{SEP}{archive}" in self.lost_archives

    def settled(self, peer: str, archive: str) -> bool:
        return self.live(peer, archive) and peer not in self.unsettled and \
            f"{peer}{SEP}{archive}" not in self.unsettled


def _in(column: str, name: str, values, params: dict) -> str:
    """``column IN (:name0, :name1, ...)``, the values put in *params*."""
    names = []
    for i, v in enumerate(sorted(values)):
        params[f"{name}{i}"] = v
        names.append(f":{name}{i}")
    return f"{column} IN ({', '.join(names)})"


def _flags(lv: Liveness, params: dict) -> tuple[str, str]:
    """SQL expressions (live, lost) of one location row; named parameters in *params*."""
    key = "peer || char(9) || archive"
    live = (f"(CASE WHEN {_in('peer', 'dp', lv.dead_peers, params)} OR "
            f"{_in(key, 'da', lv.dead_archives, params)} THEN 0 ELSE 1 END)")
    lost = (f"(CASE WHEN {_in('peer', 'lp', lv.lost_peers, params)} OR "
            f"{_in(key, 'la', lv.lost_archives, params)} THEN 1 ELSE 0 END)")
    return live, lost


def census(conn: sqlite3.Connection, replicas: int, lv: Liveness, short: bool = False
           ) -> dict:
    """Counts over every instance that has a copy (tombstones do not count):
    ``instances`` with fewer than *replicas* live copies, ``unavailable`` with none,
    ``repairable`` (a copy lost — or, with *short*: ``replicas`` was raised, none need
    be —, fewer than *replicas* left, one live to copy from),
    ``surplus`` (more than *replicas* live copies), ``total``."""
    params: dict = {"r": replicas, "short": int(short)}
    live, lost = _flags(lv, params)
    current = _current(conn)
    row = conn.execute(
        "SELECT count(*), coalesce(sum(live < :r), 0), coalesce(sum(live = 0), 0), "
        "coalesce(sum(n - nlost < :r AND (nlost > 0 OR :short) AND live > 0), 0), "
        "coalesce(sum(live > :r), 0) FROM ("
        f"SELECT sum({live}) AS live, sum({lost}) AS nlost, count(*) AS n "
        f"FROM locations l WHERE size >= 0 AND {current} GROUP BY SOPInstanceUID)",
        params).fetchone()
    out = dict(zip(("total", "instances", "unavailable", "repairable", "surplus"), row))
    if out["total"] and current != "1":      # the other versions, each counted too
        others = conn.execute(     # (kept: this peer keeps those bytes as a conflict)
            "SELECT coalesce(sum(live < :r), 0), coalesce(sum(live = 0), 0), coalesce(sum("
            "n - nlost < :r AND (nlost > 0 OR :short) AND (live > 0 OR kept)), 0) FROM ("
            f"SELECT sum({live}) AS live, sum({lost}) AS nlost, count(*) AS n, max(EXISTS ("
            "SELECT 1 FROM conflicts c WHERE c.SOPInstanceUID = l.SOPInstanceUID AND "
            f"c.sha256 = l.sha256 AND {_in('c.archive', 'ka', lv.keeping, params)})) AS kept "
            "FROM locations l "
            "WHERE SOPInstanceUID IN (SELECT SOPInstanceUID FROM versions) AND size >= 0 "
            f"AND {versions.OTHER} GROUP BY SOPInstanceUID, {versions.VERSION})",
            params).fetchone()
        for k, n in zip(("instances", "unavailable", "repairable"), others):
            out[k] += n
    return out


def census_key(conn: sqlite3.Connection, replicas: int, lv: Liveness, short: bool = False
               ) -> str:
    """What ``census`` depends on: *replicas*, the copies not live or lost, and the
    locations, stood for by the highest fact of each origin (``vector``: every fact,
    tombstones included, moves it; an origin's facts arrive in order) and the rows per
    table (a row written or removed without a fact moves those). A few seeks."""
    return json.dumps([replicas, short, [sorted(s) for s in (lv.dead_peers, lv.dead_archives,
                                                      lv.lost_peers, lv.lost_archives)],
                       sorted(vector(conn).items()), sorted(read_counts(conn).items())])


def census_cached(conn: sqlite3.Connection, replicas: int, lv: Liveness,
                  short: bool = False) -> tuple[dict, str | None]:
    """(census, the key to save it with: ``save_census``), or the census saved with the
    same key and None: nothing it counts can have changed."""
    key = census_key(conn, replicas, lv, short)
    saved = load_state(conn, "census")
    if saved.get("key") == key:
        return saved["counts"], None
    return census(conn, replicas, lv, short), key


def save_census(conn: sqlite3.Connection, counts: dict, key: str) -> None:
    save_state(conn, "census", {"key": key, "counts": counts})


def work(conn: sqlite3.Connection, replicas: int, lv: Liveness, after: str,
         limit: int = 500, short: bool = False) -> list[tuple]:
    """Up to *limit* instances after *after* (in SOPInstanceUID order) that repair must
    copy or trim, each as (InstanceInfo for placement, its locations -- of every
    version --, the hashes of the current version's copies if it has several, else
    None: ``versions.current_copies``, with each other version's, and ``kept``: the
    (archive, sha256) of the conflicts this peer keeps); *short*: as in ``census``.
    Every instance held in several versions is among them."""
    params: dict = {"r": replicas, "after": after, "limit": limit, "short": int(short)}
    live, lost = _flags(lv, params)
    cur = f"({_current(conn)})"
    rows = conn.execute(
        "SELECT SOPInstanceUID, group_concat(peer || char(9) || archive || char(9) || "
        "sha256 || char(9) || size, char(10)), (SELECT v.sha256 FROM versions v WHERE "
        "v.SOPInstanceUID = l.SOPInstanceUID) AS several FROM locations l "
        "WHERE size >= 0 AND SOPInstanceUID > :after GROUP BY SOPInstanceUID "
        f"HAVING (sum({cur}) - sum({cur} * {lost}) < :r AND (sum({cur} * {lost}) > 0 OR "
        f":short) AND sum({cur} * {live}) > 0) "     # (held in several: repair decides)
        f"OR sum({live}) > :r OR several IS NOT NULL ORDER BY SOPInstanceUID LIMIT :limit",
        params).fetchall()
    if not rows:
        return []
    info = instance_infos(conn, [r[0] for r in rows])
    ours = versions.current_copies(conn, [r[0] for r in rows if r[2]])
    for uid, held in ours.items():     # the copies kept here beside another version
        held.kept = tuple(r for r in conn.execute("SELECT archive, sha256 FROM conflicts "
                                                  "WHERE SOPInstanceUID = ?", (uid,))
                          if r[0] in lv.keeping)
    out = []
    for uid, packed, current in rows:
        locs = []
        for item in packed.split("\n"):
            peer, archive, sha, size = item.split(SEP)
            locs.append(Location(uid, archive, peer, sha, int(size)))
        size = max((loc.size for loc in locs), default=0)
        out.append((info.get(uid) or InstanceInfo(uid, "", "", "", "", size), locs,
                    ours.get(uid)))
    return out


def instance_infos(conn: sqlite3.Connection, uids: list[str]) -> dict[str, InstanceInfo]:
    """{uid: InstanceInfo} with what placement may look at (UIDs, modality, size)."""
    out = {}
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        for r in conn.execute(
                f"SELECT i.SOPInstanceUID, i.SOPClassUID, se.StudyInstanceUID, "
                f"i.SeriesInstanceUID, se.Modality, "
                f"(SELECT max(size) FROM locations l WHERE l.SOPInstanceUID = i.SOPInstanceUID) "
                f"FROM instances i LEFT JOIN series se USING (SeriesInstanceUID) "
                f"WHERE i.SOPInstanceUID IN ({', '.join('?' * len(chunk))})", chunk):
            out[r[0]] = InstanceInfo(r[0], r[1] or "", r[2] or "", r[3] or "", r[4] or "",
                                     int(r[5] or 0), {"Modality": r[4] or ""})
    return out


# -- the repair's counters (progress shown in status; the work itself is in locations) --

def ensure_state(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS repair_state (key TEXT PRIMARY KEY, value TEXT)")


def load_state(conn: sqlite3.Connection, key: str) -> dict:
    """The state saved under *key* (repair, census, scrub, drain); {} if none or not a
    JSON object."""
    try:
        row = conn.execute("SELECT value FROM repair_state WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:        # the table is made by the first save
        return {}
    try:
        value = json.loads(row[0]) if row else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def save_state(conn: sqlite3.Connection, key: str, state: dict) -> None:
    ensure_state(conn)
    conn.execute("INSERT OR REPLACE INTO repair_state VALUES (?, ?)", (key, json.dumps(state)))
