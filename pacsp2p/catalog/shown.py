"""The instance row C-FIND answers describes the current version (``versions``).

An instance row is a last-writer-wins register (``facts``): alone it would hold the
attributes of the LATEST version received, while retrieval sends the current one, the
first received. So the catalog keeps every version's row, keyed by its stamp:

- ``version_rows`` (uid, stamp, row): the rows of an instance's versions, written by a
  trigger on ``instances`` whenever a row of another stamp meets the one held (both
  kept; ``settle`` forgets those of no version held: the same bytes received again,
  and all of them once one version is left); equal stamps keep the greater row.
  They travel beside a sync batch's facts (``WIRE_KEY``: {uid: {stamp: row}}), since a
  fact carries the row its origin shows, not that of its own version;
- ``settle``, last in the transaction that wrote rows or locations, makes the row of
  each instance listed there the row of its current version (the least (stamp, sha256)
  among its live copies): a function of the facts, so every peer shows the same row,
  whatever order it learned them in. A delete followed by a resend converges: the
  tombstone takes the old version's copies, the resend's version becomes current and
  its row shown (first-writer-wins on the row alone kept the deleted version's where
  the resend came first). A row whose series was retired (a version in another series)
  brings its series, study and patient rows back from ``gone_rows``;
- an instance hidden (no live copy: ``tombstones.hide``) forgets its versions' rows.
Schema 7 (``IF NOT EXISTS``: a catalog of schema 7 from before gets them at its start;
the rows of the versions it already holds come with their next facts).
"""
from __future__ import annotations

import json
import sqlite3

from pacsp2p.attributes import PARENT, TABLES, UNIQUE
from pacsp2p.catalog import rows, versions
from pacsp2p.validate import VALUE_MAX, clipped

WIRE_KEY = "VROWS"        # beside a wire batch's rows: {uid: {str(stamp): [row values]}}
MAX_VERSIONS = 16         # rows of one instance taken from one batch
COLS = rows.level_columns("IMAGE")
_SERIES = COLS.index("SeriesInstanceUID")
_VALUES = ", ".join(f"ifnull({{r}}.{c}, '')" for c in COLS)
_KEEP = ("INSERT INTO version_rows SELECT {r}.SOPInstanceUID, {r}.stamp, json_array(" +
         _VALUES + ") {tail} ON CONFLICT DO UPDATE SET row = excluded.row "
         "WHERE excluded.row > version_rows.row;")
_TRIGGER = (
    "CREATE TRIGGER IF NOT EXISTS version_rows_keep BEFORE INSERT ON instances WHEN "
    "new.stamp > 0 AND EXISTS (SELECT 1 FROM instances o WHERE o.SOPInstanceUID = "
    "new.SOPInstanceUID AND o.stamp > 0 AND o.stamp != new.stamp) BEGIN " +
    _KEEP.format(r="o", tail="FROM instances o WHERE o.SOPInstanceUID = "
                 "new.SOPInstanceUID") + " " +
    _KEEP.format(r="new", tail="WHERE 1") + " END")
# the versions' rows a batch carries of instance ?1: each version's held here (the least
# stamp of each hash's live copies), at most MAX_VERSIONS -- not every receipt's row (the
# same bytes sent again 17 times made every batch with a fact of it refused at every peer)
_TOLD = ("SELECT stamp, row FROM version_rows WHERE SOPInstanceUID = ?1 AND stamp IN ("
         "SELECT min(nullif(stamp, 0)) FROM locations WHERE SOPInstanceUID = ?1 AND size >= 0 "
         f"GROUP BY sha256) ORDER BY stamp LIMIT {MAX_VERSIONS}")
# the rows of instance ?1 kept no longer: of no version held here (another receipt of
# the same bytes: a duplicate; a version deleted), all of them once one version is left
_PRUNE = ("DELETE FROM version_rows WHERE SOPInstanceUID = ?1 AND ((SELECT count(DISTINCT "
          "k) FROM (SELECT min(nullif(stamp, 0)) AS k FROM locations WHERE SOPInstanceUID = "
          "?1 AND size >= 0 GROUP BY sha256)) < 2 OR stamp NOT IN (SELECT min(nullif(stamp, "
          "0)) FROM locations WHERE SOPInstanceUID = ?1 AND size >= 0 GROUP BY sha256))")
# the current version's stamp of instance ?1 (0: none known)
_WANTED = ("SELECT coalesce(min(nullif(stamp, 0)), 0) FROM locations WHERE "
           "SOPInstanceUID = ?1 AND size >= 0 AND sha256 = " +
           versions._CURRENT.format(uid="?1"))


def create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS version_rows (SOPInstanceUID TEXT NOT NULL, "
                 "stamp INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (SOPInstanceUID, "
                 "stamp)) WITHOUT ROWID")
    conn.execute(_TRIGGER)


def _listed(conn: sqlite3.Connection, uids) -> list[str]:
    """Those of *uids* with versions' rows (none at all: one seek)."""
    if conn.execute("SELECT 1 FROM version_rows LIMIT 1").fetchone() is None:
        return []
    uids, out = list(set(uids)), []
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        out += [r[0] for r in conn.execute(
            "SELECT DISTINCT SOPInstanceUID FROM version_rows WHERE SOPInstanceUID IN "
            f"({', '.join('?' * len(chunk))})", chunk)]
    return out


def settle(conn: sqlite3.Connection, written, locations) -> None:
    """Show the current version's row for the instances of rows *written* and of
    *locations* (copies recorded or removed: each uid first) held in several versions'
    rows; in the writer's transaction, before ``rows.settle``. Then forget the rows of
    no version held (``_PRUNE``)."""
    for uid in _listed(conn, [r[0] for r in written] + [loc[0] for loc in locations]):
        want = conn.execute(_WANTED, (uid,)).fetchone()[0]
        held = conn.execute("SELECT stamp FROM instances WHERE SOPInstanceUID = ?",
                            (uid,)).fetchone()
        found = None if not want or held is None or held[0] == want else conn.execute(
            "SELECT row FROM version_rows WHERE SOPInstanceUID = ? AND stamp = ?",
            (uid, want)).fetchone()          # (none: no stamp known, hidden, or shown)
        if found is not None:
            values = json.loads(found[0])
            conn.execute(f"UPDATE instances SET {', '.join(f'{c} = ?' for c in COLS[1:])}, "
                         "stamp = ? WHERE SOPInstanceUID = ?", values[1:] + [want, uid])
            _parents(conn, "SERIES", values[_SERIES])
        conn.execute(_PRUNE, (uid,))


def _parents(conn: sqlite3.Connection, level: str, key) -> None:
    """Bring *level*'s row *key* back from ``gone_rows`` if it is not held, then its
    parent likewise (a version's row shown again under a series retired meanwhile)."""
    while key and level:
        table, cols = TABLES[level], rows.level_columns(level)
        if conn.execute(f"SELECT 1 FROM {table} WHERE {UNIQUE[level]} = ?",
                        (key,)).fetchone():
            return
        ghost = rows.ghosts(conn, level, [key])
        if not ghost:
            return
        conn.execute(f"INSERT INTO {table} ({', '.join(cols)}, stamp) VALUES "
                     f"({', '.join('?' * (len(cols) + 1))})", ghost[0])
        up = PARENT.get(level)
        key, level = (ghost[0][cols.index(up[1])], up[0]) if up else (None, None)


def to_wire(conn: sqlite3.Connection, uids, parents: dict) -> list[str]:
    """Put the versions' rows of *uids* beside a batch (``WIRE_KEY``, only if any);
    returns their series (the batch carries their rows too: ``rows.gone_parents``)."""
    told: dict[str, dict] = {}
    for uid in _listed(conn, uids):
        told[uid] = {str(s): json.loads(r) for s, r in conn.execute(_TOLD, (uid,))}
    if told:
        parents[WIRE_KEY] = told
    return sorted({row[_SERIES] for rows_ in told.values() for row in rows_.values()})


def check_wire(parents: dict) -> None:
    """Refuse a batch whose versions' rows are not rows of their instance (at most
    ``MAX_VERSIONS`` each); values longer than ``VALUE_MAX`` are cut, as a fact's."""
    told = parents.get(WIRE_KEY, {})
    if not isinstance(told, dict) or not all(
            isinstance(by, dict) and len(by) <= MAX_VERSIONS and all(
                k.isdigit() and int(k) < versions.MAX_STAMP and isinstance(row, list) and
                len(row) == len(COLS) and all(type(v) is str for v in row) and row[0] == uid
                for k, row in by.items()) for uid, by in told.items()):
        raise ValueError("a batch's versions' rows are not rows of their instance")
    for by in told.values():
        for row in by.values():
            row[:] = [v if len(v) <= VALUE_MAX else clipped(v)[:VALUE_MAX] for v in row]


def from_wire(parents: dict, stamp, written) -> list:
    """[(uid, [row values..., stamp])] of a batch's versions' rows (``stamp(value)``:
    bounded as every stamp is) for the instance rows' writer: of the instances *written*
    only (whose row the batch carries: not of one its origin holds no live copy of)."""
    return [(uid, list(row) + [stamp(int(k))]) for uid, by in
            (parents.get(WIRE_KEY) or {}).items() if uid in written for k, row in by.items()]
