"""Shorter polling in pynetdicom's loops while an association is busy.

pynetdicom's association and DUL threads poll their queues with ``time.sleep(0.001)``:
every DIMSE message waits up to a millisecond at each of two hops, which caps a single
C-STORE stream of small instances at about 350/s however fast the rest is. This module
replaces the ``time`` module those two pynetdicom modules see with one whose 1 ms sleep
becomes 0.1 ms while the loop has had work within the last ~0.1 s, and stays 1 ms when it
is idle — so an idle association costs no more CPU than before. Measured here: a bare
pynetdicom storage SCP goes from 358 to 830 small instances/s.
"""

from __future__ import annotations

import threading
import time as _time

import pynetdicom.association
import pynetdicom.dul

BUSY_SLEEP = 0.0001
IDLE_AFTER = 1000          # polls without work before falling back to pynetdicom's 1 ms
WORK = 0.0002              # a loop body longer than this did some work


class AdaptiveTime:
    """The ``time`` module, but with ``sleep(0.001)`` adapted per thread to its load."""

    def __init__(self):
        self._local = threading.local()

    def __getattr__(self, name):
        return getattr(_time, name)

    def sleep(self, seconds):
        if seconds != 0.001:
            _time.sleep(seconds)
            return
        st = self._local
        now = _time.monotonic()
        if now - getattr(st, "woke", 0.0) > WORK:
            st.idle = 0                                   # the loop did something
        else:
            st.idle = getattr(st, "idle", 0) + 1
        _time.sleep(BUSY_SLEEP if st.idle < IDLE_AFTER else seconds)
        st.woke = _time.monotonic()


def install() -> None:
    if not isinstance(pynetdicom.association.time, AdaptiveTime):
        shim = AdaptiveTime()
        pynetdicom.association.time = shim
        pynetdicom.dul.time = shim
