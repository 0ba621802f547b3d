"""A simulated network for the overlay's protocol core (``overlay/swim.py``,
``overlay/dissemination.py``): many peers in one process on a deterministic clock.

The same SWIM and dissemination code that runs in a peer runs here; only the transport
and the catalog are stand-ins. ``SimNet`` delivers each message after a random delay
(``delay``: (low, high) seconds), drops it with probability ``loss``, never across a
partition (``partition([{...}, {...}])``, ``heal()``) and never to or from a peer that is
down (``kill``). Like the real link pool (``membership.LinkPool``), each peer keeps at
most ``max_links`` links; a message to a peer without a link first opens one (counted,
``connect_rtts`` round trips). A catalog pull costs one round trip per batch of
``batch`` facts, fails when the two cannot reach each other, and tells the answering
peer the puller's vector, as ``/changes`` does.

``SimClock`` is a ``twisted.internet.task.Clock`` with a heap of calls (task.Clock sorts
its whole list on every callLater: too slow for 500 peers) that runs each call at its
own time.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict, defaultdict

from twisted.internet import defer, task
from twisted.internet.base import DelayedCall

from pacsp2p.overlay.dissemination import Dissemination
from pacsp2p.overlay.swim import Swim
from pacsp2p.overlay.swimparts import ALIVE, DEAD, SwimConfig


class SimClock(task.Clock):
    def __init__(self):
        super().__init__()
        self._heap: list = []
        self._n = 0

    def callLater(self, delay, callable, *args, **kw):
        dc = DelayedCall(self.seconds() + max(0.0, delay), callable, args, kw,
                         lambda c: None, self._push, self.seconds)
        self._push(dc)
        return dc

    def _push(self, dc):
        heapq.heappush(self._heap, (dc.time, self._n, dc))
        self._n += 1

    def getDelayedCalls(self):
        return [dc for _, _, dc in self._heap if dc.active()]

    def advance(self, amount: float) -> None:
        self.run_until(self.rightNow + amount)

    def run_until(self, t: float) -> None:
        """Run every call due until *t*, each at its own time; then the time is *t*."""
        heap = self._heap
        while heap and heap[0][0] <= t:
            when, _, dc = heapq.heappop(heap)
            if dc.cancelled or dc.called or when != dc.time:
                continue
            if dc.delayed_time:
                dc.activate_delay()
                self._push(dc)
                continue
            self.rightNow = max(self.rightNow, when)
            dc.called = 1
            dc.func(*dc.args, **dc.kw)
        self.rightNow = max(self.rightNow, t)


class SimCatalog:
    """A catalog reduced to its version vector (facts are only counted). Its own facts
    are numbered from *epoch* + 1 (a real peer numbers them from its start's time in
    ms, ~1.8e12: ``overlay/reclaim.py``); ``facts`` counts the facts committed."""

    def __init__(self, name, epoch: int = 0):
        self.name, self.epoch = name, epoch
        self.vector: dict[str, int] = {}
        self.facts = 0
        self.listeners: list = []

    def write(self, n: int = 1) -> int:
        self.vector[self.name] = self.vector.get(self.name, self.epoch) + n
        self.facts += n
        self._changed()
        return self.vector[self.name]

    def _changed(self):
        for fn in list(self.listeners):
            fn()


class _Transport:
    def __init__(self, net, name):
        self.net, self.name = net, name

    def send(self, to, data):
        self.net.send(self.name, to, data)

    def linked(self, to):
        return to in self.net.links[self.name]

    def linked_names(self):
        return list(self.net.links[self.name])


class SimPeer:
    def __init__(self, net, name, config, seed):
        self.net, self.name = net, name
        self.up = True
        self.catalog = SimCatalog(name, net.epoch)
        self.swim = Swim(name, {"name": name, "n": len(net.peers)}, 1, net.clock,
                         _Transport(net, name), config, rng=random.Random(seed))
        self.dissemination = Dissemination(self.swim, lambda: self.catalog.vector,
                                           self.pull, net.clock,
                                           count=lambda: self.catalog.facts,
                                           pull_interval=net.pull_interval,
                                           ae_interval=net.ae_interval)
        self.catalog.listeners.append(self.dissemination.changed)
        self.swim.on_change.append(self._changed)
        self.events: list = []          # (time, member, old, new)

    def _changed(self, node, old):
        self.net.observe(self, node, old)

    def pull(self, target):
        return self.net.pull(self, target)


class SimNet:
    def __init__(self, seed: int = 1, loss: float = 0.0, delay=(0.001, 0.005),
                 max_links: int = 32, connect_rtts: int = 2, config: SwimConfig | None = None,
                 batch: int = 5000, pull_interval: float = 0.5, ae_interval: float = 2.0,
                 epoch: int = 0):
        self.clock = SimClock()
        self.epoch = epoch                   # every peer's facts numbered from epoch + 1
        self.rng = random.Random(seed)
        self.loss, self.delay, self.max_links = loss, delay, max_links
        self.connect_rtts, self.batch = connect_rtts, batch
        self.config = config or SwimConfig()
        self.pull_interval, self.ae_interval = pull_interval, ae_interval
        self.peers: dict[str, SimPeer] = {}
        self.links: dict[str, OrderedDict] = defaultdict(OrderedDict)
        self.groups: list[set] | None = None
        self.sent = defaultdict(int)         # name -> messages sent (SWIM + pulls)
        self.bytes = defaultdict(int)
        self.opened = defaultdict(int)       # name -> links it opened
        self.pulls = defaultdict(int)
        self.batches = defaultdict(int)      # name -> pull requests (one per batch)
        self.largest = 0
        self.watchers: list = []             # callables(time, observer, node, old, new)

    # -- peers -----------------------------------------------------------------------
    def add(self, name: str, seeds=(), start: bool = True) -> SimPeer:
        peer = self.peers[name] = SimPeer(self, name, self.config, self.rng.random())
        if start:
            self.start(peer, seeds)
        return peer

    def start(self, peer: SimPeer, seeds=()):
        peer.up = True
        peer.swim.start()
        for s in seeds:
            if s != peer.name and s in self.peers:
                # what a link's greeting does: each learns the other, then full states
                other = self.peers[s]
                self.after_rtt(peer.name, s, lambda p=peer, o=other: p.swim.contact(
                    o.name, o.swim.info, o.swim.incarnation, push_pull=True))

    def kill(self, name: str) -> None:
        """The peer's process vanishes: no message in or out, no goodbye."""
        peer = self.peers[name]
        peer.up = False
        peer.swim.stop(leave=False)
        for other in list(self.links[name]):
            self._unlink(name, other)

    def partition(self, groups) -> None:
        self.groups = [set(g) for g in groups]
        for a in list(self.links):
            for b in list(self.links[a]):
                if not self.reachable(a, b):
                    self._unlink(a, b)

    def heal(self) -> None:
        self.groups = None

    def reachable(self, a: str, b: str) -> bool:
        pa, pb = self.peers.get(a), self.peers.get(b)
        if pa is None or pb is None or not pa.up or not pb.up:
            return False
        if self.groups is None:
            return True
        return any(a in g and b in g for g in self.groups)

    # -- messages ----------------------------------------------------------------------
    def latency(self) -> float:
        return self.rng.uniform(*self.delay)

    def after_rtt(self, a, b, fn):
        self.clock.callLater(2 * self.latency(), fn)

    def _link(self, a, b) -> float:
        """Seconds before *a* can send to *b* (0 if linked; None if it cannot)."""
        if b in self.links[a]:
            self.links[a].move_to_end(b)
            self.links[b][a] = None
            self.links[b].move_to_end(a)
            return 0.0
        if not self.reachable(a, b):
            return None
        self.opened[a] += 1
        for x, y in ((a, b), (b, a)):
            self.links[x][y] = None
            while len(self.links[x]) > self.max_links:
                self._unlink(x, next(iter(self.links[x])))
        return self.connect_rtts * 2 * self.latency()

    def _unlink(self, a, b):
        self.links[a].pop(b, None)
        self.links[b].pop(a, None)

    def send(self, a: str, b: str, data: bytes) -> None:
        if not self.peers[a].up:
            return
        self.sent[a] += 1
        self.bytes[a] += len(data)
        self.largest = max(self.largest, len(data))
        wait = self._link(a, b)
        if wait is None or self.rng.random() < self.loss:
            return
        self.clock.callLater(wait + self.latency(), self._deliver, a, b, data)

    def _deliver(self, a, b, data):
        """Sent is sent: a message on its way arrives even if its sender has since
        died (as bytes already in a socket do), unless a partition cuts it."""
        pb = self.peers[b]
        if pb.up and (self.groups is None or any(a in g and b in g for g in self.groups)):
            pb.swim.receive(a, data)

    def pull(self, me: SimPeer, target: str):
        """A catalog pull: one round trip per batch, until *me* holds what *target*
        holds (or the two cannot reach each other)."""
        d = defer.Deferred()
        self.pulls[me.name] += 1

        def step():
            if not self.reachable(me.name, target):
                d.errback(ConnectionError(f"{target} unreachable"))
                return
            other = self.peers[target]
            self.batches[me.name] += 1
            self.sent[me.name] += 1
            self.sent[target] += 1
            other.dissemination.asked(me.name, dict(me.catalog.vector))
            budget, more = self.batch, False
            mine = me.catalog.vector
            for origin, seq in other.catalog.vector.items():
                if origin == me.name or seq <= mine.get(origin, 0):
                    continue
                held = max(mine.get(origin, 0), self.epoch)
                take = min(seq - held, budget)
                if take <= 0:
                    more = True
                    break
                mine[origin] = held + take
                me.catalog.facts += take
                budget -= take
                more = more or mine[origin] < seq
            me.catalog._changed()
            if more:
                self.clock.callLater(2 * self.latency(), step)
            else:
                d.callback(dict(other.catalog.vector))

        if self._link(me.name, target) is None:
            self.clock.callLater(1.0, lambda: d.errback(ConnectionError("no route")))
        else:
            self.clock.callLater(2 * self.latency(), step)
        return d

    # -- what the peers see ----------------------------------------------------------------
    def observe(self, peer, node, old):
        for fn in list(self.watchers):
            fn(self.clock.seconds(), peer.name, node, old, node.state)

    def run(self, seconds: float) -> None:
        self.clock.run_until(self.clock.seconds() + seconds)

    def live(self):
        return [p for p in self.peers.values() if p.up]

    def all_see(self, name: str, state: str, observers=None) -> bool:
        for p in observers or self.live():
            if p.name == name:
                continue
            node = p.swim.nodes.get(name)
            if node is None or node.state != state:
                return False
        return True

    def converged(self) -> bool:
        """Every live peer sees every other live peer alive."""
        names = [p.name for p in self.live()]
        for p in self.live():
            for n in names:
                if n != p.name:
                    node = p.swim.nodes.get(n)
                    if node is None or node.state != ALIVE:
                        return False
        return True

    def run_until(self, predicate, limit: float, step: float = 0.05) -> float | None:
        """Advance until *predicate()* holds (checked every *step*); seconds taken or
        None after *limit*."""
        start = self.clock.seconds()
        while self.clock.seconds() - start < limit:
            if predicate():
                return self.clock.seconds() - start
            self.run(step)
        return self.clock.seconds() - start if predicate() else None


__all__ = ["SimClock", "SimNet", "SimPeer", "SimCatalog", "ALIVE", "DEAD"]
