"""Times a peer shows, stores or sends are wall-clock times, whatever its reactor's clock.

Since ``pacsp2p.clock`` a peer's reactor times its calls by ``time.monotonic`` (seconds
since boot, ~5e4), no longer by ``time.time`` (~1.8e9): a reactor time may be compared
only with another of the same process run. Here each such value is made on a clock far
from ``time.time`` (the simulation's, which starts at 0, or a ``task.Clock`` advanced to
5e4) and must still read as a wall-clock time (within a minute of ``time.time()``).
"""
from __future__ import annotations

import time

from pacsp2p.testing.simnet import SimNet


def _near_now(t) -> bool:
    return t is not None and abs(t - time.time()) < 60


def test_a_told_end_of_stream_is_dated_by_the_wall_clock():
    """``/status`` overlay.dissemination.end_told_at: before, the reactor's time of the
    end told (a real peer: 54533.4, shown as 1970-01-01 16:08; bench/overlay_real.py's
    ``writer_end_after`` = that less a ``time.time()``, -1.8e9 s)."""
    net = SimNet(seed=3)
    names = ["p000", "p001", "p002"]
    for i, name in enumerate(names):
        net.add(name, seeds=names[:i])
        net.run(0.02)
    assert net.run_until(net.converged, 60) is not None
    net.run(2)                              # (its clock: a few seconds from 0)
    writer = net.peers["p001"]
    for _ in range(100):                    # a stream (>= STREAK_FACTS), then quiet
        writer.catalog.write(1)
        net.run(0.02)
    net.run(3)
    d = writer.dissemination
    assert d.ends_told >= 1, d.ends_told
    assert _near_now(d.end_told_at), d.end_told_at
