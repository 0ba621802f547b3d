"""ArchiveHealth: ask every archive of this peer whether it answers, every few seconds.

Keeps ``archive.up`` (placement and retrieval route around an archive that is down),
logs each change once, gossips the archives that are down (``archives_down`` of this
peer's member record), and resumes a crawl that a failure had stopped. An archive that
may have lost what it held — up again, or reporting fewer instances than before or than
the catalog's copies there, or seen up for the first time since this peer started with
copies there (wiped, or restored from an old image, while the peer was down) — is named
to ``on_back`` (``transfer.recheck``: a sample of its copies checked).

An archive the catalog holds copies on but the config no longer names (renamed or
removed from ``[[archives]]`` across a restart) is *gone*: said once at start, counted
down for good (gossiped with the others, and in ``gone``, which repair reads), so its
copies are made again elsewhere after ``repair_after`` instead of counting as live.

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

    def __init__(self, archives, crawlers, overlay, reactor, catalog=None, settings=None,
                 gone: set | None = None, on_back=None):
        self.archives, self.crawlers, self.overlay = archives, crawlers, overlay
        self.on_back = on_back
        self.reactor, self.catalog, self.settings = reactor, catalog, settings
        self.gone = gone if gone is not None else set()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = reactor
        self._checking = False
        self._seen_up: dict[str, bool] = {}      # what was last logged
        self._instances: dict[str, int] = {}     # what each archive last said it holds
        self._held_at_start: dict[str, int] = {}  # copies the catalog placed there at start

    def startService(self):
        super().startService()
        self._loop.start(HEALTH_EVERY, now=False)
        if self.catalog is not None and self.settings is not None:
            self.catalog.archive_counts().addCallbacks(self._find_gone, lambda f: log.warn(
                "cannot read the catalog's archives: {err}", err=f.getErrorMessage()))

    def _find_gone(self, counts: dict) -> None:
        me, known = self.settings.peer.name, {a.name for a in self.archives}
        self._held_at_start = {a: n for (p, a), n in counts.items() if p == me}
        gone = {a: n for (p, a), n in counts.items() if p == me and a not in known}
        for name, n in sorted(gone.items()):
            log.warn("archive {name}: {n} copies in the catalog, but no [[archives]] entry "
                     "of {src} names it (renamed or removed?): they count as down, and are "
                     "made again elsewhere after repair_after ({after:g} s); to keep them, "
                     "give the entry its old name back", name=name, n=n,
                     src=self.settings.source, after=self.settings.cluster.repair_after)
        self.gone.update(gone)
        if gone:
            self._publish()

    def _publish(self) -> None:
        if self.overlay is not None:
            ms = self.overlay.membership
            down = sorted({a.name for a in self.archives if not a.up} | self.gone)
            ms.me = dataclasses.replace(ms.me, archives_down=down)

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
            changed, held = False, {}
            if self.catalog is not None and self.settings is not None and any(
                    ok and isinstance(r, dict) and isinstance(r.get("instances"), int)
                    for ok, r in results):           # what the catalog says they hold
                counts = yield self.catalog.archive_counts()
                held = {a: n for (p, a), n in counts.items()
                        if p == self.settings.peer.name}
            for archive, (ok, result) in zip(self.archives, results):
                health = result if ok and isinstance(result, dict) else {
                    "up": False, "error": result.getErrorMessage() if not ok else "?"}
                archive.last_health = dict(health)    # what /metrics shows, no new ask
                changed |= self._note(archive, bool(health.get("up")), health,
                                      held.get(archive.name, 0))
            if changed:
                self._publish()
        finally:
            self._checking = False

    def _note(self, archive, up: bool, health: dict, held: int = 0) -> bool:
        """Record *archive*'s state (*held*: copies the catalog places there); True if it
        changed."""
        # first seen up since this peer started, holding copies from before it started
        first = archive.name not in self._seen_up and \
            self._held_at_start.get(archive.name, 0) > 0
        flipped = up != self._seen_up.get(archive.name, True)
        self._seen_up[archive.name] = up
        n, before = health.get("instances"), self._instances.get(archive.name)
        if isinstance(n, int) and up:
            self._instances[archive.name] = n
        fewer = isinstance(n, int) and (n < held or before is not None and n < before)
        if up and (flipped or fewer or first) and self.on_back is not None:
            self.on_back(archive.name)
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
