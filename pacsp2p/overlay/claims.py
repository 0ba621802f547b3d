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
  logs the line and goes on: gossip, or another member's word, never stops a peer;
- every conflict, seen here or by SWIM (``Swim.on_conflict``), is one error line naming
  both addresses, at most once per conflict and ``CONFLICT_EVERY`` seconds;
- a Hello refused for a member held elsewhere makes this peer reach the member where
  it holds it: if it cannot (the process there stopped: a twin that gave the name up),
  that member is dead in this view (``Merge.gone``), and the next Hello is taken;
- a peer told that its own name is held at another address (a refused Hello names it,
  SWIM hears it) checks it itself: it dials that address (at most once per address and
  ``CONFLICT_EVERY``). Only a process holding this name's certificate completes that
  TLS handshake with this name, so its Hello is the other process's own word, with its
  start time (``started``, ms). Of the two, the one started later (on a tie, the one at
  the larger address) stops with one line, as at start: told in that Hello if it is
  the one answering it, or by the NameInUse answer of the other process itself (on a
  link whose certificate is this name) if it is the one that dialled.

A peer restarted at its address is no conflict (same address); restarted at another,
it is refused until the cluster has declared its old address dead (a kill -9 and a
restart within the suspicion timeout: the line says to start it again), then it joins.
"""

from __future__ import annotations

import json
import re

from twisted.logger import Logger

from pacsp2p.overlay.commands import NameInUse
from pacsp2p.overlay.merge import address
from pacsp2p.overlay.swimparts import DEAD

log = Logger()

CONFLICT_EVERY = 300.0     # seconds between two lines about one conflict
DIAL_TIMEOUT = 10.0        # a refused link is closed after this (its dialler closes first)
MAX_TOLD = 64              # conflicts remembered for the bound above
_HELD_AT = re.compile(r" is alive at (\S{1,300}) \(said ")    # a NameInUse's words


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

    def check(self, link, name: str, wire: dict, started=None) -> None:
        """Raise NameInUse if *link*'s Hello claims *name* (info *wire*, checked) at
        another address than the live member (or this peer) holding it. A Hello with
        this peer's own name (its certificate's) is the other process's: if that one
        started before this one (*started*), this peer stops instead."""
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
        if name == swim.name and self._later(started, wire):
            self._stop(f"{name} is alive at {at(wire)}, started before this one (its "
                       f"own Hello said so)")
            return
        self.conflict(name, held, wire, verify=False)
        if name != swim.name:           # is the one we hold still there?
            self.membership.link_for(name).addErrback(
                lambda _: swim.gone(name, held))
        self.refusals += 1
        self.membership.reactor.callLater(DIAL_TIMEOUT, link.close)
        raise NameInUse(f"{name} is alive at {at(held)} (said {swim.name})")

    def _later(self, started, wire: dict) -> bool:
        """Whether this process started after the one that said *started* (ms) and is at
        *wire*'s address (an unknown start: no)."""
        if not isinstance(started, int) or isinstance(started, bool) or \
                not 0 < started < 1 << 53:
            return False
        mine = self.membership.started
        return mine > started or (mine == started and
                                  str(address(self.swim.info)) > str(address(wire)))

    def refused(self, why: str, link=None) -> None:
        """A peer answered our Hello NameInUse (*why*) on *link*."""
        swim = self.swim
        if swim.yielded:
            return
        here = at(swim.info)
        twin = link is not None and link.peer_name == swim.name
        if not twin and any(m.state != DEAD for m in swim.nodes.values()):
            self._once(("refused", why), "overlay: this peer's name {name} is in use "
                       "elsewhere: {why} (this peer is at {here}): two peers must not share "
                       "a name, stop the other one", name=swim.name, why=why, here=here)
            self._verify(why)
            return
        self._stop(why)

    def answered(self, info_json: str) -> None:
        """The Hello answer on a link we dialled whose certificate is this peer's name:
        a seed that is ourselves, or the other process, which stops if it started later
        (``check``) and keeps the name otherwise (its answer was then NameInUse)."""
        try:
            info = json.loads(info_json)
        except ValueError:
            return
        if isinstance(info, dict) and address(info) != address(self.swim.info):
            host, port = address(info)
            self.conflict(self.swim.name, self.swim.info,
                          {"host": str(host)[:255], "port": port}, verify=False)

    def _stop(self, why: str) -> None:
        """Give this peer's name up: stop with one line, without a word to the others."""
        swim = self.swim
        if swim.yielded:
            return
        here = at(swim.info)
        running = any(m.state != DEAD for m in swim.nodes.values())
        swim.give_up()
        why = (f"overlay: the peer name {swim.name} is in use: {why} (this peer is at "
               f"{here}); another process runs under this name: if it was stopped, start "
               f"this one again once the cluster has declared it dead")
        if self.fatal is not None:
            self.fatal(why, *(("stopped",) if running else ()))
        else:
            log.error("{why}", why=why)

    def _verify(self, said: str) -> None:
        """Dial the address a NameInUse (*said*, another member's words) names as
        holding our name: the process there, if it has this name's certificate, tells
        in its Hello which of the two keeps it."""
        m = _HELD_AT.search(said)
        if m is None:
            return
        host, _, port = m.group(1).rpartition(":")
        self.verify({"host": host, "port": int(port) if port.isdigit() else 0})

    def verify(self, wire: dict) -> None:
        """Dial *wire*'s address, said to be another process under our name (once per
        address and ``CONFLICT_EVERY``)."""
        host, port = address(wire)
        if not (isinstance(host, str) and 0 < len(host) <= 255 and host.isprintable()
                and isinstance(port, int) and 0 < port < 65536) or \
                (host, port) == address(self.swim.info):
            return
        if self._once(("verify", host, port)):
            self.membership.dial_address(host, port)

    def conflict(self, name: str, holder: dict, other: dict, verify: bool = True) -> None:
        """Two processes claim *name*, the one at *holder* keeps it (``on_conflict``);
        one claiming this peer's name is checked (``verify``) unless its Hello was."""
        if name == self.swim.name:
            self._once((name, at(holder), at(other)),
                       "overlay: another process claims this peer's name {name} at "
                       "{other}; this peer, at {holder}, keeps it: two peers must not "
                       "share a name, stop the other one",
                       name=name, other=at(other), holder=at(holder))
            if verify:
                self.verify(other)
        else:
            self._once((name, at(holder), at(other)),
                       "overlay: two processes claim the peer name {name}: at {holder} "
                       "(kept) and at {other} (refused): two peers must not share a "
                       "name, stop the other one",
                       name=name, holder=at(holder), other=at(other))

    def _once(self, key, fmt: str = "", **kw) -> bool:
        """Log *fmt* (if any) unless *key* was told less than ``CONFLICT_EVERY`` s ago;
        whether it was not."""
        now = self.membership.reactor.seconds()
        if now - self.told.get(key, -CONFLICT_EVERY) < CONFLICT_EVERY:
            return False
        if len(self.told) >= MAX_TOLD:
            self.told.clear()
        self.told[key] = now
        if fmt:
            log.error(fmt, **kw)
        return True
