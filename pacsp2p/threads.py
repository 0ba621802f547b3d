"""Named thread pools tied to a reactor: started on first use, stopped at its shutdown.

The reactor thread never blocks; file and socket work that must block runs in one of
these (``deferToThreadPool(reactor, pool(reactor, "dicom-send"), ...)``).
"""

from __future__ import annotations

from twisted.python.threadpool import ThreadPool

_pools: dict = {}


def pool(reactor, name: str, minthreads: int = 1, maxthreads: int = 4) -> ThreadPool:
    """The pool *name* of *reactor* (one per reactor and name)."""
    key = (id(reactor), name)
    found = _pools.get(key)
    if found is None:
        found = _pools[key] = ThreadPool(minthreads, maxthreads, name)
        found.start()

        def stop():
            _pools.pop(key, None)
            found.stop()
        reactor.addSystemEventTrigger("during", "shutdown", stop)
    return found
