"""ArchiveHealth: ask every archive of this peer whether it answers, every few seconds.

Keeps ``archive.up`` (placement and retrieval route around an archive that is down),
logs each change once, gossips the archives that are down (``archives_down`` of this
peer's member record), and resumes a crawl that a failure had stopped.

``probe``: whether the peer itself can serve (the catalog opens; the data directory's
disk), for ``GET /health`` and ``/metrics`` (``Cluster.health``); run in a thread.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import quote

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger()

HEALTH_EVERY = 5.0        # seconds between two health checks of every archive
HEALTH_TIMEOUT = 10.0


class ArchiveHealth(service.Service):
    name = "health"

    def __init__(self, archives, crawlers, overlay, reactor):
        self.archives, self.crawlers, self.overlay = archives, crawlers, overlay
        self.reactor = reactor
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._checking = False
        self._seen_up: dict[str, bool] = {}      # what was last logged

    def startService(self):
        super().startService()
        self._loop.start(HEALTH_EVERY, now=False)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    @defer.inlineCallbacks
    def check(self):
        if self._checking:
            return
        self._checking = True
        try:
            results = yield defer.DeferredList(
                [self._health_of(a) for a in self.archives], consumeErrors=True)
            changed = False
            for archive, (ok, result) in zip(self.archives, results):
                health = result if ok and isinstance(result, dict) else {
                    "up": False, "error": result.getErrorMessage() if not ok else "?"}
                archive.last_health = dict(health)    # what /metrics shows, no new ask
                changed |= self._note(archive, bool(health.get("up")), health)
            if changed and self.overlay is not None:
                ms = self.overlay.membership
                down = sorted(a.name for a in self.archives if not a.up)
                ms.me = dataclasses.replace(ms.me, archives_down=down)
        finally:
            self._checking = False

    def _note(self, archive, up: bool, health: dict) -> bool:
        """Record *archive*'s state; True if it changed."""
        flipped = up != self._seen_up.get(archive.name, True)
        self._seen_up[archive.name] = up
        if flipped:
            if up:
                log.info("archive {archive} is back", archive=archive.name)
            else:
                log.warn("archive {archive} stopped answering: {err}",
                         archive=archive.name, err=health.get("error", "no answer"))
        archive.up = up
        if up and flipped:
            for crawler in self.crawlers:
                if crawler.archive is archive and crawler.error:
                    crawler.error = None
                    crawler.start()
        return flipped

    def _health_of(self, archive):
        d = defer.maybeDeferred(archive.health)
        d.addTimeout(HEALTH_TIMEOUT, self.reactor)
        return d


def probe(catalog_path: Path, data_dir: Path) -> dict:
    """Thread pool: {"reasons": [why the peer cannot serve], "data_dir_free_bytes",
    "data_dir_size_bytes", "catalog_bytes"}. The catalog must open afresh: a new
    read-only connection reads its schema and a row of its instances (the peer's own
    connections, open since start, would still read a file that is gone or unreadable)."""
    out: dict = {"reasons": []}
    path = Path(catalog_path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if head != b"SQLite format 3\x00":
            raise sqlite3.DatabaseError("not an SQLite database")
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=5,
                               check_same_thread=False)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            conn.execute("SELECT SOPInstanceUID FROM instances LIMIT 1").fetchall()
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as e:
        out["reasons"].append(f"the catalog {path} does not open: "
                              f"{getattr(e, 'strerror', None) or e}")
    try:
        out["catalog_bytes"] = sum(os.stat(f"{path}{s}").st_size for s in ("", "-wal")
                                   if os.path.exists(f"{path}{s}"))
    except OSError:
        pass
    try:
        usage = shutil.disk_usage(data_dir)
        out["data_dir_free_bytes"], out["data_dir_size_bytes"] = usage.free, usage.total
    except OSError as e:
        out["reasons"].append(f"the data directory {data_dir} is not readable: {e.strerror}")
    return out
