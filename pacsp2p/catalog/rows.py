"""Patient, study and series rows as last-writer-wins registers that never forget:
retired rows (``gone_rows``) and the rows of before the stamps, announced once.

A row's state (stamp, values) must only grow, as the state of a state-based CRDT does
(the LWW-register's join: Shapiro, Preguica, Baquero & Zawirski, "Conflict-free
replicated data types", SSS 2011); a peer that forgot it and then learns an older
version takes that version, while one that remembered keeps the newer. So:

- **retire**: a row left without children (its last instance hidden by a tombstone, its
  instances or studies moved under another key, or made by a version that lost) leaves
  the view (C-FIND never answers an empty patient, study or series) and its stamp and
  values go to ``gone_rows``; written again, it starts from there (``ghosts``). The
  rows to look at are those the triggers of ``create_schema`` list in ``row_checks``
  (a row inserted, the old parent of a row moved), settled last in the transaction
  that wrote them (``settle``). Like tombstones, retired rows are kept for ever (one
  small row per patient, study or series ever emptied).
- **reannounce**: rows written before schema 5 carry stamp 0, and two peers may hold
  two versions of one (each kept the one it applied last). Once, at the first start of
  schema 6, each peer writes one fact of its own for every series whose row has stamp
  0 — an announcement: no copy, its instance's rows as this peer holds them — so every
  peer pulls every peer's version and keeps the greater values (``facts``: equal
  stamps, the greater values). A peer of an older release keeps the fact as a location
  that is no copy (``size`` < 0, as a tombstone marker's). The rows an older release
  left without children (a patient whose study moved) are retired then too.
"""

from __future__ import annotations

import json
import sqlite3
import time

from twisted.logger import Logger

from pacsp2p.attributes import PARENT, TABLES, UNIQUE, columns

log = Logger()
PARENT_LEVELS = ("PATIENT", "STUDY", "SERIES")
WIRE_KEY = "GONE"          # beside a wire batch's parent rows: {level: {key: [values.., stamp]}}
CHILD = {parent: child for child, (parent, _) in PARENT.items()}
STAMP = "stamp"


def level_columns(level: str) -> list[str]:
    """The columns of *level*'s rows as the catalog writes them (the key first)."""
    cols = columns(level)
    if level in PARENT and PARENT[level][1] not in cols:
        cols = cols + [PARENT[level][1]]
    if level == "IMAGE":
        cols = cols + ["TransferSyntaxUID"]
    return cols


_COLUMNS = {level: level_columns(level) for level in PARENT_LEVELS + ("IMAGE",)}

# what the triggers list in row_checks: (trigger, table, event, when, level, key)
_CHECKS = [("row_check_patient", "patients", "INSERT", "", "PATIENT", "new.PatientID"),
           ("row_check_study", "studies", "INSERT", "", "STUDY", "new.StudyInstanceUID"),
           ("row_check_series", "series", "INSERT", "", "SERIES", "new.SeriesInstanceUID"),
           ("row_check_study_moved", "studies", "UPDATE OF PatientID",
            "old.PatientID != new.PatientID", "PATIENT", "old.PatientID"),
           ("row_check_series_moved", "series", "UPDATE OF StudyInstanceUID",
            "old.StudyInstanceUID != new.StudyInstanceUID", "STUDY", "old.StudyInstanceUID"),
           ("row_check_instance_moved", "instances", "UPDATE OF SeriesInstanceUID",
            "old.SeriesInstanceUID != new.SeriesInstanceUID", "SERIES",
            "old.SeriesInstanceUID")]


def create_schema(conn: sqlite3.Connection) -> None:
    """``gone_rows``, ``row_checks`` and the triggers (schema 6; ``IF NOT EXISTS``)."""
    conn.execute("CREATE TABLE IF NOT EXISTS gone_rows (level TEXT NOT NULL, key TEXT NOT "
                 "NULL, stamp INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (level, key))"
                 " WITHOUT ROWID")
    conn.execute("CREATE TABLE IF NOT EXISTS row_checks (level TEXT NOT NULL, key TEXT NOT "
                 "NULL, PRIMARY KEY (level, key)) WITHOUT ROWID")
    for name, table, event, when, level, key in _CHECKS:
        # (not INSERT OR IGNORE: an upsert's conflict clause would override the trigger's)
        conn.execute(
            f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {event} ON {table} "
            f"{'WHEN ' + when if when else ''} BEGIN INSERT INTO row_checks SELECT "
            f"'{level}', {key} WHERE NOT EXISTS (SELECT 1 FROM row_checks WHERE level = "
            f"'{level}' AND key = {key}); END")


def _greater(stamp: int, values: list, old_stamp: int, old_values: list) -> bool:
    """(stamp, values but the key) > the old ones, as the upsert of ``facts`` compares."""
    return [stamp] + values[1:] > [old_stamp] + old_values[1:]


def keep(conn: sqlite3.Connection, level: str, values: list, stamp: int) -> None:
    """Keep a retired row's state (*values*: its columns, key first), or the greater of
    it and the one kept already."""
    values = ["" if v is None else v for v in values]
    old = conn.execute("SELECT stamp, row FROM gone_rows WHERE level = ? AND key = ?",
                       (level, values[0])).fetchone()
    if old is None or _greater(stamp, values, old[0], json.loads(old[1])):
        conn.execute("INSERT OR REPLACE INTO gone_rows VALUES (?, ?, ?, ?)",
                     (level, values[0], stamp, json.dumps(values)))


def retire(conn: sqlite3.Connection, level: str, key) -> None:
    """Retire *level*'s row *key* if it has no child, then its parent likewise."""
    while key is not None and level in CHILD:
        child = CHILD[level]
        if conn.execute(f"SELECT 1 FROM {TABLES[child]} WHERE {PARENT[child][1]} = ? "
                        "LIMIT 1", (key,)).fetchone():
            return                               # a child keeps it
        cols = _COLUMNS[level]
        row = conn.execute(f"SELECT {', '.join(cols)}, {STAMP} FROM {TABLES[level]} WHERE "
                           f"{UNIQUE[level]} = ?", (key,)).fetchone()
        if row is None:
            return
        keep(conn, level, list(row[:-1]), row[-1])
        conn.execute(f"DELETE FROM {TABLES[level]} WHERE {UNIQUE[level]} = ?", (key,))
        up = PARENT.get(level)
        key, level = (row[cols.index(up[1])], up[0]) if up else (None, None)


def retire_instance(conn: sqlite3.Connection, uid: str) -> None:
    """Take instance *uid*'s row out of the view, kept in ``gone_rows`` (its series: what
    ``gone_parents`` finds for a fact of it), then retire its series if left empty."""
    cols = _COLUMNS["IMAGE"]
    row = conn.execute(f"SELECT {', '.join(cols)} FROM instances WHERE SOPInstanceUID = ?",
                       (uid,)).fetchone()
    if row is None:
        return
    conn.execute("INSERT OR REPLACE INTO gone_rows VALUES ('IMAGE', ?, 0, ?)",
                 (uid, json.dumps(["" if v is None else v for v in row])))
    conn.execute("DELETE FROM instances WHERE SOPInstanceUID = ?", (uid,))
    retire(conn, "SERIES", row[cols.index("SeriesInstanceUID")])


def gone_parents(conn: sqlite3.Connection, uids: list[str], series=()) -> dict[str, dict]:
    """{level: {key: [values..., stamp]}}: the series, study and patient rows (as held,
    or as retired) of the instances *uids* whose rows were retired: what a fact of a
    deleted instance carries to a peer that never saw it (``WIRE_KEY``), so that the
    stamp and values it brought are not lost on the peers that learn it late; and of
    the *series* given (those of an instance's versions' rows: ``shown``)."""
    out: dict[str, dict] = {}
    series = set(series)
    for i in range(0, len(uids), 500):
        chunk = uids[i:i + 500]
        for (row,) in conn.execute("SELECT row FROM gone_rows WHERE level = 'IMAGE' AND key "
                                   f"IN ({', '.join('?' * len(chunk))})", chunk):
            series.add(json.loads(row)[_COLUMNS["IMAGE"].index("SeriesInstanceUID")])
    keys, level = series, "SERIES"
    while keys and level is not None:
        cols, rows = _COLUMNS[level], {}
        for key in keys:
            found = conn.execute(f"SELECT {', '.join(cols)}, {STAMP} FROM {TABLES[level]} "
                                 f"WHERE {UNIQUE[level]} = ?", (key,)).fetchone()
            if found is not None:
                rows[key] = ["" if v is None else v for v in found]
                continue
            found = conn.execute("SELECT row, stamp FROM gone_rows WHERE level = ? AND "
                                 "key = ?", (level, key)).fetchone()
            if found is not None:
                rows[key] = json.loads(found[0]) + [found[1]]
        if rows:
            out[level] = rows
        up = PARENT.get(level)
        keys = {r[cols.index(up[1])] for r in rows.values()} if up else set()
        level = up[0] if up else None
    return out


def settle(conn: sqlite3.Connection) -> int:
    """Retire the rows ``row_checks`` lists that have no child (in the writer's
    transaction, last), and empty the list; returns the rows retired (a writer that
    remembers the rows it wrote forgets them then: ``facts.write_facts``)."""
    checks = conn.execute("SELECT level, key FROM row_checks").fetchall()
    if not checks:
        return 0
    conn.execute("DELETE FROM row_checks")
    before = conn.total_changes
    for level in ("SERIES", "STUDY", "PATIENT"):
        for lv, key in checks:
            if lv == level:
                retire(conn, level, key)
    return conn.total_changes - before


def ghosts(conn: sqlite3.Connection, level: str, keys) -> list[list]:
    """The retired rows of *level* among *keys*, as rows [values..., stamp], taken out
    of ``gone_rows``: the caller writes them back before what it writes over them."""
    if conn.execute("SELECT 1 FROM gone_rows LIMIT 1").fetchone() is None:
        return []
    out, keys = [], list(dict.fromkeys(keys))
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        found = conn.execute(f"SELECT key, stamp, row FROM gone_rows WHERE level = ? AND key "
                             f"IN ({', '.join('?' * len(chunk))})", [level, *chunk]).fetchall()
        for key, stamp, row in found:
            out.append(json.loads(row) + [stamp])
            conn.execute("DELETE FROM gone_rows WHERE level = ? AND key = ?", (level, key))
    return out


ANNOUNCE_SIZE = -3      # an announcement fact's size (archive ""): rows to send, no copy


def reannounce(conn: sqlite3.Connection, peer: str, path=None) -> int:
    """If ``catalog_meta`` has the mark ``reannounce`` (and *peer* is named): retire the
    rows an older release left without children (a patient whose study moved), write one
    announcement fact of *peer*'s (archive "", size ``ANNOUNCE_SIZE``: no copy, readers
    of copies take ``size >= 0`` only) for each series whose row has stamp 0, on one of
    its instances that no tombstone names, numbered above every fact of *peer*'s and the
    clock's ms, and take the mark away (one transaction). A fact carries its instance's
    series, study and patient rows as this peer holds them, so every peer pulls this
    peer's version of each, whether or not this peer holds a copy. Returns the facts."""
    if not peer or conn.execute("SELECT 1 FROM catalog_meta WHERE key = 'reannounce'"
                                ).fetchone() is None:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for level in ("SERIES", "STUDY", "PATIENT"):      # left empty by an older release
            child = CHILD[level]
            for (key,) in conn.execute(
                    f"SELECT {UNIQUE[level]} FROM {TABLES[level]} t WHERE NOT EXISTS (SELECT "
                    f"1 FROM {TABLES[child]} c WHERE c.{PARENT[child][1]} = "
                    f"t.{UNIQUE[level]})").fetchall():
                retire(conn, level, key)
        uids = [r[0] for r in conn.execute(
            "SELECT (SELECT min(i.SOPInstanceUID) FROM instances i WHERE "
            "i.SeriesInstanceUID = s.SeriesInstanceUID AND NOT EXISTS (SELECT 1 FROM "
            "tombstones t WHERE t.SOPInstanceUID = i.SOPInstanceUID) AND NOT EXISTS (SELECT "
            "1 FROM locations m WHERE m.SOPInstanceUID = i.SOPInstanceUID AND m.peer = ? AND "
            "m.archive = '')) AS uid FROM series s WHERE s.stamp = 0 AND uid IS NOT NULL",
            (peer,))]
        top = conn.execute("SELECT max(seq) FROM locations WHERE peer = ?",
                           (peer,)).fetchone()[0] or 0
        start = max(top + 1, int(time.time() * 1000))
        conn.executemany("INSERT INTO locations (SOPInstanceUID, archive, peer, sha256, size, "
                         "available, seq) VALUES (?, '', ?, '', ?, 0, ?) ON CONFLICT DO "
                         "NOTHING", [(uid, peer, ANNOUNCE_SIZE, start + i)
                                     for i, uid in enumerate(uids)])
        conn.execute("DELETE FROM catalog_meta WHERE key = 'reannounce'")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    log.info("catalog {path}: {n} series announced (once, after the upgrade to schema 6: "
             "the rows of before go out again)", path=str(path), n=len(uids))
    return len(uids)
