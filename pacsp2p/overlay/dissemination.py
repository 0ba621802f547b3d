"""Catalog dissemination: epidemic push-pull over the membership protocol's traffic.

Demers, Greene, Hauser, Irish, Larson, Shenker, Sturgis, Swinehart & Terry, "Epidemic
algorithms for replicated database maintenance", PODC 1987: *rumor mongering* to spread
what is new fast, *anti-entropy* to repair what rumors missed. The catalog is a set of
per-origin logs; a peer's progress in them is its version vector {origin: highest
sequence held} (Parker et al., 1983).

- **Rumors (push of news, pull of facts).** When a peer's vector grows (it wrote facts
  of its own, or pulled others'), it queues one small item per origin that grew,
  ``["c", origin, seq]`` ("I hold *origin*'s log up to *seq*"), which rides on the SWIM
  messages it sends anyway (pings, acks, and the gossip messages sent every
  ``gossip_interval`` to ``gossip_nodes`` members while something is queued) and is
  retransmitted ``retransmit_mult * ceil(log10(N + 1))`` times (``swim.Broadcasts``). A
  peer that hears of facts it lacks pulls them from the peer it heard it from — every
  origin it lags on, from that one neighbour, in ONE batched request (and further
  batches while more is due; of the neighbours ahead on most origins, one at random
  that holds at least half of what the most advanced holds: a stream's writer is
  not everyone's source), at most one pull at a time and one per ``pull_interval``.
  While a stream of facts lasts the interval doubles with each pull, up to
  ``MAX_SLOWDOWN`` times, so a busy writer's neighbours pull a few large batches rather
  than two small ones a second (a pull costs a request, a TLS round trip and a catalog
  transaction whatever it carries). A pull that brings ``STREAM_FACTS`` or more doubles
  it; one that brings fewer but had to wait for the interval (news of more facts came
  before the interval since the previous pull was over) keeps it — at 32 peers the
  writer's stream comes with a trickle of its replica holders' own facts, whose small
  pulls must not end the slowdown —; any other sets it back to ``pull_interval`` (a fact
  now and then is pulled at once).
- **The end of a stream.** A peer whose vector grew by ``STREAK_FACTS`` or more facts
  that it did not pull (it wrote them, or learned its replica holders' first-hand) and
  then did not grow for ``QUIET`` seconds (or twice the longest pause within the
  streak, up to ``MAX_QUIET``: a writer on a loaded host pauses now and then mid-stream;
  a pause shorter than ``MAX_QUIET`` does not end a streak) says so: an urgent item
  ``["q", name, n]``, gossiped like a membership change and passed on once by every
  peer that hears it
  (*n*, the sender's vector sum then, tells a new end from an old one); not, if the
  streak is of its own facts only, when an end heard lately was told with a sum at least
  its own (a replica holder's copies are the writer's stream, whose end covers them).
  A peer that
  hears it pulls at once (at most one ``pull_interval`` after its last pull), from the
  peer that told it while its own sum is below *n* (else from the most advanced
  holder), and resets its slowdown only if that left it below *n* (an end
  told too soon costs one pull, not a new ramp): the last facts of a stream are not
  left waiting up to ``MAX_SLOWDOWN`` intervals, at 3 peers as at 500. Streams and
  streaks are judged by facts *counted* as committed (``count``), never by
  differences of sums: fact numbers start at a start's time in ms (``reclaim``).
  The writer never sends to everyone: each peer talks to O(1) others per period and a
  fact reaches all N peers in O(log N) periods.
- **Anti-entropy.** Pings and acks carry a digest of the sender's vector and its sum. A
  peer whose digest differs from a neighbour's pulls from it (at most once per
  ``ae_interval``) when the neighbour's sum is larger (or equal, and the neighbour's
  name larger); a pull request carries the requester's whole vector, so the answering
  peer learns, in turn, what it lacks and pulls it (the "push" half, as a pull). A peer
  that was down or cut off, or joins late, thus converges; memory stays bounded by one
  batch (``sync.py``).

Transport-agnostic like ``swim``: it sees the catalog only as ``vector()`` and the
network only as ``pull(name) -> Deferred[that peer's vector]`` (``sync.AntiEntropy`` in
a peer; the simulated network in ``bench/overlay_sim.py``).
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable

from pacsp2p.overlay.swimparts import DEAD, Invalid, MAX_INT, _int, _name

HOLDERS = 4            # peers remembered per origin as holding more than we do
AE_CANDIDATES = 8      # neighbours remembered whose digest differed from ours
MAX_SLOWDOWN = 8       # the pull interval grows up to this many times during a stream
STREAM_FACTS = 8       # a pull that brings this many facts or more: a stream
STREAK_FACTS = 64      # facts of our own (not pulled) before a pause is an end of stream
QUIET = 0.3            # seconds without growth that end a stream (["q", ...])
MAX_QUIET = 2.0        # ... or twice the streak's longest pause, up to this
MAX_ENDS = 1024        # peers whose last end of stream is remembered
ENDED = 4.0            # seconds after an end of stream heard: pull from the most advanced
MAX_ORIGINS = 100000   # entries of a vector accepted from the network


def digest(vector: dict) -> str:
    h = hashlib.blake2b(digest_size=8)
    for origin in sorted(vector):
        if vector[origin]:
            h.update(f"{origin}\x00{vector[origin]}\x00".encode())
    return h.hexdigest()


def check_vector(vector) -> dict:
    """A version vector from the network ({name: int}), or Invalid."""
    if not isinstance(vector, dict) or len(vector) > MAX_ORIGINS:
        raise Invalid("bad vector")
    for origin, seq in vector.items():
        _name(origin)
        _int(seq)
    return vector


class Dissemination:
    def __init__(self, swim, vector: Callable[[], dict], pull, clock,
                 pull_interval: float = 0.5, ae_interval: float = 2.0,
                 count: Callable[[], int] | None = None):
        self.swim, self.name = swim, swim.name
        self.vector = vector            # () -> {origin: seq} held now (not copied)
        # () -> facts committed so far: streams are judged by facts received, never by
        # differences of sums (numbers start at a start's time in ms, ~1.8e12: an
        # origin's first fact would add 1.8e12 to a sum)
        self.count = count or (lambda: sum(self.vector().values()))
        self.pull = pull                # (name) -> Deferred[its vector]
        self.clock = clock
        self.pull_interval, self.ae_interval = pull_interval, ae_interval
        self.on_vector: list = []       # callbacks(name, vector): a peer's whole vector
        self.ahead: dict[str, dict[str, int]] = {}   # origin -> {holder: seq > ours}
        self.ae: dict[str, int] = {}    # neighbour -> its sum, its digest differing
        self.told = dict(vector())      # what we announced (not the facts we had at start)
        self.pulling: str | None = None
        self._pull_d = None             # the Deferred of the running pull
        self.pulls = 0
        self.served = 0                 # pulls of others answered (``asked``)
        self.failed = 0
        self.ends_told = 0              # our ends of stream told (["q", ...])
        self.end_told_at = None         # wall-clock time of the last one (status)
        self._call = None
        self._last_pull = -1e9
        self._last_ae = -1e9
        self.slowdown = 1               # x pull_interval: grows while a stream lasts
        self._held = 0                  # count() when the running pull began
        self._waited = False            # the running pull waited for the interval
        self._digest: tuple[str, int] | None = None
        self._total = sum(self.told.values())   # our vector's sum at the last change
        self._count = self.count()      # count() at the last change
        self._streak = 0                # facts not pulled since our last end of stream
        self._learned = 0               # ... of them of other origins (learned first-hand)
        self._grew_at = 0.0
        self._pause = 0.0               # the longest pause between growths in the streak
        self._quiet_call = None
        self.ends: dict[str, int] = {}  # peer -> n of the last end of stream heard
        self._ended_at = -1e9           # when we heard one last
        self._end_total = 0             # the largest n of the ends heard lately
        self._end_peer = None           # the peer that told it
        self._begun = self._begun_before = -1e9   # starts of this pull and the previous
        swim.rumors["c"] = self._rumor
        swim.rumors["q"] = self._end
        swim.fields_out.append(self._fields_out)
        swim.fields_in.append(self._fields_in)

    # -- our progress --------------------------------------------------------------------
    def changed(self) -> None:
        """Our vector grew (after a commit): announce the origins that did."""
        self._digest = None
        mine = self.vector()
        count = self.count()
        if self.pulling is None and count > self._count:    # facts we did not pull
            now = self.clock.seconds()
            gap = now - self._grew_at       # a pause (after an end told too soon, too)
            self._pause = max(self._pause, gap) if gap < MAX_QUIET else 0.0
            self._streak += count - self._count
            own = mine.get(self.name, 0) - self.told.get(self.name, 0)
            self._learned += max(0, count - self._count - max(0, own))
            self._grew_at = now
            if self._quiet_call is None:
                self._quiet_call = self.clock.callLater(QUIET, self._quiet)
        self._total, self._count = sum(mine.values()), count
        for origin, seq in mine.items():
            if seq > self.told.get(origin, 0):
                self.told[origin] = seq
                self.swim.broadcast(("c", origin), ["c", origin, seq])
                holders = self.ahead.get(origin)
                if holders:
                    for h in [h for h, s in holders.items() if s <= seq]:
                        del holders[h]
                    if not holders:
                        del self.ahead[origin]

    def _quiet(self) -> None:
        """No growth for a while: after a streak of our own facts, tell that the stream
        ended (a pause shorter than ``MAX_QUIET`` before the streak is long enough, or
        shorter than twice its longest one, does not end it)."""
        self._quiet_call = None
        still = self.clock.seconds() - self._grew_at
        quiet = min(MAX_QUIET, max(QUIET, 2 * self._pause))
        if self._streak < STREAK_FACTS:
            quiet = MAX_QUIET
        if still < quiet - 1e-3:
            self._quiet_call = self.clock.callLater(quiet - still, self._quiet)
            return
        if self._streak >= STREAK_FACTS and self.swim.running and \
                (self._learned or not self._covered()):
            self.ends_told += 1
            self.end_told_at = time.time()      # shown: not the (monotonic) clock's
            self.swim.broadcast(("q", self.name), ["q", self.name, self._total])
        self._streak = self._learned = 0

    def _covered(self) -> bool:
        """An end of stream heard lately was told with a sum at least ours: when our
        streak is of our own facts only (a replica holder's copies), its teller (the
        stream's writer, which learned them first-hand) is where the others pull the last
        facts from, ours among them; our own end would only send every peer below our
        sum to us for a second pull (at 32 peers a holder takes ~64 copies of a
        1,000-instance stream: 13 ends told in one run). A streak with facts of others
        learned first-hand (a writer's) is told whatever was heard."""
        return self.clock.seconds() - self._ended_at < ENDED and \
            self._end_total >= self._total

    def _end(self, sender, entry) -> None:
        """["q", peer, n]: *peer*'s stream of facts ended: pull its last facts now."""
        if len(entry) != 3:
            raise Invalid("bad end of stream")
        peer, n = _name(entry[1]), _int(entry[2])
        if peer == self.name or n <= self.ends.get(peer, -1):
            return
        if peer not in self.ends and len(self.ends) >= MAX_ENDS:
            self.ends.clear()
        self.ends[peer] = n
        self.swim.broadcast(("q", peer), ["q", peer, n])       # pass it on, once
        now = self.clock.seconds()
        recent = self._end_total if now - self._ended_at < ENDED else 0
        if n >= recent:
            self._end_peer = peer
        self._end_total = max(n, recent)
        self._ended_at = now
        if self.pulling is None and self._call is not None and self._call.active():
            due = max(0.0, self._last_pull + self.pull_interval - self._ended_at)
            if self._call.getTime() > self._ended_at + due + 1e-3:
                self._call.reset(due)

    def summary(self) -> tuple[str, int]:
        if self._digest is None:
            v = self.vector()
            self._digest = (digest(v), sum(v.values()))
        return self._digest

    # -- what others tell ----------------------------------------------------------------
    def _fields_out(self, dest) -> dict:
        return {"cv": list(self.summary())}

    def _fields_in(self, sender, msg) -> None:
        cv = msg.get("cv")
        if cv is None:
            return
        if not isinstance(cv, list) or len(cv) != 2 or not isinstance(cv[0], str) \
                or len(cv[0]) > 64:
            raise Invalid("bad catalog summary")
        total = _int(cv[1])
        mine, my_total = self.summary()
        if cv[0] == mine:
            self.ae.pop(sender, None)
            return
        if total > my_total or (total == my_total and sender > self.name):
            if sender not in self.ae and len(self.ae) >= AE_CANDIDATES:
                self.ae.pop(next(iter(self.ae)))
            self.ae[sender] = total
            self._kick()

    def _rumor(self, sender, entry) -> None:
        if len(entry) != 3:
            raise Invalid("bad catalog item")
        origin, seq = _name(entry[1]), _int(entry[2])
        self._note(sender, origin, seq)

    def _note(self, holder: str, origin: str, seq: int) -> bool:
        if origin == self.name or holder == self.name or seq <= self.vector().get(origin, 0):
            return False
        holders = self.ahead.setdefault(origin, {})
        if holder not in holders and len(holders) >= HOLDERS:
            low = min(holders, key=holders.get)
            if holders[low] >= seq:
                return False
            del holders[low]
        holders[holder] = max(seq, holders.get(holder, 0))
        self._kick()
        return True

    def heard(self, name: str, vector: dict) -> None:
        """Peer *name*'s whole vector (it pulled from us, or answered our pull)."""
        for origin, seq in vector.items():
            self._note(name, origin, seq)
        for fn in list(self.on_vector):
            fn(name, vector)

    def asked(self, name: str, vector: dict) -> None:
        """Peer *name* pulls from us with its whole *vector* (counted: ``served``)."""
        self.served += 1
        self.heard(name, vector)

    def want(self, holder: str, origin: str, seq: int) -> None:
        """*holder* has *origin*'s facts up to *seq* (we were told another way, e.g. it
        recorded a copy we asked for): pull now, not after ``pull_interval``."""
        if self._note(holder, origin, seq) and self.pulling is None:
            if self._call is not None and self._call.active():
                self._call.cancel()
            self._call = self.clock.callLater(0, self._next)

    # -- pulling -------------------------------------------------------------------------
    def _kick(self) -> None:
        if self.pulling is not None or (self._call is not None and self._call.active()):
            return
        now = self.clock.seconds()
        # an end of stream heard since our last pull: its last facts without the slowdown
        ended = self._last_pull < self._ended_at and now - self._ended_at < ENDED
        delay = max(0.0, self._last_pull + self.pull_interval * (
            1 if ended else self.slowdown) - now)
        self._call = self.clock.callLater(delay, self._next)

    def _target(self) -> str | None:
        mine = self.vector()
        ender = self._end_peer
        if ender is not None and self.clock.seconds() - self._ended_at < ENDED and \
                sum(mine.values()) < self._end_total and self.swim.alive(ender):
            # below the sum a stream's end was told with: its teller holds facts we lack
            # (else our sum would be at least its) and, unlike a neighbour that seems
            # the most advanced by the rumours heard, all those of its stream: one pull
            return ender
        score: dict[str, list] = {}     # holder -> [origins it is ahead on, facts]
        for origin in list(self.ahead):
            have = mine.get(origin, 0)
            holders = self.ahead[origin]
            for h in [h for h, s in holders.items() if s <= have or not self.swim.alive(h)]:
                del holders[h]
            if not holders:
                del self.ahead[origin]
                continue
            for h, seq in holders.items():
                sc = score.setdefault(h, [0, 0])
                sc[0] += 1
                sc[1] += seq - have
        if score:
            # a holder ahead on most origins, with at least half the facts of the one
            # with most (a pull from a neighbour far behind needs another one after
            # it), at random: the stream's writer, ahead of everyone, is not everyone's
            # source — a neighbour that pulled from it lately serves as well (epidemic);
            # after the end of a stream, the one with most (no second pull for the rest)
            most = max(s[0] for s in score.values())
            facts = max(s[1] for s in score.values() if s[0] == most)
            if self.clock.seconds() - self._ended_at < ENDED:
                facts *= 2              # a stream just ended: the most advanced only
            return self.swim.rng.choice(sorted(
                h for h, s in score.items() if s[0] == most and 2 * s[1] >= facts))
        now = self.clock.seconds()
        wait = self._last_ae + self.ae_interval - now
        if self.ae and wait <= 1e-6:
            cands = [n for n in self.ae if self.swim.alive(n)]
            self.ae.clear()
            if cands:
                self._last_ae = now
                return self.swim.rng.choice(sorted(cands))
        elif self.ae:
            self._call = self.clock.callLater(max(wait, 0.01), self._next)
        return None

    def _next(self) -> None:
        self._call = None
        if not self.swim.running or self.pulling is not None:
            return
        target = self._target()
        if target is None:
            return
        node = self.swim.nodes.get(target)
        if node is not None and node.state == DEAD:
            return
        now = self.clock.seconds()
        self.pulling = target
        self.pulls += 1
        self._held = self.count()
        self._begun_before, self._begun = self._begun, now
        # it starts when the interval allows it, not later: it waited for it (1 ms slack)
        self._waited = now <= self._last_pull + self.pull_interval * self.slowdown + 0.001
        self._last_pull = now
        d = self._pull_d = self.pull(target)
        d.addCallbacks(self._pulled, self._failed, callbackArgs=(target,),
                       errbackArgs=(target,))

    def lost(self, name: str) -> None:
        """*name* was declared dead: a pull from it under way is cut now (a frozen peer
        would hold it, and every fact of every other peer behind it, for the answer's
        timeout: ``fetching.ANSWER_TIMEOUT``, 60 s), and the next goes to another."""
        if self.pulling == name and self._pull_d is not None:
            self._pull_d.cancel()

    def _pulled(self, vector, target) -> None:
        self.pulling = self._pull_d = None
        self._last_pull = self.clock.seconds()
        # many facts at once: a stream, pull less often, more each time; fewer, but news
        # of more came before we could pull again: the stream goes on (set before
        # heard(), whose news schedules the next pull with it)
        gained = self.count() - self._held
        if self._ended_at > self._begun_before:
            # an end heard since the previous pull began: this pull caught up with it;
            # behind the end's sum still, pull again soon; else keep the slowdown (an
            # end told too soon, by a writer that paused, costs one pull, not a ramp)
            if sum(self.vector().values()) < self._end_total:
                self.slowdown = 1
        elif gained >= STREAM_FACTS:
            self.slowdown = min(self.slowdown * 2, MAX_SLOWDOWN)
        elif not (gained > 0 and self._waited):
            self.slowdown = 1
        try:
            if vector is not None:
                self.heard(target, vector)      # its callbacks may raise: pull on anyway
        finally:
            self._kick()

    def _failed(self, failure, target) -> None:
        self.pulling = self._pull_d = None
        self.failed += 1
        self._last_pull = self.clock.seconds()
        for holders in self.ahead.values():
            holders.pop(target, None)
        self.ae.pop(target, None)
        self._kick()


__all__ = ["Dissemination", "digest", "check_vector", "MAX_INT"]
