"""What a SWIM member learns: the merge rules of its view, and one name at one address.

The rules of SWIM (Das, Gupta & Motivala, DSN 2002, §4.2) with Lifeguard's suspicion
(Dadgar, Phillips & Currey, 2018), as HashiCorp's memberlist applies them: news about a
member counts only with an incarnation above the one held (alive) or at least it
(suspect, dead); a member told it is suspected or dead *refutes* by raising its own
incarnation; a suspicion starts Lifeguard's shrinking timer (``swimparts._Suspicion``).
``Swim`` (``swim.py``) inherits these rules; this module is their one place.

One name, one process. A member is known by its name and reached at the address its
info gives (``host``, ``port``). Two processes started under one name (a copied
config, a second certificate for the name) would each refute the other for ever and
both write the catalog's facts of that origin (``sync.py``). So, as memberlist's
``aliveNode`` does, an alive claim of a member at ANOTHER address than the one held is
not taken while the member held is alive or suspected, whatever its incarnation: the
process already known keeps the name. It is taken once that member is dead, whatever
its incarnation (memberlist's ``updatesNode``: a peer restarted elsewhere after its old
address was declared dead rejoins, and so does the process that kept the name once a
twin started later, hence of a higher incarnation, stopped), and a restart at the same
address is no conflict at all (its incarnation, taken from its start time, is above the
old one's). A member that hears a claim of its own name at another address
with an incarnation at least its own (a lower one is news of an earlier process of its
own, restarted since: ignored) refutes it, as SWIM refutes a suspicion. Gossip comes
from any member, so nothing heard in gossip makes a member give its name up: a newcomer
gives it up only when a peer refuses its Hello (``claims.py``); ``yielded`` is then set
here (no more refutations, and no "dead" announced on leaving: that would kill the
holder in the others' views). Each conflict goes to the ``on_conflict`` callbacks
(name, holder's info, the other claim's info); logging them (bounded) is the caller's.
"""

from __future__ import annotations

from pacsp2p.overlay.swimparts import ALIVE, DEAD, SUSPECT, Node, _Suspicion


def address(wire: dict) -> tuple:
    """Where a member's info says it is reached: (host, port)."""
    return wire.get("host"), wire.get("port")


class Merge:
    """The merge rules of ``Swim`` (a mixin: it uses the member's ``nodes``, ``queue``,
    ``clock``, ``on_change``, ``on_conflict`` ... set up by ``Swim.__init__``)."""

    yielded = False               # another process holds our name: we gave it up

    def _set(self, node: Node, state: str):
        old = node.state
        self._live += (state != DEAD) - (old != DEAD)
        node.state, node.since = state, self.clock.seconds()
        if old == DEAD and state != DEAD:        # back: its verdicts of before are stale
            self.__dict__.setdefault("_back", {})[node.name] = node.since
        if state != SUSPECT and node.suspicion is not None:
            node.suspicion.cancel()
            node.suspicion = None
        for fn in list(self.on_change):
            fn(node, old)

    def _announce_self(self):
        self.broadcast(("m", self.name), ["a", self.name, self.incarnation, self.info])

    def _refute(self, inc: int):
        self.incarnation = max(self.incarnation, inc) + 1
        self.stats["refuted"] += 1
        self._aware(1)
        self._announce_self()

    def _conflict(self, name: str, holder: dict, other: dict):
        for fn in list(self.on_conflict):
            fn(name, holder, other)

    def gone(self, name: str, wire: dict) -> None:
        """The member *name* held at *wire*'s address does not answer there while a
        process with its name's certificate shows itself elsewhere: dead in this view
        only (not gossiped: a "dead" names no address, and would kill the other process
        in the views that hold it), so that process's alive is taken next."""
        node = self.nodes.get(name)
        if node is not None and node.state != DEAD and address(node.wire) == address(wire):
            self._set(node, DEAD)

    def give_up(self):
        """Another process holds our name: stop refuting, and leave without a word."""
        self.yielded = self.leaving = True

    def _on_alive(self, name: str, inc: int, wire: dict, state: str = ALIVE):
        if name == self.name:
            if address(wire) != address(self.info):
                if inc >= self.incarnation and not self.leaving:
                    self._conflict(name, self.info, wire)
                    self._refute(inc)
            elif inc > self.incarnation or (inc == self.incarnation and wire != self.info):
                if not self.leaving:
                    self._refute(inc)
            return
        node = self.nodes.get(name)
        if node is None:
            node = self.nodes[name] = self.node_class(name, wire, inc, state,
                                                      self.clock.seconds())
            self._names.append(name)
            self._live += state != DEAD
            if state != DEAD:
                # probed in this round, at a random place
                self._ring.insert(self.rng.randint(self._ring_i, len(self._ring)), name)
                self.broadcast(("m", name), ["a", name, inc, wire])
            for fn in list(self.on_change):
                fn(node, None)
            return
        moved = node.state == DEAD and address(wire) != address(node.wire)
        if inc <= node.incarnation and not moved:
            return
        if node.state != DEAD and address(wire) != address(node.wire):
            self._conflict(name, node.wire, wire)
            return
        node.incarnation, node.wire = inc, wire
        self.broadcast(("m", name), ["a", name, inc, wire])
        if node.state != ALIVE:
            self._set(node, ALIVE)
        else:
            for fn in list(self.on_change):
                fn(node, ALIVE)

    def _on_suspect(self, name: str, inc: int, origin: str):
        if name == self.name:
            if inc >= self.incarnation and not self.leaving:
                self._refute(inc)
            return
        node = self.nodes.get(name)
        if node is None or inc < node.incarnation or node.state == DEAD or \
                self._stale(origin, name):
            return
        if node.state == SUSPECT:
            if node.suspicion is not None and node.suspicion.confirm(origin):
                self.broadcast(("m", name), ["s", name, node.incarnation, origin])
            return
        node.incarnation = inc
        self.stats["suspected"] += 1
        k = self.config.suspicion_confirmations
        n = self.members()
        if n - 2 < k:
            k = 0
        low, high = self.config.suspicion_timeouts(n)
        self._set(node, SUSPECT)
        node.suspicion = _Suspicion(self, node, origin, k, low, high)
        self.broadcast(("m", name), ["s", name, inc, origin])

    def _stale(self, origin: str, name: str) -> bool:
        """A suspicion or death of *name* told by *origin*, a member this view holds dead
        or held dead until less than the longest suspicion ago: a verdict of a peer that
        was cut off (it declared the others dead while alone), heard as the cut heals;
        taken, it killed a healthy member in third peers' views until it refuted (fault
        injection, sixteenth session). Its own leave counts."""
        node = self.nodes.get(origin)
        if origin == name or node is None:
            return False
        back = getattr(self, "_back", {}).get(origin)
        return node.state == DEAD or back is not None and \
            self.clock.seconds() - back < self.config.suspicion_timeouts(self.members())[1]

    def _suspicion_expired(self, node: Node, suspicion: _Suspicion):
        if node.suspicion is not suspicion or node.state != SUSPECT:
            return
        node.suspicion = None
        self._on_dead(node.name, node.incarnation, self.name)

    def _on_dead(self, name: str, inc: int, origin: str):
        if name == self.name:
            if not self.leaving and inc >= self.incarnation:
                self._refute(inc)
            return
        node = self.nodes.get(name)
        if node is None or inc < node.incarnation or node.state == DEAD or \
                self._stale(origin, name):
            return
        node.incarnation = inc
        self.stats["dead"] += 1
        self._set(node, DEAD)
        self.broadcast(("m", name), ["d", name, inc, origin])
