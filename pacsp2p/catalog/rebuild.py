"""Rebuild a lost or damaged catalog from what the peer's archives hold.

Crawls every archive that can list its content into a fresh database beside the old
one, then swaps it in atomically; the old file is kept as ``catalog.sqlite.broken``.
Run with the peer stopped (the peer's lock file says whether it runs). Memory stays
bounded whatever the archive's size: an archive's ``walk()`` is a generator (the
embedded archive reads its directories with ``os.scandir``, never listing every file
first) and facts are written 500 at a time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pacsp2p.catalog.db import _connect, create_schema, meta_attributes, write_facts
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
        for meta, stored in archive.walk():
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
    if batch:
        write_facts(conn, batch)
    if count is not None:
        count(total)
    close_clean(conn, known_good=True)      # just built: the peer need not check it
    if catalog_path.exists():
        os.replace(catalog_path, f"{catalog_path}.broken")
    for suffix in ("-wal", "-shm"):
        Path(f"{catalog_path}{suffix}").unlink(missing_ok=True)
    os.replace(fresh, catalog_path)
    for suffix in ("-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    return total
