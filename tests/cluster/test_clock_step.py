"""A peer whose wall clock is stepped while it runs (NTP correcting a clock far off, an
administrator, a VM resumed) keeps its failure detector and every other timer.

Twisted times ``callLater`` by the wall clock: before ``pacsp2p.clock`` a peer whose
clock was stepped back an hour had every timer pending at the step (SWIM's probe loop
among them) wait that hour: a peer killed meanwhile stayed "alive" in its view (still
alive after 180 s here). Two real peers, peerb's wall clock stepped by libfaketime
(``pacsp2p.testing.faketime``; CLOCK_MONOTONIC left alone), then peera killed: peerb
declares it dead within ``BOUND`` (detection takes ~2.5 s), and declared nobody dead
while both ran.
"""
from __future__ import annotations

import time

import pytest

from pacsp2p.testing.cluster import members, wait_until
from pacsp2p.testing.faketime import SteppedClock

BOUND = 30.0          # seconds: far above detection (~2.5 s), far below the step
WATCH = 8.0           # seconds both run after the step


@pytest.mark.parametrize("offset", ["-1d", "+1h"])
def test_a_peer_whose_clock_is_stepped_still_detects_a_death(cluster, tmp_path, offset):
    clock = SteppedClock(tmp_path / "faketime")
    a = cluster.add("peera")
    b = cluster.add("peerb", env=clock.env())
    cluster.wait_mesh()
    clock.step(offset)
    seen = []
    end = time.monotonic() + WATCH          # the library re-reads the offset each second
    while time.monotonic() < end:
        seen += [("peerb", members(b).get("peera")), ("peera", members(a).get("peerb"))]
        time.sleep(0.5)
    assert ("peerb", "dead") not in seen and ("peera", "dead") not in seen, seen
    a.kill9()
    took = wait_until(lambda: members(b).get("peera") == "dead", BOUND,
                      what=f"peerb (clock stepped {offset}) declares the killed peera dead")
    print(f"clock stepped {offset}: peera killed, declared dead by peerb after {took:.1f} s")
    assert took < BOUND
