"""Rebuild a lost or damaged catalog from what the peer's archives hold.

Crawls every archive that can list its content into a fresh database beside the old
one, then swaps it in atomically; the old file is kept as ``catalog.sqlite.broken``.
Run with the peer stopped (the peer's lock file says whether it runs). Memory stays
bounded whatever the archive's size: an archive's ``walk()`` is a generator (the
embedded archive reads its directories with ``os.scandir``, never listing every file
first) and facts are written 500 at a time.

The files do not say when each instance was received: the rebuilt patient, study and
series rows carry stamp 0 (``facts``), and lose to every stamped row of the other
peers. Where the old file can still be read, its rows' stamps and values (and its
retired rows) are merged into the rebuilt catalog first, so the rows keep the versions
they held (``_old_rows``). Where it cannot, the first start of the peer on the rebuilt
catalog pulls back every fact of its own that the others hold (``overlay.reclaim``, as
for a catalog restored from a backup), and their rows come with them: the stamps, the
tombstones of its own deletions, and the copies the files no longer hold (for scrub).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import json
import sqlite3

from pacsp2p.attributes import TABLES
from pacsp2p.catalog.db import _connect, create_schema, meta_attributes, write_facts
from pacsp2p.catalog.facts import PARENT_LEVELS, merge_rows
from pacsp2p.catalog.rows import level_columns
from pacsp2p.catalog.schema import close_clean


def rebuild(catalog_path: Path, archives, peer_name: str, progress=print,
            count=None) -> int:
    """Rebuild; *progress(text)* gets a line now and then, *count(n)*, if given, the
    instances written so far after each batch (a progress bar's feed)."""
    catalog_path = Path(catalog_path)
    fresh = catalog_path.with_suffix(".rebuild")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    conn = _connect(fresh)
    create_schema(conn)
    total, batch, t0 = 0, [], time.monotonic()
    # Other peers may hold this peer's facts up to some sequence number the lost catalog
    # had issued: restart numbering above anything issued before (milliseconds of the
    # clock), so that anti-entropy sees the rebuilt facts as new.
    base = int(time.time() * 1000)
    for archive in archives:
        if "crawl" in archive.capabilities:
            # a joined archive (crawl(cursor, throttle) through the reactor): the fresh
            # catalog has no crawl state for it, so the peer crawls it again at start
            progress(f"archive {archive.name}: crawled again when the peer starts")
            continue
        if "walk" not in archive.capabilities:
            continue
        skipped: list = [0]         # how many, then the first 5 (path: reason)

        def skip(path, reason, skipped=skipped):
            skipped[0] += 1
            if len(skipped) <= 5:
                skipped.append(f"{path}: {reason}")
        for meta, stored in archive.walk(skipped=skip):
            if stored.conflict:
                conn.execute("INSERT OR IGNORE INTO conflicts VALUES (?, ?, ?, datetime('now'))",
                             (meta.sop_instance_uid, archive.name, stored.sha256))
                continue
            total += 1
            batch.append((meta_attributes(meta), (meta.sop_instance_uid, archive.name,
                                                  peer_name, stored.sha256, stored.size,
                                                  base + total)))
            if len(batch) >= 500:
                write_facts(conn, batch)
                batch = []
                if count is not None:
                    count(total)
                else:
                    progress(f"{total} instances ({total / (time.monotonic() - t0):.0f}/s)")
        if skipped[0]:      # still on the archive, not in the catalog: the admin decides
            progress(f"archive {archive.name}: {skipped[0]} file(s) not read as an instance, "
                     "left on the archive and out of the catalog: " + "; ".join(skipped[1:])
                     + (f"; and {skipped[0] - 5} more" if skipped[0] > 5 else ""))
    if batch:
        write_facts(conn, batch)
    if count is not None:
        count(total)
    if catalog_path.exists():
        kept = _old_rows(conn, catalog_path)
        progress(f"{kept} patient, study and series rows keep their stamps from the old "
                 f"file" if kept >= 0 else "the old file's row stamps cannot be read")
    # at its start the peer pulls back its own facts the others hold (overlay.reclaim)
    conn.execute("INSERT OR REPLACE INTO catalog_meta VALUES ('rebuilt', ?)", (str(base),))
    close_clean(conn, known_good=True)      # just built: the peer need not check it
    if catalog_path.exists():
        os.replace(catalog_path, f"{catalog_path}.broken")
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog_path}{suffix}").unlink(missing_ok=True)
    os.replace(fresh, catalog_path)
    for suffix in ("-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    return total


def _old_rows(conn: sqlite3.Connection, old_path: Path, chunk: int = 500) -> int:
    """Merge the stamped patient, study and series rows of the old file *old_path* (and
    its retired ones) into the rebuilt catalog *conn*, *chunk* at a time; the rows read
    (-1: the file cannot be read at all). What a damaged file yields before an error is
    kept: every row merged is a state the row once held, so a merge never goes back."""
    try:
        old = sqlite3.connect(f"file:{old_path}?mode=ro", uri=True)
    except sqlite3.Error:
        return -1
    n = 0
    try:
        for level in PARENT_LEVELS:
            cols = level_columns(level)
            if "stamp" not in {r[1] for r in old.execute(f"PRAGMA table_info({TABLES[level]})")}:
                continue                            # a file of before schema 5: no stamps
            queries = [f"SELECT {', '.join(cols)}, stamp FROM {TABLES[level]} WHERE stamp > 0"]
            if old.execute("SELECT 1 FROM sqlite_master WHERE name = 'gone_rows'").fetchone():
                queries.append(f"SELECT row, stamp FROM gone_rows WHERE level = '{level}'")
            for query in queries:
                cursor = old.execute(query)
                while rows := cursor.fetchmany(chunk):
                    if len(rows[0]) == 2:            # gone_rows: [values] as JSON
                        rows = [json.loads(r[0]) + [r[1]] for r in rows]
                    rows = [list(r) for r in rows if len(r) == len(cols) + 1 and
                            type(r[-1]) is int]
                    merge_rows(conn, {level: rows})
                    n += len(rows)
    except (sqlite3.Error, ValueError):
        return n if n else -1
    finally:
        old.close()
    return n
