"""WAL checkpoints of the catalog, run by a thread of their own, off the writers' path.

A checkpoint copies the WAL back into the database file: an fsync of the WAL, its pages
written, an fsync of the database. SQLite runs one by itself in the connection whose
commit takes the WAL past ``wal_autocheckpoint`` pages (1000 by default) — with ~12
pages per commit of a lone instance, every ~80th C-STORE of the ingest's one-job path
(``Catalog.record_now``, in the C-STORE's critical path) paid two fsyncs and the copy
(record_now's p99 13–22 ms against a median of 0.3 ms on a busy host). Here the writer's
own automatic checkpoint is pushed back to ``BACKSTOP`` pages (it runs only if this one
falls behind) and a PASSIVE checkpoint (it waits for neither readers nor the writer,
which goes on appending meanwhile) runs on a connection of its own after every ``EVERY``
commits, and once ``IDLE`` s after the last (a reactor without ``callLater``: only the
former). After the *last*: commits that keep coming less than ``IDLE`` s apart wait for
``EVERY`` (a replica holder at 32 peers commits a copy every ~0.2 s of a stream and
applies a pull now and then: timed from the first commit, each of 31 holders ran a
checkpoint — two fsyncs — every second of the stream, beside the copies' own fsyncs
in the C-STOREs' path). Durability is unchanged: a commit is in the WAL before it is
acknowledged, checkpointed or not.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

log = Logger()

EVERY = 128          # commits between two checkpoints
IDLE = 1.0           # seconds after the last commit: one more
BACKSTOP = 8000      # pages (~32 MB): the writer checkpoints itself only past this


class Checkpoints:
    """Reactor side: ``start()``, ``committed()`` after each commit, ``stop()``
    (Deferred: the checkpoint running is done and the connection closed)."""

    def __init__(self, path, reactor, connect, every: int = EVERY, idle: float = IDLE):
        self.path, self.reactor, self.connect = path, reactor, connect
        self.every, self.idle = every, idle
        self.pool = ThreadPool(1, 1, "catalog-checkpoint")
        self.conn = None                      # the checkpoint thread's
        self.commits = 0                      # since the last checkpoint began
        self.last = 0.0                       # reactor time of the last commit
        self.running = self.timer = None
        self.started = self.stopped = False
        self.done = 0                         # checkpoints run

    def start(self) -> None:
        self.pool.start()
        self.started = True

    def committed(self) -> None:
        if not self.started or self.stopped:
            return
        self.commits += 1
        self.last = self._now()
        if self.commits >= self.every:
            self._run()
        elif self.timer is None and self.running is None:
            self._later(self.idle)

    def _now(self) -> float:
        seconds = getattr(self.reactor, "seconds", None)        # (a test's reactor: none)
        return seconds() if seconds is not None else 0.0

    def _later(self, delay: float) -> None:
        call_later = getattr(self.reactor, "callLater", None)   # (a test's reactor: none)
        if call_later is not None:
            self.timer = call_later(delay, self._idle)

    def _idle(self) -> None:
        """``IDLE`` s after a commit: a checkpoint if none came since, else wait again
        (one timer re-armed, not one per commit)."""
        self.timer = None
        if not self.commits or self.running is not None or self.stopped:
            return
        still = self._now() - self.last
        if still < self.idle - 1e-3:
            self._later(self.idle - still)
        else:
            self._run()

    def _run(self) -> None:
        if self.running is not None or self.stopped:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.commits = 0
        self.running = deferToThreadPool(self.reactor, self.pool, self._checkpoint)
        self.running.addErrback(lambda f: log.warn("catalog checkpoint failed: {err}",
                                                   err=f.getErrorMessage()))
        self.running.addBoth(self._ran)

    def _ran(self, _) -> None:
        self.running = None
        self.done += 1
        if self.commits >= self.every:
            self._run()
        elif self.commits and not self.stopped:
            self._later(max(0.0, self.last + self.idle - self._now()))

    def _checkpoint(self):
        """Checkpoint thread: (busy, WAL frames, frames checkpointed)."""
        if self.conn is None:
            self.conn = self.connect(self.path)
        return self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def stop(self) -> defer.Deferred:
        if not self.started or self.stopped:
            self.stopped = True
            return defer.succeed(None)
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        d = defer.Deferred()
        (self.running or defer.succeed(None)).addBoth(lambda _: d.callback(None))
        d.addCallback(lambda _: deferToThreadPool(self.reactor, self.pool, self._close))
        return d.addBoth(lambda _: self.pool.stop())
