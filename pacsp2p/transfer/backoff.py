"""When to try again a copy whose move or repair failed: per-key truncated binary
exponential backoff (as TCP's retransmission timer, RFC 6298 §5.5).

Repair and drain used to wait a fixed 30 s after each failure: a copy failed by an
archive that restarts in 2 s waited 30 s, and one failed by a full disk for a week was
tried every 30 s, a log line each time. Now the first wait is ``first`` s, each failure
again doubles it up to ``last``; a key not failed again within ``last`` s of its retry
being due is forgotten (its next failure starts at ``first`` again). The clock is
``time.monotonic``.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

FIRST = 5.0             # seconds before the first try again
LAST = 300.0            # the longest wait


class Backoff:
    def __init__(self, first: float = FIRST, last: float = LAST):
        self.first, self.last = first, last
        self._due: dict[Hashable, tuple[float, float]] = {}     # key -> (due, wait)

    def __len__(self) -> int:
        return len(self._due)

    def failed(self, key: Hashable) -> float:
        """*key* failed now: the seconds until it may be tried again."""
        now = time.monotonic()
        due, wait = self._due.get(key, (None, 0.0))
        wait = self.first if due is None or now - due > self.last else \
            min(self.last, wait * 2)
        self._due[key] = (now + wait, wait)
        return wait

    def waiting(self, key: Hashable) -> bool:
        """Whether *key* failed and its wait is not over."""
        entry = self._due.get(key)
        return entry is not None and time.monotonic() < entry[0]

    def succeeded(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def prune(self) -> None:
        """Forget the keys whose retry was due more than ``last`` s ago."""
        now = time.monotonic()
        for key in [k for k, (due, _) in self._due.items() if now - due > self.last]:
            del self._due[key]
