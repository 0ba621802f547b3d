"""One name, one process: the peer's side of a peer name claimed at two addresses.

The rule is SWIM's merge rule of ``merge.py`` (Das et al. 2002 with Lifeguard, as
memberlist's ``aliveNode`` applies it): a member is reached at the address its info
gives, and a claim of its name at another address is not taken while the member held
there is alive or suspected: the process already known keeps the name. This module
applies it where a process shows itself — the Hello of a link, authenticated by the
certificate of the name — and says what happened:

- a link whose Hello claims a name that a live member (or this peer) holds at another
  address is refused: the Hello is answered ``NameInUse`` naming where the name is
  held, and the link is not used (closed after ``DIAL_TIMEOUT``);
- a peer whose Hello is refused so while it joins (no member alive yet: it is the
  newcomer) gives its name up: the peer stops with one line (``fatal``), like the other
  start errors, without telling the others it leaves (that would declare the holder
  dead). Refused later (it joined through peers that did not know the holder), it
  logs the line and goes on: gossip, which any member may send, never stops a peer;
- every conflict, seen here or by SWIM (``Swim.on_conflict``), is one error line naming
  both addresses, at most once per conflict and ``CONFLICT_EVERY`` seconds.

A peer restarted at its address is no conflict (same address); restarted at another,
it is refused until the cluster has declared its old address dead (a kill -9 and a
restart within the suspicion timeout: the line says to start it again), then it joins.
"""

from __future__ import annotations

from twisted.logger import Logger

from pacsp2p.overlay.commands import NameInUse
from pacsp2p.overlay.merge import address
from pacsp2p.overlay.swimparts import DEAD

log = Logger()

CONFLICT_EVERY = 300.0     # seconds between two lines about one conflict
DIAL_TIMEOUT = 10.0        # a refused link is closed after this (its dialler closes first)
MAX_TOLD = 64              # conflicts remembered for the bound above


def at(wire: dict) -> str:
    """host:port of a member's info."""
    host, port = address(wire)
    return f"{host or '?'}:{port}"


class Claims:
    """Checks and reports of one peer (``membership.Membership``)."""

    def __init__(self, membership, fatal=None):
        self.membership = membership
        self.swim = membership.swim
        self.fatal = fatal                  # fatal(why): stop the peer with one line
        self.told: dict = {}                # (name, holder, other) -> when last logged
        self.refusals = 0                   # Hellos refused for a name in use

    def check(self, link, name: str, wire: dict) -> None:
        """Raise NameInUse if *link*'s Hello claims *name* (info *wire*, checked) at
        another address than the live member (or this peer) holding it."""
        swim = self.swim
        if name == swim.name:
            held = swim.info
        else:
            member = swim.nodes.get(name)
            if member is None or member.state == DEAD:
                return
            held = member.wire
        if address(wire) == address(held) or swim.yielded:
            return                           # a restart, or a seed that is ourselves
        self.conflict(name, held, wire)
        self.refusals += 1
        self.membership.reactor.callLater(DIAL_TIMEOUT, link.close)
        raise NameInUse(f"{name} is alive at {at(held)} (said {swim.name})")

    def refused(self, why: str) -> None:
        """A peer answered our Hello NameInUse (*why*)."""
        swim = self.swim
        if swim.yielded:
            return
        here = at(swim.info)
        if any(m.state != DEAD for m in swim.nodes.values()):
            self._once(("refused", why), "overlay: this peer's name {name} is in use "
                       "elsewhere: {why} (this peer is at {here}): two peers must not share "
                       "a name, stop the other one", name=swim.name, why=why, here=here)
            return
        swim.give_up()
        why = (f"overlay: the peer name {swim.name} is in use: {why} (this peer is at "
               f"{here}); another process runs under this name: if it was stopped, start "
               f"this one again once the cluster has declared it dead")
        if self.fatal is not None:
            self.fatal(why)
        else:
            log.error("{why}", why=why)

    def conflict(self, name: str, holder: dict, other: dict) -> None:
        """Two processes claim *name*, the one at *holder* keeps it (``on_conflict``)."""
        if name == self.swim.name:
            self._once((name, at(holder), at(other)),
                       "overlay: another process claims this peer's name {name} at "
                       "{other}; this peer, at {holder}, keeps it: two peers must not "
                       "share a name, stop the other one",
                       name=name, other=at(other), holder=at(holder))
        else:
            self._once((name, at(holder), at(other)),
                       "overlay: two processes claim the peer name {name}: at {holder} "
                       "(kept) and at {other} (refused): two peers must not share a "
                       "name, stop the other one",
                       name=name, holder=at(holder), other=at(other))

    def _once(self, key, fmt: str, **kw) -> None:
        now = self.membership.reactor.seconds()
        if now - self.told.get(key, -CONFLICT_EVERY) < CONFLICT_EVERY:
            return
        if len(self.told) >= MAX_TOLD:
            self.told.clear()
        self.told[key] = now
        log.error(fmt, **kw)
