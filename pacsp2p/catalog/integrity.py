"""The catalog's integrity check, off the path of start-up.

``PRAGMA quick_check`` reads the whole database file: 15-24 s warm and 363 s cold at 10M
instances, which the peer used to spend before opening its DICOM port. Now a catalog
closed cleanly while known good (``schema.close_clean``) is not checked at all; any other
is checked once the peer serves, on a connection and in a thread of its own (never the
reactor, never the writer), interrupted if the peer stops meanwhile (it then runs again
at the next start, as the clean mark is only written for a catalog known good).

:attr:`Integrity.state` is what ``/status`` shows as ``catalog.integrity``; a damaged
catalog is logged as critical (the peer keeps serving what it can; the operator stops it
and runs ``pacsp2p catalog rebuild``). ``digest``: a hash of the content, to compare
peers' catalogs (``pacsp2p catalog digest``).
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

UNCHECKED = "unchecked"                 # not closed cleanly; the check has not run yet
CHECKING = "checking"                   # PRAGMA quick_check runs in the background
OK = "ok"                               # checked this run
CLEAN = "ok (closed cleanly)"           # closed cleanly, known good then: not checked
DAMAGED = "damaged: "                   # + what quick_check reported


class Integrity:
    """What is known of one catalog file's integrity, and the background check."""

    def __init__(self, path: Path, reactor, connect: Callable[[Path], sqlite3.Connection]):
        self.path, self.reactor, self._connect = Path(path), reactor, connect
        self.state = UNCHECKED
        self._pool = ThreadPool(0, 1, "catalog-check")
        self._conn: sqlite3.Connection | None = None
        self._stopping = False

    @property
    def known_good(self) -> bool:
        return self.state in (OK, CLEAN)

    def opened(self, clean: bool, new: bool = False) -> None:
        """The catalog is open; *clean*: it was closed cleanly while known good; *new*:
        it was created now (said so: "not closed cleanly" misled on a first start)."""
        if clean:
            self.state = CLEAN
        log.info("catalog {path}: {state}", path=str(self.path),
                 state="created" if new else
                 "closed cleanly last time, not checked" if clean else
                 "not closed cleanly last time: checked once the peer serves")

    def check(self) -> defer.Deferred:
        """Run the check unless the state is known already; fires with the state."""
        if self.state != UNCHECKED:
            return defer.succeed(self.state)
        self.state = CHECKING
        if not self._pool.started:
            self._pool.start()
        t0 = time.monotonic()
        d = deferToThreadPool(self.reactor, self._pool, self._quick_check)

        def checked(problems: list[str]):
            if problems == ["ok"]:
                self.state = OK
                log.info("catalog {path}: integrity ok (quick_check, {s:.1f} s)",
                         path=str(self.path), s=time.monotonic() - t0)
            else:
                self._damaged("; ".join(problems))
            return self.state

        def failed(f):
            if not f.check(sqlite3.OperationalError) and f.check(sqlite3.DatabaseError):
                self._damaged(f.getErrorMessage())      # "database disk image is malformed"
                return self.state
            self.state = UNCHECKED
            if f.check(sqlite3.OperationalError) and "interrupt" in f.getErrorMessage():
                log.info("catalog {path}: integrity check interrupted (the peer stops); "
                         "it runs at the next start", path=str(self.path))
            else:
                log.error("catalog {path}: the integrity check could not run: {err}",
                          path=str(self.path), err=f.getErrorMessage())
            return self.state
        return d.addCallbacks(checked, failed)

    def _damaged(self, what: str) -> None:
        self.state = DAMAGED + what[:500]
        log.critical("CATALOG DAMAGED: {path} failed its integrity check (quick_check): "
                     "{what}. The peer keeps serving, but answers may be wrong or missing: "
                     "stop it and run 'pacsp2p catalog rebuild'.",
                     path=str(self.path), what=what[:500])

    def _quick_check(self) -> list[str]:
        """Blocking, in the check thread: the lines ``PRAGMA quick_check`` reports."""
        conn = self._connect(self.path)
        conn.execute("PRAGMA query_only=1")
        # ends the check ("interrupted") once stop() is called, whenever that is
        conn.set_progress_handler(lambda: self._stopping, 10000)
        self._conn = conn
        try:
            return [r[0] for r in conn.execute("PRAGMA quick_check(20)")]
        finally:
            self._conn = None
            conn.close()

    def stop(self) -> None:
        """Interrupt a check that still runs and end its thread."""
        self._stopping = True
        conn = self._conn
        if conn is not None:
            conn.interrupt()
        if self._pool.started:
            self._pool.stop()


def digest(conn: sqlite3.Connection) -> str:
    """sha256 over the whole content in a canonical order: what the peer answers, so not
    the rows' last-writer-wins stamps (a peer of a release before schema 5, which has
    none, holding the same rows has the same digest)."""
    h = hashlib.sha256()
    for table, key in (("patients", "PatientID"), ("studies", "StudyInstanceUID"),
                       ("series", "SeriesInstanceUID"), ("instances", "SOPInstanceUID"),
                       ("locations", "SOPInstanceUID, peer, archive")):
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")
                if r[1] not in ("available", "stamp")]
        for row in conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {key}"):
            h.update(repr(row).encode())
    return h.hexdigest()
