"""Named thread pools tied to a reactor: started on first use, stopped at its shutdown.

The reactor thread never blocks; file and socket work that must block runs in one of
these (``deferToThreadPool(reactor, pool(reactor, "dicom-send"), ...)``). A pool that
takes a job per received instance (the writing and keeping threads of a C-STORE) is a
``Lane``: a job handed over costs half the CPU of one through Twisted's ThreadPool.
"""

from __future__ import annotations

import queue
import threading

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

log = Logger()
_pools: dict = {}


class Lane:
    """*size* threads that take jobs from one queue (``queue.SimpleQueue``), in the order
    given: the part of Twisted's ThreadPool that ``deferToThreadPool`` and this code use
    (``callInThread``, ``callInThreadWithCallback``, ``start``, ``stop``, ``started``,
    ``joined``) without its coordinating thread and per-job context (a job handed over
    and waited for: ~54 -> ~27 µs of CPU, 20,000 jobs at load 21). Jobs given before
    ``stop`` still run; those given after are dropped, as a stopped ThreadPool drops
    them."""

    def __init__(self, size: int, name: str):
        self.size, self.name = max(1, size), name
        self.started = self.joined = False
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.started:
            return
        self.started, self.joined = True, False
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"PoolThread-{self.name}-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def _work(self) -> None:
        take = self._jobs.get
        while (job := take()) is not None:
            on_result, func, args, kw = job
            try:
                result = func(*args, **kw)
                ok = True
            except BaseException:
                result, ok = Failure(), False
                if on_result is None:
                    log.failure("a job of {name} failed", result, name=self.name)
                    continue
            if on_result is not None:
                try:
                    on_result(ok, result)
                except BaseException:
                    log.failure("the result of a job of {name} was lost", name=self.name)
            del job, result, func, args, kw

    def callInThread(self, func, *args, **kw) -> None:
        self.callInThreadWithCallback(None, func, *args, **kw)

    def callInThreadWithCallback(self, onResult, func, *args, **kw) -> None:
        if not self.joined:
            self._jobs.put((onResult, func, args, kw))

    def stop(self) -> None:
        self.joined, self.started = True, False
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join()


def pool(reactor, name: str, minthreads: int = 1, maxthreads: int = 4,
         lane: bool = False) -> ThreadPool | Lane:
    """The pool *name* of *reactor* (one per reactor and name); *lane*: a ``Lane`` of
    *maxthreads* threads (made by its first caller)."""
    key = (id(reactor), name)
    found = _pools.get(key)
    if found is None:
        found = _pools[key] = Lane(maxthreads, name) if lane else \
            ThreadPool(minthreads, maxthreads, name)
        found.start()

        def stop():
            _pools.pop(key, None)
            found.stop()
        reactor.addSystemEventTrigger("during", "shutdown", stop)
    return found
