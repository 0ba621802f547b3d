"""A SWIM member that stood still (frozen, its reactor blocked) does not act on verdict
timers that came due meanwhile before reading what arrived meanwhile.

Twisted's reactor runs the timers past due before it reads its sockets; ``task.Clock``
does the same when advanced in one step past a timer (the call runs late, then what the
test delivers is "read"). On resume, a suspicion's timer declared a member dead whose
refutation waited unread (tests/cluster/test_false_death.py with real peers). A
suspicion that runs out while the member keeps stepping on time is a death as before.
"""
from __future__ import annotations

import random

from twisted.internet import task

from pacsp2p.overlay.swim import Swim
from pacsp2p.overlay.swimparts import ALIVE, DEAD, SUSPECT, encode


class Drop:
    """A transport that loses everything (the member only hears what a test gives it)."""

    def send(self, name, data):
        pass

    def linked(self, name):
        return False

    def linked_names(self):
        return []


def member():
    clock = task.Clock()
    a = Swim("a", {"host": "a", "port": 1}, 1, clock, Drop(), rng=random.Random(1))
    for name in ("b", "c"):
        a.contact(name, {"host": name, "port": 1}, 1)
    a.running = True                 # receives, without its own probe loop
    a._on_suspect("b", 1, "a")
    assert a.nodes["b"].state == SUSPECT
    return a, clock


def test_a_refutation_that_waited_through_a_stall_is_read_before_the_verdict():
    a, clock = member()
    clock.advance(3.0)               # stood still past the suspicion's 1.25 s
    a.receive("b", encode({"t": "gossip", "g": [["a", "b", 2, {"host": "b", "port": 1}]]}))
    clock.advance(1.0)
    assert a.nodes["b"].state == ALIVE
    assert a.stats["dead"] == 0 and a.stats["late"] >= 1 and a.awareness >= 1


def test_a_suspicion_nobody_refutes_is_still_a_death():
    a, clock = member()
    for _ in range(60):
        clock.advance(0.05)          # on time
    assert a.nodes["b"].state == DEAD and a.stats["late"] == 0
    a, clock = member()
    clock.advance(3.0)               # late, then nothing heard: dead a probe timeout on
    assert a.nodes["b"].state == SUSPECT
    clock.advance(0.5)
    assert a.nodes["b"].state == DEAD
