"""The catalog's schema: tables, indexes, row counters and the clean-shutdown mark.

``create_schema`` makes a new catalog and brings an existing one up to date at start
(every step ``IF NOT EXISTS``, so it may run again after a crash half-way); a catalog of
a newer schema (a downgrade) is refused untouched (``NewerSchema``):

- the tables (patients, studies, series, instances, locations, conflicts, hints,
  crawl_state) and their indexes, among them the ones C-FIND needs at scale: an
  expression index on ``pn_key(PatientName)`` (person names match without regard to
  case, ``matching`` compares ``pn_key(...)``: ``names``), and indexes on ``StudyDate``
  and ``AccessionNumber``. That index holds keys made with Python's Unicode tables:
  ``catalog_meta`` remembers their version, and a start with other tables rebuilds it;
- ``catalog_counts``: the number of rows of each table (locations: live copies only,
  ``size >= 0``), kept exact by triggers inside the very transaction that inserts or
  deletes rows, so ``/status`` reads seven numbers instead of counting millions of rows.
  Created, filled from ``count(*)`` and armed in one transaction (a crash before its
  commit leaves no counters, and the next start makes them again);
- ``archive_counts``: live copies per (peer, archive), kept the same way (schema 4), so
  placement's balance and ``/status`` never count the locations table (at 10M copies that
  ``GROUP BY`` read the whole table: ~7 s, every 10 s);
- ``stamp`` on patient, study and series rows (schema 5) and instance rows (schema 6):
  the last-writer-wins stamp of the instance whose attributes the row holds
  (``facts``); 0 in the rows of before;
- ``gone_rows``, ``row_checks`` (schema 6): the stamps and values of rows left without
  children, and the rows to look at for that (``rows``); the first start of schema 6 on
  an older catalog marks it ``reannounce`` in ``catalog_meta`` (``rows.reannounce``);
- ``stamp`` of locations, ``versions`` (schema 7): the stamp of the bytes each copy
  holds, and the instances held in several versions with the one the catalog describes
  (``versions``); ``version_rows``: the instance rows of an instance's versions, so its
  row shows the current one's (``shown``);
- ``catalog_meta``: small facts about the file itself, e.g. ``clean``: set when the
  peer stopped cleanly after the catalog was known good, taken away again at start
  (``take_clean_mark``). A start without it runs the integrity check in the background.
"""

from __future__ import annotations

import contextlib
import sqlite3

import sqlite_utils
from twisted.logger import Logger

from pacsp2p.attributes import LEVELS, PARENT, TABLES, UNIQUE, columns
from pacsp2p.catalog import names, rows, shown, versions

log = Logger()

SCHEMA_VERSION = 7          # 2: counters, catalog_meta, upper(PatientName), AccessionNumber
#                             3: pn_key(PatientName) instead of upper(PatientName)
#                             4: archive_counts (live copies per peer and archive)
#                             5: stamp of patient/study/series rows (last writer wins)
#                             6: gone_rows, row_checks and their triggers (``rows``),
#                                stamp of instance rows
#                             7: locations.stamp, versions (``versions``)
NAME_INDEX = "idx_patients_PatientName_key"

# table -> the condition a row must meet to be counted (None: every row); {r} stands for
# the row ("new.", "old.", or nothing in a plain SELECT)
COUNTED = {"patients": None, "studies": None, "series": None, "instances": None,
           "locations": "ifnull({r}size, -1) >= 0", "conflicts": None, "hints": None}


class NewerSchema(Exception):
    """The catalog was written by a newer release: a downgrade, refused (not a damaged
    file: ``catalog rebuild`` is not the remedy)."""


def create_schema(conn: sqlite3.Connection, path=None) -> None:
    """Create or migrate the catalog on *conn* (autocommit mode, as ``db._connect``);
    *path*: the file, named in the log line of a migration. Registers ``pn_key`` on
    *conn* (``names.register``)."""
    names.register(conn)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:        # left as it is: the newer release may run again
        raise NewerSchema(f"catalog {path}: schema {version} was written by a newer pacsp2p "
                          f"release (this one knows up to {SCHEMA_VERSION}): run that release,"
                          f" or restore the data directory saved before the upgrade "
                          f"(docs/upgrading.md)")
    if 0 < version < SCHEMA_VERSION:
        log.info("catalog {path}: schema {old} -> {new} (new indexes and row counters; "
                 "once, may take a while on a large catalog)", path=str(path),
                 old=version, new=SCHEMA_VERSION)
    db = sqlite_utils.Database(conn)
    for level in LEVELS:
        cols = {c: str for c in columns(level)}
        if level in PARENT:
            cols[PARENT[level][1]] = str
        if level == "IMAGE":
            cols.update(TransferSyntaxUID=str)
        table = db[TABLES[level]]
        if not table.exists():
            table.create(cols, pk=UNIQUE[level], defaults={c: "" for c in cols})
        if "stamp" not in table.columns_dict:
            # (schema 5, instances 6; an ALTER of the schema only: no row rewritten)
            conn.execute(f"ALTER TABLE {TABLES[level]} ADD COLUMN stamp INTEGER NOT NULL "
                         "DEFAULT 0")
    for level, (parent, key) in PARENT.items():
        db[TABLES[level]].create_index([key], if_not_exists=True)
    db["studies"].create_index(["StudyDate"], if_not_exists=True)
    db["studies"].create_index(["AccessionNumber"], if_not_exists=True)
    db["patients"].create_index(["PatientName"], if_not_exists=True)
    # what matching compares for person names: pn_key(PatientName) = ?, and a prefix
    # range (>= 'DOE' AND < 'DOF') for DOE*; a plain index cannot serve either
    conn.execute(f"CREATE INDEX IF NOT EXISTS {NAME_INDEX} "
                 f"ON patients ({names.SQL_FUNCTION}(PatientName))")
    conn.execute("DROP INDEX IF EXISTS idx_patients_upper_PatientName")     # schema 2
    if not db["locations"].exists():
        db["locations"].create(
            {"SOPInstanceUID": str, "archive": str, "peer": str, "sha256": str,
             "size": int, "available": int, "seq": int},
            pk=("SOPInstanceUID", "peer", "archive"), defaults={"seq": 0, "available": 1})
    # (no query reads locations by archive alone: every one names the instance or the
    # peer first; the index cost each copy's insert a WAL page, ~10 us)
    conn.execute("DROP INDEX IF EXISTS idx_locations_archive")
    db["locations"].create_index(["peer", "seq"], if_not_exists=True)
    versions.create_schema(conn)
    if not db["conflicts"].exists():
        db["conflicts"].create(
            {"SOPInstanceUID": str, "archive": str, "sha256": str, "seen": str},
            pk=("SOPInstanceUID", "archive", "sha256"))
    if not db["hints"].exists():     # hinted hand-off: copies owed to an archive (local)
        db["hints"].create({"SOPInstanceUID": str, "peer": str, "archive": str,
                            "created": str, "via_peer": str, "via_archive": str},
                           pk=("SOPInstanceUID", "peer", "archive"))
    elif "via_peer" not in db["hints"].columns_dict:
        db["hints"].add_column("via_peer", str)
        db["hints"].add_column("via_archive", str)
    if not db["crawl_state"].exists():   # joining an archive: where its crawl stands
        db["crawl_state"].create({"archive": str, "cursor": str, "done": int,
                                  "finished": int, "since": str}, pk="archive")
    conn.execute("CREATE TABLE IF NOT EXISTS catalog_meta "
                 "(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    rows.create_schema(conn)
    shown.create_schema(conn)
    if 0 < version < 6 and conn.execute("SELECT 1 FROM series LIMIT 1").fetchone():
        conn.execute("INSERT OR REPLACE INTO catalog_meta VALUES ('reannounce', '1')")
    _name_keys_current(conn, path)
    _create_counters(conn)
    _create_archive_counts(conn)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _missing(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is None


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection):
    """One write transaction: committed at the end of the block, rolled back (unless
    SQLite did already) on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _create_counters(conn: sqlite3.Connection) -> None:
    """``catalog_counts`` and its triggers, filled from ``count(*)``: all or nothing."""
    if not _missing(conn, "catalog_counts"):
        return
    with _immediate(conn):
        conn.execute("CREATE TABLE catalog_counts (name TEXT PRIMARY KEY, "
                     "n INTEGER NOT NULL) WITHOUT ROWID")
        for table, cond in COUNTED.items():
            bump = "UPDATE catalog_counts SET n = n {op} 1 WHERE name = '" + table + "'"
            new = f" WHEN {cond.format(r='new.')}" if cond else ""
            old = f" WHEN {cond.format(r='old.')}" if cond else ""
            conn.execute(f"CREATE TRIGGER count_{table}_insert AFTER INSERT ON {table}"
                         f"{new} BEGIN {bump.format(op='+')}; END")
            conn.execute(f"CREATE TRIGGER count_{table}_delete AFTER DELETE ON {table}"
                         f"{old} BEGIN {bump.format(op='-')}; END")
            if cond:                      # a live copy becomes a tombstone, or back
                conn.execute(
                    f"CREATE TRIGGER count_{table}_update AFTER UPDATE OF size ON {table} "
                    f"WHEN ({cond.format(r='old.')}) != ({cond.format(r='new.')}) BEGIN "
                    f"UPDATE catalog_counts SET n = n + (CASE WHEN {cond.format(r='new.')} "
                    f"THEN 1 ELSE -1 END) WHERE name = '{table}'; END")
            where = f" WHERE {cond.format(r='')}" if cond else ""
            conn.execute(f"INSERT INTO catalog_counts VALUES (?, (SELECT count(*) FROM "
                         f"{table}{where}))", (table,))


# live copies per (peer, archive): a row made at a copy's first insert, bumped by every
# insert, tombstone (size -1), copy back and delete of a live copy (``LIVE``)
LIVE = COUNTED["locations"]
# (not INSERT OR IGNORE: the conflict clause of the statement that fired the trigger, an
# upsert, overrides the trigger's own)
_BUMP = ("INSERT INTO archive_counts SELECT {r}peer, {r}archive, 0 WHERE NOT EXISTS (SELECT "
         "1 FROM archive_counts WHERE peer = {r}peer AND archive = {r}archive); "
         "UPDATE archive_counts SET n = n {op} WHERE peer = {r}peer AND archive = {r}archive;")
_ARCHIVE_TRIGGERS = {
    "archive_count_insert": f"AFTER INSERT ON locations WHEN {LIVE.format(r='new.')} BEGIN "
                            f"{_BUMP.format(r='new.', op='+ 1')} END",
    "archive_count_delete": f"AFTER DELETE ON locations WHEN {LIVE.format(r='old.')} BEGIN "
                            f"{_BUMP.format(r='old.', op='- 1')} END",
    "archive_count_update": (
        f"AFTER UPDATE OF size ON locations WHEN ({LIVE.format(r='old.')}) != "
        f"({LIVE.format(r='new.')}) BEGIN " + _BUMP.format(
            r="new.", op=f"+ (CASE WHEN {LIVE.format(r='new.')} THEN 1 ELSE -1 END)") +
        " END"),
}


def _create_archive_counts(conn: sqlite3.Connection) -> None:
    """``archive_counts`` and its triggers, filled by one ``GROUP BY`` (the migration to
    schema 4: once), all or nothing, as ``_create_counters``."""
    if not _missing(conn, "archive_counts"):
        return
    with _immediate(conn):
        conn.execute("CREATE TABLE archive_counts (peer TEXT NOT NULL, archive TEXT NOT NULL,"
                     " n INTEGER NOT NULL, PRIMARY KEY (peer, archive)) WITHOUT ROWID")
        for name, body in _ARCHIVE_TRIGGERS.items():
            conn.execute(f"CREATE TRIGGER {name} {body}")
        conn.execute(f"INSERT INTO archive_counts SELECT peer, archive, count(*) FROM "
                     f"locations WHERE {LIVE.format(r='')} GROUP BY peer, archive")


def read_archive_counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    """Live copies per (peer, archive) as the triggers keep them (no empty ones)."""
    return {(p, a): n for p, a, n in conn.execute(
        "SELECT peer, archive, n FROM archive_counts WHERE n > 0")}


def _name_keys_current(conn: sqlite3.Connection, path) -> None:
    """Rebuild the name index if its keys were made with other Unicode tables (another
    Python): a name with a character new to them would be filed under another key."""
    row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'unicode'").fetchone()
    if row is not None and row[0] == names.UNICODE_VERSION:
        return
    if row is not None:
        log.info("catalog {path}: Unicode {old} -> {new}: the person-name index is "
                 "rebuilt", path=str(path), old=row[0], new=names.UNICODE_VERSION)
        conn.execute(f"REINDEX {NAME_INDEX}")
    conn.execute("INSERT OR REPLACE INTO catalog_meta VALUES ('unicode', ?)",
                 (names.UNICODE_VERSION,))


def read_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """The row counts the triggers keep: {table: rows} (locations: live copies)."""
    return dict(conn.execute("SELECT name, n FROM catalog_counts"))


def take_rebuilt_mark(conn: sqlite3.Connection) -> bool:
    """True if ``catalog rebuild`` made this file and no peer has opened it since (the
    mark is taken away, committed): the peer pulls back every fact of its own the others
    hold (``overlay.reclaim``), and with them their rows' stamps (``rebuild``)."""
    with _immediate(conn):
        row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'rebuilt'").fetchone()
        conn.execute("DELETE FROM catalog_meta WHERE key = 'rebuilt'")
    return row is not None


def take_clean_mark(conn: sqlite3.Connection) -> bool:
    """True if the catalog was closed cleanly after it was known good; the mark is taken
    away (committed) so that a crash from now on leaves no mark."""
    with _immediate(conn):
        row = conn.execute("SELECT value FROM catalog_meta WHERE key = 'clean'").fetchone()
        conn.execute("DELETE FROM catalog_meta WHERE key = 'clean'")
    return row is not None


def close_clean(conn: sqlite3.Connection, known_good: bool) -> None:
    """Close the writer's connection at a clean stop: the mark (if the catalog was known
    good: checked this run, or closed cleanly before it), a checkpoint that moves the
    WAL into the database file and truncates it, then close."""
    if known_good:
        conn.execute("INSERT OR REPLACE INTO catalog_meta VALUES ('clean', "
                     "datetime('now'))")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
