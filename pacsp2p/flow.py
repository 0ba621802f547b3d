"""Flow control.

Read holds: several parties may each stop a protocol reading from its transport. A
C-STORE's file writer and each replica push pause the modality's association; each
pushed data set being written pauses the overlay link it arrives on. Pauses nest: the
transport reads again once every one of them is resumed.

Fetch gates: at most ``max_fetches`` reads of one archive run at once on the peer that
manages it, whoever asks (this peer's retrievals, other peers over the bulk channel);
the others wait their turn (``open_gated``). A thread serving the read port takes a free
turn itself (``Gate.take``, ``give``): only a turn it must wait for goes through the
reactor.

Pacing: ``Throttle``, a token bucket that spaces out starts (repair, drain and scrub
keep to their MB/s with it).
"""

import threading
import time

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, DeferredSemaphore

DEFAULT_MAX_FETCHES = 4


class ReadHolds:
    """Mixin for a Protocol. ``reading_allowed()`` says whether reading may resume at all
    (not once the connection is closing)."""

    _read_holds = 0

    def pause_reading(self) -> None:
        self._read_holds += 1
        if self._read_holds == 1 and self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._read_holds -= 1
        if self._read_holds == 0 and self.transport is not None and self.reading_allowed():
            self.transport.resumeProducing()

    def reading_allowed(self) -> bool:
        return True

    def reading_held(self) -> bool:
        """True while someone paused reading (what the other side sends waits)."""
        return self._read_holds > 0


class Gate(DeferredSemaphore):
    """A ``DeferredSemaphore`` (``acquire``, ``release``, ``run``: in the reactor) whose
    free turns a thread may also take and give back without the reactor (``take``,
    ``give``): the tokens and the waiters are counted under a lock, a waiter's Deferred
    is fired in the reactor only. A read-port thread paid a round trip through the
    reactor per instance served for its turn (two wake-ups of the reactor, three thread
    switches)."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self._lock = threading.Lock()

    def acquire(self) -> Deferred:
        d = Deferred(canceller=self._cancelAcquire)
        with self._lock:
            if not self.tokens:
                self.waiting.append(d)
                return d
            self.tokens -= 1
        d.callback(self)
        return d

    def release(self) -> None:
        with self._lock:
            if self._put_back():
                return
            d = self.waiting.pop(0)
        d.callback(self)

    def _put_back(self) -> bool:
        """Under the lock: the turn back among the free ones, if no one waits for it."""
        if self.waiting:
            return False
        assert self.tokens < self.limit, "a gate released more than taken"
        self.tokens += 1
        return True

    def _cancelAcquire(self, d: Deferred) -> None:   # noqa: N802 (Twisted's name)
        with self._lock:
            self.waiting.remove(d)

    def take(self) -> bool:
        """Any thread: a turn if one is free (none waits then), at once; else False
        (wait for one in the reactor: ``acquire``)."""
        with self._lock:
            if self.tokens and not self.waiting:
                self.tokens -= 1
                return True
        return False

    def give(self, reactor) -> None:
        """Any thread: a turn given back; handed to the first waiter in the reactor."""
        with self._lock:
            if self._put_back():
                return
        reactor.callFromThread(self.release)


def fetch_gate(archive) -> Gate:
    """The one gate of *archive* (made on first use, ``archive.max_fetches`` tokens)."""
    gate = getattr(archive, "_pacsp2p_fetch_gate", None)
    if gate is None:
        limit = getattr(archive, "max_fetches", None) or DEFAULT_MAX_FETCHES
        gate = Gate(max(1, int(limit)))
        archive._pacsp2p_fetch_gate = gate
    return gate


def open_gated(archive, uid: str, sha256: str | None = None):
    """``archive.open(uid, sha256)`` once fewer than ``max_fetches`` run (a Deferred;
    cancelling it while it waits gives up its turn)."""
    return fetch_gate(archive).run(archive.open, uid, sha256)


class Throttle:
    """Pacing token bucket: ``wait(n)`` fires when *n* more bytes may start."""

    def __init__(self, reactor, rate: float):
        self.reactor, self.rate = reactor, rate      # bytes/s; 0: no limit
        self._next = 0.0

    def wait(self, n: int) -> defer.Deferred:
        if self.rate <= 0:
            return defer.succeed(None)
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + n / self.rate
        if start <= now:
            return defer.succeed(None)
        return task.deferLater(self.reactor, start - now, lambda: None)
