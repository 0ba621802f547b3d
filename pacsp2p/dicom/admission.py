"""Which TCP connections the DICOM acceptor takes, and log lines nobody can multiply.

Connections are counted in two kinds (``Admission``): *pending* — TCP open, no
association yet (waiting for an A-ASSOCIATE-RQ, under the ARTIM timer) — and
*established* associations; ``max_associations`` is checked against the second kind only,
when an A-ASSOCIATE-RQ arrives. A new connection is taken unless

- its address already holds ``max_per_address`` connections (either kind), or
- ``max_pending`` connections are pending, or
- the process is within ``fd_reserve`` file descriptors of its limit (RLIMIT_NOFILE,
  ``FdBudget``): the acceptor refuses early instead of running into EMFILE, so file
  writes, SQLite and the other ports keep working while this one is flooded.

A connection over a limit does not lock anyone out: the *oldest pending* connection (of
the same address, for the per-address limit) is closed to make room, since a real
requestor sends its A-ASSOCIATE-RQ at once and a silent one has had the longest time to
do so. Only when there is no pending connection to close is the new one closed at once --
but for the per-address limit: when every connection of the address is an association,
the new one is taken (the next one evicts it) and its request answered A-ASSOCIATE-RJ
(rejected-transient, local limit exceeded: ``full``), as DCMTK's SCPs answer over their
limit; closed at accept, a modality read "peer aborted", not "try later".

``LogLimit`` bounds what any one kind of event can write to the log: the first
``burst`` lines per ``window`` seconds, then one line counting the rest.
"""

from __future__ import annotations

import os
import resource
from collections import Counter

from twisted.logger import LogLevel, Logger

log = Logger()


class LogLimit:
    """At most *burst* lines per *window* seconds for each kind of event, then one line
    saying how many more there were."""

    def __init__(self, clock, burst: int = 10, window: float = 10.0, logger=None):
        self.clock, self.burst, self.window = clock, burst, window
        self.log = logger or log
        self._counts: dict[str, list] = {}      # kind -> [lines in window, suppressed]

    def __call__(self, kind: str, level: LogLevel, fmt: str, **kw) -> None:
        state = self._counts.get(kind)
        if state is None:
            state = self._counts[kind] = [0, 0]
            self.clock.callLater(self.window, self._window_ended, kind)
        if state[0] < self.burst:
            state[0] += 1
            self.log.emit(level, fmt, **kw)
        else:
            state[1] += 1

    def _window_ended(self, kind: str) -> None:
        _, suppressed = self._counts.pop(kind, (0, 0))
        if suppressed:
            self.log.warn("{n} more {kind} events in the last {s:.0f} s (not logged)",
                          n=suppressed, kind=kind, s=self.window)


_shared: dict = {}


def shared_limit(logger, reactor=None) -> LogLimit:
    """The one ``LogLimit`` of *logger* on *reactor* (the global one if None), made at its
    first line: for lines that have no object of their own to keep one (a module's
    function, a responder's errback)."""
    if reactor is None:
        from twisted.internet import reactor
    key = (logger.namespace, reactor)
    if key not in _shared:
        _shared[key] = LogLimit(reactor, logger=logger)
    return _shared[key]


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _fd_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


class FdBudget:
    """Whether the process may take one more connection and keep *reserve* file
    descriptors free. Counting open descriptors costs a directory listing, so it is
    done at most once per ``every`` seconds while far from the limit (each connection
    taken meanwhile counted as one more), and afresh whenever the estimate nears it."""

    def __init__(self, clock, reserve: int, every: float = 1.0, count=_open_fds,
                 limit=_fd_limit):
        self.clock, self.reserve, self.every = clock, reserve, every
        self._count, self._limit = count, limit
        self._measured: int | None = None
        self._at = 0.0
        self._since = 0

    def room(self) -> bool:
        """True if a connection just accepted may stay."""
        limit = self._limit() if self.reserve > 0 else None
        if limit is None:
            return True
        ceiling = limit - self.reserve
        now = self.clock.seconds()
        if self._measured is None or now - self._at >= self.every or \
                self._measured + self._since >= ceiling:
            self._measured, self._at, self._since = self._count(), now, 0
            if self._measured is None:
                return True
        self._since += 1
        return self._measured + self._since <= ceiling


class Admission:
    """Bookkeeping of the acceptor's connections (see the module docstring). Protocols
    are registered by ``admit`` (pending), moved by ``established``, removed by
    ``forget``; each has a ``host`` and an ``evict(why)`` that closes it at once."""

    def __init__(self, fds: FdBudget, max_pending: int, max_per_address: int):
        self.fds = fds
        self.max_pending, self.max_per_address = max_pending, max_per_address
        self.pending: dict = {}                  # oldest first (insertion order)
        self.established: set = set()
        self.per_address: Counter = Counter()

    def admit(self, host: str):
        """(room, victim, limit): whether a new connection from *host* may be taken, the
        pending connection to close to make room (or None) and the limit reached (or
        ""). The caller then evicts the victim and ``add``s the new protocol, or closes
        the new connection if there is no room."""
        if self.per_address[host] >= self.max_per_address:
            victim = next((p for p in self.pending if p.host == host), None)
            return True, victim, "per-address limit"
        if len(self.pending) >= self.max_pending:
            victim = next(iter(self.pending), None)
            return victim is not None, victim, "pending limit"
        if not self.fds.room():
            victim = next(iter(self.pending), None)
            return victim is not None, victim, "file descriptor reserve"
        return True, None, ""

    def full(self, host: str, max_associations: int) -> str:
        """Why an A-ASSOCIATE-RQ from *host* finds no room (A-ASSOCIATE-RJ), or ''."""
        if len(self.established) >= max_associations:
            return f"{len(self.established)} associations already"
        mine = sum(p.host == host for p in self.established)
        return f"{mine} associations from {host} already" \
            if mine >= self.max_per_address else ""

    def add(self, proto) -> None:
        self.pending[proto] = None
        self.per_address[proto.host] += 1

    def establish(self, proto) -> None:
        if self.pending.pop(proto, False) is None:
            self.established.add(proto)

    def forget(self, proto) -> None:
        """*proto* is closing: it counts no more (idempotent)."""
        if self.pending.pop(proto, False) is None or proto in self.established:
            self.established.discard(proto)
            self.per_address[proto.host] -= 1
            if self.per_address[proto.host] <= 0:
                del self.per_address[proto.host]

    def all(self) -> list:
        return [*self.pending, *self.established]
