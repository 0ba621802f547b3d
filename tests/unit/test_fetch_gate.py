"""An archive's fetch gate (``flow.fetch_gate``): a thread takes a free turn without the
reactor, gives it back the same way, and a turn the reactor's side waits for is handed
over in the reactor; ``max_fetches`` holds between threads and the reactor's side.

(Before: the read port's threads took every turn through the reactor, a round trip per
instance served.)
"""
from __future__ import annotations

import threading
from types import SimpleNamespace

from pacsp2p import flow


class Reactor:
    """Records what a thread hands the reactor; ``run`` runs it (as the reactor would)."""

    def __init__(self):
        self.calls, self._lock = [], threading.Lock()

    def callFromThread(self, fn, *args):                # noqa: N802
        with self._lock:
            self.calls.append((fn, args))

    def run(self):
        with self._lock:
            calls, self.calls = self.calls, []
        for fn, args in calls:
            fn(*args)


def test_a_free_turn_is_taken_and_given_back_without_the_reactor():
    gate = flow.fetch_gate(SimpleNamespace(max_fetches=2))
    reactor, got = Reactor(), []
    t = threading.Thread(target=lambda: got.extend([gate.take(), gate.take(), gate.take()]))
    t.start()
    t.join()
    assert got == [True, True, False] and gate.tokens == 0
    gate.give(reactor)
    assert reactor.calls == [] and gate.tokens == 1
    fired = []
    gate.acquire().addCallback(fired.append)           # the reactor's side: free, at once
    assert fired == [gate] and gate.tokens == 0


def test_a_turn_waited_for_in_the_reactor_is_handed_over_there():
    gate = flow.Gate(1)
    reactor = Reactor()
    assert gate.take()
    waiting = gate.acquire()                            # the reactor's side waits
    fired = []
    waiting.addCallback(fired.append)
    assert not gate.take()                              # nor may a thread jump the queue
    t = threading.Thread(target=gate.give, args=(reactor,))
    t.start()
    t.join()
    assert fired == [] and len(reactor.calls) == 1      # handed to the reactor ...
    reactor.run()
    assert fired == [gate] and gate.tokens == 0         # ... which fires the waiter
    gate.release()
    assert gate.tokens == 1


def test_a_cancelled_wait_gives_no_turn_away():
    gate = flow.Gate(1)
    reactor = Reactor()
    assert gate.take()
    waiting = gate.acquire()
    waiting.addErrback(lambda f: None)
    waiting.cancel()
    gate.give(reactor)
    assert reactor.calls == [] and gate.tokens == 1 and gate.waiting == []


def test_max_fetches_holds_between_threads_and_the_reactor_side():
    limit, rounds = 3, 3000
    gate = flow.Gate(limit)
    reactor = Reactor()
    held, most, turns, lock = [0], [0], [0], threading.Lock()

    def hold():
        with lock:
            held[0] += 1
            most[0] = max(most[0], held[0])
            turns[0] += 1

    def drop():
        with lock:
            held[0] -= 1

    def worker():
        for _ in range(rounds):
            if gate.take():
                hold()
                drop()
                gate.give(reactor)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    pending = None
    for _ in range(100 * rounds):                       # bounded; ends long before
        reactor.run()                                   # this thread: the reactor's side
        if pending is None or pending.called:           # one turn asked at a time
            if not any(t.is_alive() for t in threads):
                break
            pending = gate.acquire().addCallback(lambda _: (hold(), drop(), gate.release()))
    for t in threads:
        t.join()
    reactor.run()
    assert pending is None or pending.called
    assert most[0] <= limit and held[0] == 0 and turns[0] > rounds
    assert gate.tokens == limit and gate.waiting == []
