"""Membership and failure detection: SWIM with the Lifeguard refinements.

Das, Gupta & Motivala, "SWIM: Scalable Weakly-consistent Infection-style Process Group
Membership Protocol", DSN 2002; Dadgar, Phillips & Currey, "Lifeguard: Local Health
Awareness for More Accurate Failure Detection", DSN Workshops 2018 (arXiv:1707.00788).
The parameters and a few details follow HashiCorp's memberlist, the reference
implementation of both papers.

Each protocol period (``probe_interval``) a peer probes ONE other member, taken in turn
from a shuffled list (randomized round-robin, SWIM §4.3): it sends ``ping`` and waits
``probe_timeout`` for ``ack``; without one it asks ``indirect_checks`` other members to
ping the target for it (``preq``), which answer ``ack`` (relayed) or, Lifeguard's
addition, ``nack`` when they heard nothing either. A target that stays silent until the
end of the period is *suspected*, not declared dead: the suspicion is gossiped, and the
suspected member, told of it (the next ping it gets carries it: Lifeguard's "buddy
system"), refutes it by raising its *incarnation*. A suspicion that nobody refutes
becomes a death after a timeout that starts long and shrinks as other members
independently suspect the same member (Lifeguard's LHA-Suspicion: ``suspicion_min`` to
``suspicion_max_mult`` times that, log-scaled by the members' count). A peer that
misses its own deadlines (acks it should have had, nacks that did not come, suspicions
of itself) raises its *local health multiplier* and probes more patiently
(LHA-Probe), so a peer that is slow itself does not accuse healthy ones.

Everything learned (alive with incarnation and info, suspect, dead) is *piggybacked*
on the probe traffic and on small gossip messages sent every ``gossip_interval`` to
``gossip_nodes`` members (only while there is something to tell); each item is sent
``retransmit_mult * ceil(log10(N + 1))`` times, newest and least-sent first, within a
size budget. So a peer sends O(1) messages per period whatever the cluster's size, and
an event reaches everybody in O(log N) periods. A full state exchange (push-pull) runs
when a peer joins through a seed, now and then with a random member (partitions heal),
and with a random dead member every ``reconnect_interval`` (a member that was only cut
off hears that it was declared dead and refutes it). Full states are cut into messages
of at most ``max_message`` bytes.

The core is transport-agnostic: it sends and receives opaque bytes addressed by member
name through a ``transport`` (``send(name, data)``, ``linked(name)``, ``linked_names()``:
the members it holds a link to, which gossip prefers) and keeps time
through an ``IReactorTime`` (the reactor in a peer, ``task.Clock`` in the simulation),
so the same code runs in a peer (``membership.py``, over mutual-TLS AMP) and in
``bench/overlay_sim.py``. Every message that arrives is checked (size, shape, types,
bounds) before it is used; a bad one is dropped and counted.

How what is heard changes the view (incarnation order, refutation, and a name claimed
by two processes at two addresses) is ``merge.py``.

Extensions (catalog dissemination, ``dissemination.py``) add fields to pings and acks
(``fields_out``/``fields_in``) and their own kinds of piggybacked items (``rumors``).
"""

from __future__ import annotations

import json
import math
import random
from typing import Callable

from pacsp2p.overlay.merge import Merge
from pacsp2p.overlay.swimparts import (ALIVE, Broadcasts, DEAD, Invalid, MAX_ENTRIES,
                                       MAX_INT, MAX_MESSAGE, Node, SUSPECT, SwimConfig,
                                       _CODE_OF, _Probe, _Relay, _STATE_CODES,
                                       _int, _name, encode)


class Swim(Merge):
    """SWIM + Lifeguard for member *name* (its *info*: a JSON-able dict, gossiped); how
    what it hears changes its view (incarnations, refutation, one name at one address)
    is ``merge.Merge``."""

    def __init__(self, name: str, info: dict, incarnation: int, clock, transport,
                 config: SwimConfig | None = None, rng: random.Random | None = None,
                 node_class=Node, check_info: Callable[[dict], dict] | None = None,
                 excused: Callable[[str], bool] | None = None):
        self.name = name
        self.info = info
        self.incarnation = int(incarnation)
        self.clock = clock
        self.transport = transport
        self.config = config or SwimConfig()
        self.rng = rng or random.Random()
        self.node_class = node_class
        self.check_info = check_info or (lambda d: d)
        self.excused = excused or (lambda name: False)
        self.nodes: dict[str, Node] = {}
        self.queue = Broadcasts()
        self.awareness = 0
        self.on_change: list = []          # callbacks(node, old state or None)
        self.on_conflict: list = []        # callbacks(name, holder's info, other's)
        self.fields_out: list = []         # callables(dest) -> dict merged into ping/ack
        self.fields_in: list = []          # callables(sender, msg)
        self.rumors: dict = {}             # kind -> callable(sender, entry)
        self.stats = dict.fromkeys(("sent", "received", "bytes_sent", "probes",
                                    "indirect", "suspected", "dead", "refuted",
                                    "invalid", "dropped_too_big", "late"), 0)
        self.running = False
        self.leaving = False
        self._seq = 0
        self._pending: dict[int, object] = {}     # seq -> _Probe | _Relay
        self._ring: list[str] = []
        self._ring_i = 0
        self._calls: dict[str, object] = {}
        self._replied: dict[str, float] = {}
        self._names: list[str] = []        # every member's name, for random picks
        self._live = 0                     # members not dead

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        c = self.config
        jitter = self.rng.random()
        self._after("probe", c.probe_interval * jitter, self._probe_tick)
        self._after("gossip", c.gossip_interval * jitter, self._gossip_tick)
        self._after("push_pull", self._push_pull_every() * (0.5 + jitter), self._push_pull_tick)
        self._after("reconnect", c.reconnect_interval * (0.5 + jitter), self._reconnect_tick)

    def stop(self, leave: bool = True) -> None:
        """Stop; with *leave*, tell a few members first that we leave (dead, by us)."""
        if leave and self.running and not self.yielded:
            self.leaving = True
            entry = ["d", self.name, self.incarnation, self.name]
            for node in self._pick(max(3, self.config.gossip_nodes), prefer_linked=True):
                self._send(node.name, {"t": "gossip"}, first=[entry])
        self.running = False
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        for item in self._pending.values():
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
        self._pending.clear()
        for node in self.nodes.values():
            if node.suspicion is not None:
                node.suspicion.cancel()
                node.suspicion = None

    def _after(self, what, delay, fn):
        self._calls[what] = self.clock.callLater(delay, fn)

    # -- what others ask ---------------------------------------------------------------
    def members(self) -> int:
        """N: this member and those alive or suspected."""
        return 1 + self._live

    def alive(self, name: str) -> bool:
        """A member until declared dead (a suspected member is still one)."""
        node = self.nodes.get(name)
        return name == self.name or (node is not None and node.state != DEAD)

    def scaled(self, t: float) -> float:
        return t * (self.awareness + 1)

    def update_info(self, info: dict) -> None:
        """Our info changed (an archive went down...): tell everybody."""
        self.info = info
        self.incarnation += 1
        self._announce_self()

    def contact(self, name: str, wire: dict, incarnation: int, push_pull: bool = False):
        """A member introduced itself (a link's greeting): merge it; with *push_pull*
        (we joined through it) exchange full states with it."""
        if name == self.name:
            return
        try:
            self._on_alive(name, _int(incarnation), self.check_info(wire))
        except (Invalid, ValueError, TypeError):
            self.stats["invalid"] += 1
            return
        if push_pull:
            self.push_pull(name, join=True)

    def broadcast(self, key, entry: list) -> None:
        """Queue *entry* to piggyback (replacing the queued one of the same *key*)."""
        self.queue.put(key, entry)

    # -- sending -----------------------------------------------------------------------
    def _limit(self) -> int:
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(self.members() + 1)))

    def _send(self, name: str, msg: dict, first=(), fields: bool = False) -> None:
        if fields:
            for fn in self.fields_out:
                msg.update(fn(name))
        base = len(encode(msg)) + 8
        budget = self.config.max_message - base
        entries = []
        for e in first:
            size = len(encode(e)) + 1
            if size <= budget:
                entries.append(e)
                budget -= size
        entries += self.queue.take(budget, self._limit())
        if entries:
            msg["g"] = entries
        data = encode(msg)
        if len(data) > MAX_MESSAGE:          # cannot happen with sane budgets; be sure
            self.stats["dropped_too_big"] += 1
            return
        self.stats["sent"] += 1
        self.stats["bytes_sent"] += len(data)
        self.transport.send(name, data)

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % MAX_INT
        return self._seq

    def _pick(self, k: int, exclude=(), states=(ALIVE, SUSPECT), prefer_linked=False):
        """Up to *k* random members in *states* (with *prefer_linked*, those we hold a
        link to first)."""
        if not prefer_linked and len(self._names) > 4 * k:
            # random draws (cheap with many members); a full scan if they miss too often
            got = {}
            for _ in range(8 * k):
                node = self.nodes[self._names[self.rng.randrange(len(self._names))]]
                if node.state in states and node.name not in exclude:
                    got[node.name] = node
                    if len(got) == k:
                        return list(got.values())
        cands = [n for n in self.nodes.values() if n.state in states and n.name not in exclude]
        if len(cands) <= k:
            self.rng.shuffle(cands)
            return cands
        if prefer_linked:
            linked = [n for n in cands if self.transport.linked(n.name)]
            if len(linked) >= k:
                return self.rng.sample(linked, k)
            rest = [n for n in cands if not self.transport.linked(n.name)]
            return linked + self.rng.sample(rest, k - len(linked))
        return self.rng.sample(cands, k)

    # -- probing -----------------------------------------------------------------------
    def _next_target(self) -> Node | None:
        for _ in range(len(self._ring) + 2):
            if self._ring_i >= len(self._ring):
                self._ring = [n for n, node in self.nodes.items() if node.state != DEAD]
                self.rng.shuffle(self._ring)
                self._ring_i = 0
                if not self._ring:
                    return None
            node = self.nodes.get(self._ring[self._ring_i])
            self._ring_i += 1
            if node is not None and node.state != DEAD:
                return node
        return None

    def _probe_tick(self):
        if not self.running:
            return
        self._stood_still(self._calls["probe"])     # a lagging reactor: more patience
        target = self._next_target()
        if target is not None:
            self._probe(target)
        self._after("probe", self.scaled(self.config.probe_interval), self._probe_tick)

    def _probe(self, node: Node):
        self.stats["probes"] += 1
        probe = _Probe(node.name, self._next_seq(), self.clock.seconds())
        self._pending[probe.seq] = probe
        first = [self._claim(node)] if node.state == SUSPECT else []    # buddy system
        self._send(node.name, {"t": "ping", "seq": probe.seq, "to": node.name},
                   first=first, fields=True)
        probe.timer = self.clock.callLater(self.scaled(self.config.probe_timeout),
                                           self._probe_timed_out, probe)

    def _probe_timed_out(self, probe: _Probe):
        if probe.acked or not self.running:
            return
        helpers = self._pick(self.config.indirect_checks, exclude=(probe.target,),
                             states=(ALIVE,), prefer_linked=True)
        for h in helpers:
            self.stats["indirect"] += 1
            self._send(h.name, {"t": "preq", "seq": probe.seq, "to": probe.target})
        probe.expected_nacks = len(helpers)
        rest = self.scaled(self.config.probe_interval) - self.scaled(self.config.probe_timeout)
        probe.timer = self.clock.callLater(max(rest, 0.0), self._probe_ended, probe)

    def _probe_ended(self, probe: _Probe):
        if not probe.acked and self.running and not probe.waited and \
                self._stood_still(probe.timer):
            probe.waited = True         # its ack may wait unread: read it first
            probe.timer = self.clock.callLater(self.scaled(self.config.probe_timeout),
                                               self._probe_ended, probe)
            return
        self._pending.pop(probe.seq, None)
        if probe.acked or not self.running:
            return
        if probe.expected_nacks:
            self._aware(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._aware(1)
        node = self.nodes.get(probe.target)
        if node is None or node.state == DEAD or self.excused(node.name):
            return
        self._on_suspect(node.name, node.incarnation, self.name)

    def _stood_still(self, call) -> bool:
        """*call*, a timer firing now, fired more than half a probe timeout past its
        time: this process stood still (frozen, its reactor blocked or starved), and what
        arrived meanwhile -- acks, refutations -- waits unread, as the reactor runs the
        timers past due before it reads. A verdict is then put off once, by a probe
        timeout, and the lag counts as a missed deadline (Lifeguard's local health): on
        resume, a suspicion's timer declared a member dead that had refuted meanwhile
        (tests/cluster/test_false_death.py). Never in a simulation (timers on time)."""
        if self.clock.seconds() - call.getTime() <= self.config.probe_timeout / 2:
            return False
        self.stats["late"] += 1
        self._aware(1)
        return True

    def _aware(self, delta: int):
        self.awareness = min(max(self.awareness + delta, 0), self.config.awareness_max - 1)

    def _claim(self, node: Node) -> list:
        """What we hold against *node* (suspect or dead), as an item."""
        return [_CODE_OF[node.state], node.name, node.incarnation, self.name]

    # -- receiving ---------------------------------------------------------------------
    def receive(self, sender: str, data: bytes) -> None:
        """A message from member *sender* (authenticated by the transport)."""
        if not self.running:
            return
        self.stats["received"] += 1
        try:
            if len(data) > MAX_MESSAGE:
                raise Invalid("too big")
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise Invalid("not an object")
            kind = msg.get("t")
            handler = self._handlers.get(kind)
            if handler is None:
                raise Invalid("unknown kind")
            handler(self, sender, msg)
        except (Invalid, ValueError, TypeError, KeyError, RecursionError):
            self.stats["invalid"] += 1

    def _piggyback(self, sender: str, msg: dict):
        entries = msg.get("g")
        if entries is None:
            return
        if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            raise Invalid("bad items")
        for entry in entries:
            try:
                self._item(sender, entry)
            except (Invalid, ValueError, TypeError, KeyError):
                self.stats["invalid"] += 1

    def _item(self, sender: str, e):
        if not isinstance(e, list) or not e or not isinstance(e[0], str):
            raise Invalid("bad item")
        kind = e[0]
        if kind in ("a", "s", "d"):
            if len(e) != 4:
                raise Invalid("bad item")
            name, inc = _name(e[1]), _int(e[2])
            if kind == "a":
                if not isinstance(e[3], dict):
                    raise Invalid("bad info")
                self._on_alive(name, inc, self.check_info(e[3]))
            elif kind == "s":
                self._on_suspect(name, inc, _name(e[3]))
            else:
                self._on_dead(name, inc, _name(e[3]))
        else:
            handler = self.rumors.get(kind)
            if handler is not None:
                handler(sender, e)

    def _fields(self, sender, msg):
        for fn in self.fields_in:
            fn(sender, msg)

    def _h_ping(self, sender, msg):
        seq = _int(msg["seq"])
        if msg.get("to") != self.name:
            raise Invalid("ping for someone else")
        self._piggyback(sender, msg)
        self._fields(sender, msg)
        node = self.nodes.get(sender)
        first = [self._claim(node)] if node is not None and node.state != ALIVE else []
        self._send(sender, {"t": "ack", "seq": seq}, first=first, fields=True)

    def _h_ack(self, sender, msg):
        seq = _int(msg["seq"])
        self._piggyback(sender, msg)
        self._fields(sender, msg)
        item = self._pending.pop(seq, None)
        if isinstance(item, _Probe):
            item.acked = True
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
            if sender == item.target:
                node = self.nodes.get(sender)
                if node is not None:
                    node.rtt = self.clock.seconds() - item.start
            self._aware(-1)
        elif isinstance(item, _Relay):
            if item.timer is not None and item.timer.active():
                item.timer.cancel()
            self._send(item.requester, {"t": "ack", "seq": item.seq})

    def _h_nack(self, sender, msg):
        seq = _int(msg["seq"])
        self._piggyback(sender, msg)
        item = self._pending.get(seq)
        if isinstance(item, _Probe):
            item.nacks += 1

    def _h_preq(self, sender, msg):
        seq, target = _int(msg["seq"]), _name(msg["to"])
        self._piggyback(sender, msg)
        if target == self.name:
            self._send(sender, {"t": "ack", "seq": seq})
            return
        relay = _Relay(sender, seq)
        mine = self._next_seq()
        self._pending[mine] = relay
        self._send(target, {"t": "ping", "seq": mine, "to": target}, fields=True)
        relay.timer = self.clock.callLater(0.8 * self.config.probe_timeout,
                                           self._relay_timed_out, mine, relay)

    def _relay_timed_out(self, seq, relay):
        if self._pending.get(seq) is relay:
            self._send(relay.requester, {"t": "nack", "seq": relay.seq})
            # keep it a little longer: a late ack is still relayed
            relay.timer = self.clock.callLater(self.config.probe_interval,
                                               self._pending.pop, seq, None)

    def _h_gossip(self, sender, msg):
        self._piggyback(sender, msg)

    def _h_state(self, sender, msg):
        entries = msg.get("m")
        if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            raise Invalid("bad state")
        self._piggyback(sender, msg)
        for e in entries:
            try:
                if not isinstance(e, list) or len(e) != 4 or e[2] not in _STATE_CODES:
                    raise Invalid("bad state entry")
                name, inc, state = _name(e[0]), _int(e[1]), _STATE_CODES[e[2]]
                if state == ALIVE:
                    if not isinstance(e[3], dict):
                        raise Invalid("bad info")
                    self._on_alive(name, inc, self.check_info(e[3]))
                else:
                    # another's "dead" is only a suspicion here (memberlist mergeState)
                    if name not in self.nodes and name != self.name and isinstance(e[3], dict):
                        self._on_alive(name, inc, self.check_info(e[3]), state=DEAD)
                    else:
                        self._on_suspect(name, inc, sender)
            except (Invalid, ValueError, TypeError):
                self.stats["invalid"] += 1
        if msg.get("r") and msg.get("last"):
            now = self.clock.seconds()
            if now - self._replied.get(sender, -1e9) >= 1.0:
                self._replied[sender] = now
                self.push_pull(sender, reply=False)

    _handlers = {"ping": _h_ping, "ack": _h_ack, "nack": _h_nack, "preq": _h_preq,
                 "gossip": _h_gossip, "state": _h_state}

    # -- full state (push-pull) ---------------------------------------------------------
    def push_pull(self, name: str, reply: bool = True, join: bool = False) -> None:
        """Send our full state to *name* (cut into messages of at most MAX_MESSAGE
        bytes); with *reply* it answers with its own."""
        entries = [[self.name, self.incarnation, "a", self.info]] + [
            [n.name, n.incarnation, _CODE_OF[n.state], n.wire] for n in self.nodes.values()]
        budget = MAX_MESSAGE - 200
        chunk, size = [], 0
        chunks = []
        for e in entries:
            s = len(encode(e)) + 1
            if chunk and (size + s > budget or len(chunk) >= MAX_ENTRIES):
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(e)
            size += s
        chunks.append(chunk)
        for i, chunk in enumerate(chunks):
            msg = {"t": "state", "m": chunk}
            if reply:
                msg["r"] = 1
            if i == len(chunks) - 1:
                msg["last"] = 1
            data = encode(msg)
            self.stats["sent"] += 1
            self.stats["bytes_sent"] += len(data)
            self.transport.send(name, data)

    def _push_pull_every(self) -> float:
        n = self.members()
        scale = 1 + max(0, math.ceil(math.log2(n) - math.log2(32))) if n > 32 else 1
        return self.config.push_pull_interval * scale

    def _push_pull_tick(self):
        if not self.running:
            return
        for node in self._pick(1, states=(ALIVE,)):
            self.push_pull(node.name)
        self._after("push_pull", self._push_pull_every(), self._push_pull_tick)

    def _reconnect_tick(self):
        if not self.running:
            return
        for node in self._pick(1, states=(DEAD,)):
            self.push_pull(node.name)
        self._after("reconnect", self.config.reconnect_interval, self._reconnect_tick)

    # -- gossip ------------------------------------------------------------------------
    def _gossip_tick(self):
        if not self.running:
            return
        if self.queue.urgent:
            for node in self._gossip_targets():
                if not len(self.queue):
                    break
                self._send(node.name, {"t": "gossip"})
        self._after("gossip", self.config.gossip_interval, self._gossip_tick)

    def _gossip_targets(self) -> list:
        """``gossip_nodes`` members: one drawn from all (news keeps mixing through the
        whole cluster), the others among those we hold a link to (no new connection for
        each round; the pool itself follows the random probes)."""
        chosen = {n.name: n for n in self._pick(1)}
        linked = [self.nodes[n] for n in self.transport.linked_names()
                  if n in self.nodes and self.nodes[n].state != DEAD and n not in chosen]
        k = self.config.gossip_nodes - len(chosen)
        if len(linked) > k:
            linked = self.rng.sample(linked, k)
        for n in linked:
            chosen[n.name] = n
        if len(chosen) < self.config.gossip_nodes:
            for n in self._pick(self.config.gossip_nodes - len(chosen), exclude=chosen):
                chosen[n.name] = n
        return list(chosen.values())
