"""Example adapter: a read-only archive over a directory of DICOM Part-10 files.

A directory that already holds studies (a CD import, an old file-based archive, a
research export) joins the cluster without a single file being copied: the peer crawls
it into its catalog, gossips what it found, and serves it to C-FIND, C-MOVE and C-GET.

    [[archives]]
    name = "old-exports"
    adapter = "plugins/folder_archive.py:FolderArchive"   # relative to this config file
    path = "/srv/exports"        # required: the directory, searched recursively
    page = 200                   # optional: files read per crawl page
    crawl_qps = 100              # optional: crawl pages per second at most

Capabilities: ``open`` and ``crawl`` only. New instances are never placed here (no
``store``), and files added after the crawl are not followed (no ``changes``).
Files that are not DICOM, or whose SOP Instance UID is not a valid UID (PS3.5 §9.1),
are skipped. ``open`` takes a valid UID only, and opens only a file it found by crawling
whose real path is inside the directory (a symlink pointing out is refused): a UID is
never made into a path. ``health`` says whether the directory exists.
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pacsp2p.adapters import config_where
from pacsp2p.adapters.interface import IArchive, ICrawls, IOpens
from pacsp2p.config import ConfigError
from pacsp2p.dicom.header import BadDataset, read_meta
from pacsp2p.validate import InvalidUID, check_uid, is_uid

log = Logger()
KNOWN_KEYS = ("path", "page", "crawl_qps")


@implementer(IArchive, IOpens, ICrawls)
class FolderArchive:
    capabilities = frozenset({"open", "crawl"})
    up = True                                   # kept by the peer's health loop

    def __init__(self, name, root, reactor, site=None, page=200, crawl_qps=100.0):
        self.name, self.site, self.reactor = name, site, reactor
        self.root, self.page, self.crawl_qps = Path(root), int(page), float(crawl_qps)
        self._pool = ThreadPool(1, 4, f"archive-{name}")
        self._files: list[str] | None = None    # sorted relative paths, listed once
        self._paths: dict[str, Path] = {}       # SOP Instance UID -> file

    @classmethod
    def from_config(cls, cfg, settings, reactor, catalog=None):
        where = config_where(cfg, settings)     # "FILE: archives[i]"
        opts = dict(cfg.options)
        for key in opts:
            if key not in KNOWN_KEYS:
                raise ConfigError(f"{where}.{key}: unknown key for adapter FolderArchive "
                                  f"(known: name, adapter, site, {', '.join(KNOWN_KEYS)})")
        if not isinstance(opts.get("path"), str):
            raise ConfigError(f"{where}.path: required (the directory of DICOM files)")
        for key in ("page", "crawl_qps"):
            value = opts.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{where}.{key}: must be a positive number")
        root = Path(opts["path"]).expanduser()
        if not root.is_absolute():              # relative to the config file
            root = Path(settings.source).resolve().parent / root
        return cls(cfg.name, root, reactor, cfg.site, opts.get("page", 200),
                   opts.get("crawl_qps", 100.0))

    def _run(self, fn, *args):                  # blocking work: our own thread pool
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    def start(self):
        self._pool.start()
        if not self.root.is_dir():              # the peer refuses to start, naming us
            return defer.fail(FileNotFoundError(f"{self.root} is not a directory"))
        return defer.succeed(None)

    def stop(self):
        self._pool.stop()

    def health(self):
        def check():
            t0 = time.monotonic()
            if not self.root.is_dir():
                return {"up": False, "error": f"{self.root} is not a directory"}
            return {"up": True, "latency_ms": round((time.monotonic() - t0) * 1000, 2),
                    "free_bytes": shutil.disk_usage(self.root).free}
        return self._run(check)

    # -- crawl: one page of files after the cursor (the last relative path done) ------
    @defer.inlineCallbacks
    def crawl(self, cursor, throttle):
        if self._files is None or cursor is None:
            self._files = yield self._run(self._list)
        start = bisect.bisect_right(self._files, cursor) if cursor else 0
        names = self._files[start:start + self.page]
        yield throttle()
        items = yield self._run(self._read_page, names)
        done = start + len(names) >= len(self._files)
        return items, (None if done else names[-1]), len(self._files)

    def _list(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                      if p.is_file())

    def _read_page(self, names) -> list:
        items = []
        for name in names:
            path = self.root / name
            try:
                meta = read_meta(path)
            except (BadDataset, OSError):
                continue                        # not DICOM (a DICOMDIR, a README...)
            if not is_uid(meta.sop_instance_uid):
                continue                        # never offered, never opened
            self._paths[meta.sop_instance_uid] = path
            items.append((meta, path.stat().st_size))
        return items

    # -- open: the file itself ------------------------------------------------------
    def open(self, sop_instance_uid, sha256=None):
        try:
            check_uid(sop_instance_uid, "SOP Instance UID")
        except InvalidUID as e:
            return defer.fail(e)

        return self._run(self._open, sop_instance_uid)

    def _open(self, uid):
        """Blocking: the file of a valid *uid*, found by crawling, inside the directory."""
        if uid not in self._paths:              # e.g. crawled before a restart
            self._read_page(self._list())
        path = self._paths.get(uid)
        if path is None:
            raise KeyError(f"{uid} is not held here")
        root = os.path.realpath(self.root)
        if not os.path.realpath(path).startswith(root + os.sep):
            raise PermissionError(f"{uid}: its file resolves outside the archive's "
                                  "directory")
        return open(path, "rb")
