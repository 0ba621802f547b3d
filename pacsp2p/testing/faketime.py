"""A peer's wall clock set off, or stepped while it runs: libfaketime (the PyPI package
``libfaketime`` ships the library) preloaded into the peer's twistd, the offset read
from a file at most a second old (``FAKETIME_CACHE_DURATION``), so ``step("-1h")``
moves it. CLOCK_MONOTONIC is left alone (``DONT_FAKE_MONOTONIC``): only the wall clock
is off, as on a host whose clock is wrong or stepped by NTP.

    clock = SteppedClock(tmp_path / "faketime")          # "+0" to begin with
    cluster.add("peerb", env=clock.env())
    clock.step("-1d")
"""
from __future__ import annotations

import os
from pathlib import Path

import libfaketime

LIBRARY = libfaketime._get_shared_lib("libfaketime.so.1")


class SteppedClock:
    def __init__(self, path: Path, offset: str = "+0"):
        self.path = Path(path)
        self.step(offset)

    def env(self) -> dict:
        """The environment of a process whose wall clock this is."""
        return {**os.environ, "LD_PRELOAD": LIBRARY, "DONT_FAKE_MONOTONIC": "1",
                "FAKETIME_TIMESTAMP_FILE": str(self.path), "FAKETIME_CACHE_DURATION": "1"}

    def step(self, offset: str) -> None:
        """Offset the wall clock by *offset* (libfaketime's: "+1h", "-1d", "+0")."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        os.replace(tmp, self.path)
