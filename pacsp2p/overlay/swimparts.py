"""The parts of a SWIM member's state (``overlay.swim``: Das, Gupta & Motivala 2002,
with the Lifeguard refinements of Dadgar et al. 2018): the protocol's settings, what is
known of each member (``Node``), a Lifeguard suspicion with its confirmations and
shrinking timeout, a probe and an indirect-probe relay in flight, the queue of
piggybacked broadcasts (each sent about lambda*log(N) times), and the checks every
arriving message goes through (``Invalid``: dropped).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

ALIVE, SUSPECT, DEAD = "alive", "suspect", "dead"

MAX_MESSAGE = 60000          # bytes of one message: below AMP's 65,535 per value
MAX_ENTRIES = 1000           # piggybacked items in one message
MAX_INFO = 8192              # bytes of one member's info (JSON)
MAX_NAME = 255
MAX_INT = 2 ** 53            # incarnations and sequence numbers stay exact in JSON
_STATE_CODES = {"a": ALIVE, "s": SUSPECT, "d": DEAD}
_CODE_OF = {v: k for k, v in _STATE_CODES.items()}


@dataclass(frozen=True)
class SwimConfig:
    probe_interval: float = 0.5        # one probe per period
    probe_timeout: float = 0.25        # wait for a direct ack (scaled by local health)
    indirect_checks: int = 3           # members asked to ping a silent target
    suspicion_min: float = 2.5         # alpha: min timeout = alpha * log10(N) * interval
    suspicion_max_mult: float = 6.0    # beta: max timeout = beta * min timeout
    suspicion_confirmations: int = 2   # K: independent suspicions that bring it to min
    retransmit_mult: int = 6           # lambda: sends of each item = lambda*ceil(log10(N+1))
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    push_pull_interval: float = 30.0   # full state with a random member (scaled above 32)
    reconnect_interval: float = 2.0    # full state with a random dead member
    awareness_max: int = 8             # local health multiplier: timeouts x (score + 1)
    max_message: int = 16384           # budget of one message (full states: MAX_MESSAGE)

    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        low = self.suspicion_min * max(1.0, math.log10(max(1, n))) * self.probe_interval
        return low, low * self.suspicion_max_mult


class Node:
    """What one member knows of another: its info (as gossiped, a dict), incarnation,
    state and when it entered it (``since``, the clock's seconds)."""

    def __init__(self, name: str, wire: dict, incarnation: int, state: str, since: float):
        self.name = name
        self.wire = wire
        self.incarnation = incarnation
        self.state = state
        self.since = since
        self.suspicion: _Suspicion | None = None
        self.rtt: float | None = None          # seconds of the last direct ack


class _Suspicion:
    """Lifeguard's LHA-Suspicion timer: max timeout at first, min after K independent
    confirmations, log-interpolated between."""

    def __init__(self, swim, node, origin, k, low, high):
        self.swim, self.node, self.k, self.low, self.high = swim, node, k, low, high
        self.start = swim.clock.seconds()
        self.seen = {origin}
        self.waited = False
        self.call = swim.clock.callLater(self.timeout(), self.fire)

    def timeout(self) -> float:
        n = len(self.seen) - 1
        if self.k < 1 or n >= self.k:
            return self.low
        frac = math.log(n + 1) / math.log(self.k + 1)
        return max(self.low, self.high - (self.high - self.low) * frac)

    def confirm(self, origin) -> bool:
        if origin in self.seen or len(self.seen) > self.k:
            return False
        self.seen.add(origin)
        left = self.start + self.timeout() - self.swim.clock.seconds()
        if self.call.active():
            self.call.reset(max(0.0, left))
        return True

    def fire(self):
        if not self.waited and self.swim._stood_still(self.call):
            self.waited = True      # a refutation may wait unread: read it first
            self.call = self.swim.clock.callLater(
                self.swim.scaled(self.swim.config.probe_timeout), self.fire)
            return
        self.swim._suspicion_expired(self.node, self)

    def cancel(self):
        if self.call.active():
            self.call.cancel()


class _Probe:
    def __init__(self, target, seq, start):
        self.target, self.seq, self.start = target, seq, start
        self.acked = False
        self.nacks = 0
        self.expected_nacks = 0
        self.timer = None
        self.waited = False      # its end fired late once and was put off (Swim._stood_still)


class _Relay:
    """An indirect probe we make for *requester* (its sequence number *seq*)."""

    def __init__(self, requester, seq):
        self.requester, self.seq = requester, seq
        self.timer = None


URGENT = ("m", "q")    # kinds of items gossip messages are sent for (Broadcasts)


class Broadcasts:
    """Items to piggyback, each sent a limited number of times (memberlist's
    TransmitLimitedQueue): an item replaces the older one of the same key; the least
    sent go first, newest first among equals. Items whose key starts with "m"
    (membership) or "q" (a stream of catalog facts ended) are *urgent*: while one is
    queued, gossip messages go out for it; the others (catalog rumours) only ride on
    messages sent anyway."""

    def __init__(self):
        self.where: dict = {}          # key -> transmits so far
        self.buckets: dict[int, dict] = {}   # transmits -> {key: (entry, size)} (oldest first)
        self.urgent = 0                # queued membership items

    def __len__(self):
        return len(self.where)

    def put(self, key, entry: list) -> None:
        old = self.where.pop(key, None)
        if old is not None:
            del self.buckets[old][key]
        else:
            self.urgent += key[0] in URGENT
        self.where[key] = 0
        self.buckets.setdefault(0, {})[key] = (
            entry, len(json.dumps(entry, separators=(",", ":"))) + 1)

    def take(self, budget: int, limit: int, n: int = MAX_ENTRIES) -> list:
        """Items fitting in *budget* bytes; each sent at most *limit* times, then
        dropped."""
        if not self.where or budget <= 0:
            return []
        out, moved = [], []
        for count in sorted(self.buckets):
            for key, (entry, size) in reversed(self.buckets[count].items()):
                if size > budget:
                    continue
                out.append(entry)
                moved.append((key, count))
                budget -= size
                if len(out) >= n or budget < 16:
                    break
            if len(out) >= n or budget < 16:
                break
        for key, count in moved:
            item = self.buckets[count].pop(key)
            if not self.buckets[count]:
                del self.buckets[count]
            if count + 1 >= limit:
                del self.where[key]
                self.urgent -= key[0] in URGENT
            else:
                self.where[key] = count + 1
                self.buckets.setdefault(count + 1, {})[key] = item
        return out


class Invalid(ValueError):
    """A message or item that fails the checks (dropped, counted)."""


def _name(x) -> str:
    if not isinstance(x, str) or not 0 < len(x) <= MAX_NAME or not x.isprintable():
        raise Invalid("bad name")
    return x


def _int(x) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < MAX_INT:
        raise Invalid("bad integer")
    return x


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()
