"""The reactor's clock: monotonic, so that no timer of the peer follows a step of the
wall clock.

Twisted's reactor times every ``callLater`` by the wall clock (``time.time``). A peer
whose wall clock is stepped (NTP correcting a clock far off, an administrator, a VM
resumed) then misses or rushes every timer pending at the step: stepped back an hour,
SWIM's probe loop, catalog pulls and every timeout waited that hour (a peer killed
meanwhile stayed "alive" in its view); stepped ahead, every pending timeout fired at
once. ``use_monotonic`` makes the reactor's ``seconds`` ``time.monotonic`` (the calls
already pending moved to it), so durations are durations; the wall clock is read only
where a time is shown, stored or compared across peers (``wall``).
"""

from __future__ import annotations

import time


def use_monotonic(reactor) -> None:
    """From now on *reactor* times its calls by ``time.monotonic``."""
    if reactor.seconds is time.monotonic:
        return
    shift = time.monotonic() - reactor.seconds()
    for call in reactor.getDelayedCalls():       # same shift for all: heap order kept
        call.time += shift
        call.seconds = time.monotonic
    reactor.seconds = time.monotonic


def wall(reactor, t: float) -> float:
    """The wall-clock time of *t*, a time of *reactor*'s clock."""
    return time.time() - (reactor.seconds() - t)


def monotonic(reactor, t: float) -> float:
    """*t*, a time of *reactor*'s clock, as a ``time.monotonic()`` (the same in a peer)."""
    return time.monotonic() - (reactor.seconds() - t)
