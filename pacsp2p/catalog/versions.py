"""Versions of an instance: which one the catalog describes, decided alike at every peer.

One SOP Instance UID may be held in several versions (other bytes: a correction sent
again, kept as a plain copy where no copy of the first was). The catalog describes the
*first received*, and only its copies are given to retrieval and counted by repair:

- each location keeps the ``stamp`` of the bytes it holds: when the accepting peer
  received them (``facts.Stamps``), written with the fact and carried beside it on the
  wire (``WIRE_KEY``: {seq: stamp}; a batch of an older release, which has none, gives
  its instance row's stamp, ``STAMPS``). A copy recorded without one -- repair, drain,
  scrub, hand-off, a crawl: bytes read back from an archive -- takes the stamp of the
  other copies of the same bytes (``LOCATION_SQL``);
- the current version is the least (stamp, sha256) among the instance's versions whose
  hash is known, a version's stamp being the least non-zero one of its copies (0 if
  none: bytes of before the stamps, a crawled archive's own -- the earliest; a copy of
  known bytes recorded without a stamp, as a rebuilt catalog's, does not make them so): a
  function of the locations alone, so peers that hold the same facts decide alike,
  whatever order they learned them in;
- ``versions`` lists the instances held in more than one version, with the current
  one's hash, kept by triggers on ``locations`` inside the transaction that writes a
  location (an index seek per write; a recount only for an instance with two hashes).
  An instance not in it has one version: every copy is current. Bytes received with
  one stamp are one version whatever their hashes (``_COUNT``: a data set an adapter
  holds converted). Schema 7.
"""
from __future__ import annotations

import sqlite3

WIRE_KEY = "VERSIONS"          # beside a wire batch's rows: {str(seq): stamp of its bytes}
MAX_STAMP = 2 ** 53

# (uid, archive, peer, sha256, size, seq, stamp): a stamp of 0 takes that of the bytes'
# other copies, if any is known; the same bytes recorded again there (a data set sent
# again: a duplicate) keep their first stamp (else a version sent again became later);
# an older fact of the same bytes there gives its stamp to a copy recorded without one
# (a rebuilt catalog's copy, its fact of before pulled back: else, the only copy of a
# second version, it made that version the first at the rebuilt peer)
_NEWER = "excluded.seq > locations.seq"
LOCATION_SQL = (
    "INSERT INTO locations (SOPInstanceUID, archive, peer, sha256, size, available, seq, "
    "stamp) VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, CASE WHEN ?7 > 0 THEN ?7 ELSE coalesce(("
    "SELECT min(m.stamp) FROM locations m WHERE m.SOPInstanceUID = ?1 AND m.sha256 = ?4 "
    "AND ?4 != '' AND m.stamp > 0), 0) END) ON CONFLICT(SOPInstanceUID, peer, archive) DO "
    f"UPDATE SET sha256 = iif({_NEWER}, excluded.sha256, locations.sha256), size = "
    f"iif({_NEWER}, excluded.size, locations.size), available = iif({_NEWER}, 1, "
    "locations.available), seq = max(locations.seq, excluded.seq), stamp = CASE WHEN "
    f"NOT {_NEWER} THEN excluded.stamp WHEN locations.sha256 = excluded.sha256 AND "
    "locations.size >= 0 AND locations.stamp > 0 AND (excluded.stamp = 0 OR "
    "locations.stamp < excluded.stamp) THEN locations.stamp ELSE excluded.stamp END "
    f"WHERE {_NEWER} OR (locations.stamp = 0 AND excluded.stamp > 0 AND "
    "locations.sha256 = excluded.sha256 AND locations.sha256 != '' AND locations.size >= 0)")

_KNOWN = "size >= 0 AND sha256 != ''"
_OTHER = ("EXISTS (SELECT 1 FROM locations m WHERE m.SOPInstanceUID = new.SOPInstanceUID "
          "AND m.size >= 0 AND m.sha256 != '' AND m.sha256 != new.sha256)")
_LISTED = "EXISTS (SELECT 1 FROM versions WHERE SOPInstanceUID = {r}.SOPInstanceUID)"
# the current version of the instance {uid} (an SQL expression)
_CURRENT = (f"(SELECT sha256 FROM locations WHERE SOPInstanceUID = {{uid}} AND {_KNOWN} "
            "GROUP BY sha256 ORDER BY coalesce(min(nullif(stamp, 0)), 0), sha256 LIMIT 1)")
# how many versions the instance {uid} is held in: one per stamp its bytes were received
# with -- a data set received once and held converted by an adapter (the dimse one
# decompresses for an archive taking no compressed syntax) is other bytes of one
# version --, one per bytes of no stamp known
_COUNT = (f"(SELECT count(DISTINCT CASE WHEN s > 0 THEN CAST(s AS TEXT) ELSE sha256 END) "
          f"FROM (SELECT sha256, coalesce(min(nullif(stamp, 0)), 0) AS s FROM locations "
          f"WHERE SOPInstanceUID = {{uid}} AND {_KNOWN} GROUP BY sha256))")
_RECOUNT = (
    "DELETE FROM versions WHERE SOPInstanceUID = {r}.SOPInstanceUID; "
    "INSERT INTO versions SELECT {r}.SOPInstanceUID, " +
    _CURRENT.format(uid="{r}.SOPInstanceUID") + " WHERE " +
    _COUNT.format(uid="{r}.SOPInstanceUID") + " > 1;")
_TRIGGERS = {
    "versions_insert": f"AFTER INSERT ON locations WHEN new.size >= 0 AND new.sha256 != '' "
                       f"AND {_OTHER} BEGIN {_RECOUNT.format(r='new')} END",
    "versions_update": f"AFTER UPDATE OF sha256, size, stamp ON locations WHEN "
                       f"{_LISTED.format(r='new')} OR (new.size >= 0 AND new.sha256 != '' "
                       f"AND {_OTHER}) BEGIN {_RECOUNT.format(r='new')} END",
    "versions_delete": f"AFTER DELETE ON locations WHEN {_LISTED.format(r='old')} BEGIN "
                       f"{_RECOUNT.format(r='old')} END",
}


def create_schema(conn: sqlite3.Connection) -> None:
    """``locations.stamp``, ``versions`` and its triggers; on a catalog of before (schema
    6 or older) the instances already held in two versions listed in one pass, all or
    nothing (a crash before its commit: done again at the next start)."""
    if not any(r[1] == "stamp" for r in conn.execute("PRAGMA table_info(locations)")):
        conn.execute("ALTER TABLE locations ADD COLUMN stamp INTEGER NOT NULL DEFAULT 0")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                    "'versions'").fetchone():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE versions (SOPInstanceUID TEXT PRIMARY KEY, sha256 TEXT "
                     "NOT NULL) WITHOUT ROWID")
        for name, body in _TRIGGERS.items():
            conn.execute(f"CREATE TRIGGER {name} {body}")
        conn.execute(
            "INSERT INTO versions SELECT g.SOPInstanceUID, " +
            _CURRENT.format(uid="g.SOPInstanceUID") + f" FROM (SELECT SOPInstanceUID FROM "
            f"locations WHERE {_KNOWN} GROUP BY SOPInstanceUID HAVING count(DISTINCT "
            "sha256) > 1) g WHERE " + _COUNT.format(uid="g.SOPInstanceUID") + " > 1")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def row(loc: tuple, stamp: int) -> tuple:
    """A location tuple (uid, archive, peer, sha256, size, seq[, stamp]) for
    ``LOCATION_SQL``: *stamp* unless it carries its own."""
    return tuple(loc[:6]) + ((loc[6] if len(loc) > 6 else stamp),)


def to_wire(facts: list, parents: dict) -> None:
    """Take each fact's last field (its location's stamp) off; the non-zero ones put
    beside the batch's rows (``WIRE_KEY``: always there, so a batch without it is known
    for one of an older release)."""
    parents[WIRE_KEY] = {str(r[0]): s for r in facts if (s := r.pop())}


def from_wire(parents: dict, locs: list, image_stamps: dict, stamp) -> list:
    """*locs* (uid, archive, peer, sha256, size, seq) of a wire batch with their stamps:
    told (``WIRE_KEY``), else -- a batch of an older release -- the instance row's stamp
    its origin sent (``stamp(value)``: bounded as every stamp is)."""
    told = parents.get(WIRE_KEY)
    if told is None:
        return [loc + (stamp(image_stamps.get(loc[0])),) for loc in locs]
    return [loc + (stamp(told.get(str(loc[5]))),) for loc in locs]


def check_wire(parents: dict) -> None:
    told = parents.get(WIRE_KEY, {})
    if not isinstance(told, dict) or not all(
            type(v) is int and 0 <= v < MAX_STAMP for v in told.values()):
        raise ValueError("a batch's version stamps are not integers of 0 to 2^53")


# a location row (alias l) holds another version than the current one: not its hash, nor
# bytes of the same receipt (a copy an adapter holds converted: the same least stamp)
_KEY = ("(SELECT min(m.stamp) FROM locations m WHERE m.SOPInstanceUID = {r}.SOPInstanceUID "
        "AND m.sha256 = {r}.sha256 AND m.size >= 0 AND m.stamp > 0)")
OTHER = ("EXISTS (SELECT 1 FROM versions v WHERE v.SOPInstanceUID = l.SOPInstanceUID AND "
         f"v.sha256 != l.sha256 AND coalesce({_KEY.format(r='l')}, 0) IS NOT "
         f"{_KEY.format(r='v')})")
# the version of a location row (alias l): its bytes' least stamp, else its hash
VERSION = f"coalesce({_KEY.format(r='l')}, l.sha256)"


class Copies(frozenset):
    """The hashes of the current version's copies, and in ``others`` those of each other
    version's (a frozenset each): repair brings every version back to ``replicas``;
    ``kept``: copies this peer keeps beside another version (``copies.work``)."""
    others: tuple = ()
    kept: tuple = ()


def current_copies(conn: sqlite3.Connection, uids: list[str]) -> dict[str, Copies]:
    """{uid: the hashes of the current version's copies (its own, and those of its bytes
    held converted)} for those of *uids* held in several versions (``OTHER``'s rule)."""
    out = {}
    for uid, sha in current(conn, uids).items():
        keys = dict(conn.execute("SELECT sha256, min(nullif(stamp, 0)) FROM locations WHERE "
                                 f"SOPInstanceUID = ? AND {_KNOWN} GROUP BY sha256", (uid,)))
        groups: dict = {}
        for s, k in keys.items():
            groups.setdefault(s if k is None else k, set()).add(s)
        out[uid] = Copies(groups.pop(sha if keys.get(sha) is None else keys[sha], {sha}))
        out[uid].others = tuple(frozenset(g) for _, g in sorted(groups.items(), key=str))
    return out


def current(conn: sqlite3.Connection, uids: list[str]) -> dict[str, str]:
    """{uid: the current version's sha256} for those of *uids* held in several versions."""
    out: dict[str, str] = {}
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out.update(conn.execute(f"SELECT SOPInstanceUID, sha256 FROM versions WHERE "
                                f"SOPInstanceUID IN ({', '.join('?' * len(chunk))})", chunk))
    return out


def count(conn: sqlite3.Connection) -> int:
    """How many instances are held in more than one version (``pacsp2p status``)."""
    return conn.execute("SELECT count(*) FROM versions").fetchone()[0]
