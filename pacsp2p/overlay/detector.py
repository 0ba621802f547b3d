"""The phi accrual failure detector.

Hayashibara, Défago, Yared & Katayama, "The φ Accrual Failure Detector", SRDS 2004.
Instead of a yes/no timeout, each monitored peer gets a suspicion level φ computed from
the distribution of its heartbeat inter-arrival times (here approximated by a normal
distribution with the logistic formula used by Akka and Cassandra). φ = 8 means the
chance that the peer is alive but merely late is 10^-8.
"""

from __future__ import annotations

import math
from collections import deque


class PhiAccrualDetector:
    def __init__(self, window: int = 100, min_std: float = 0.2,
                 acceptable_pause: float = 1.0, first_interval: float = 0.5):
        self.intervals: deque[float] = deque(maxlen=window)
        self.min_std = min_std
        self.pause = acceptable_pause
        self.first = first_interval
        self.last: float | None = None

    def heartbeat(self, now: float) -> None:
        if self.last is None:
            # seed the window so phi is meaningful from the first heartbeat on
            self.intervals.extend([self.first - self.first / 4, self.first + self.first / 4])
        else:
            self.intervals.append(now - self.last)
        self.last = now

    def phi(self, now: float) -> float:
        if self.last is None:
            return 0.0
        n = len(self.intervals)
        mean = sum(self.intervals) / n + self.pause
        var = sum((x - mean + self.pause) ** 2 for x in self.intervals) / n
        std = max(math.sqrt(var), self.min_std)
        y = (now - self.last - mean) / std
        e = math.exp(-y * (1.5976 + 0.070566 * y * y))
        if now - self.last > mean:
            return -math.log10(e / (1.0 + e))
        return -math.log10(1.0 - 1.0 / (1.0 + e))
