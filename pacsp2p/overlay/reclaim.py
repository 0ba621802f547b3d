"""Mending a catalog restored from an older backup: pull back, skip ahead, re-issue.

An origin numbers its own facts 1, 2, 3, ... and every peer keeps the highest number it
holds of each origin (a version vector, Parker et al. 1983; ``sync``). A peer whose
catalog file was restored from an older backup (or whose data directory was replaced)
has lost the top of its own log: the others hold its facts up to T, it holds them up
to O < T, and the facts it numbers O+1, O+2, ... from now on are ignored by everybody as
already held — instances acknowledged after the restore stay unknown to the others.

What it does — the counter rule of Lamport's clocks ("Time, clocks, and the ordering
of events in a distributed system", CACM 1978) applied to an origin's own counter, with
a new epoch of numbers at each start, as a replica that may have lost state must never
reuse a counter value (the "vnode id" rule of Dynamo-style stores):

1. **A new epoch at each start.** The facts a peer issues after a start are numbered
   from the clock's epoch — the start's Unix time in milliseconds — or above the
   highest its catalog held when opened if that is more (``Catalog.numbers_from``).
   The run that numbered the lost facts started earlier and, unless it issued over
   1,000 facts a second on average over its life, stayed below this start's epoch: a
   peer restarted from a backup never reuses a number the others hold, whether or not
   it has heard of them — a peer alone, or whose neighbours do not answer, starts and
   stores at once, soundly, which waiting for the neighbours' vectors at start would
   not make it (the peer holding the most may be down then). Without it, a restored
   peer that stored more than it had lost before it heard of the others would collide
   with them undetectably (their vector[me] would not exceed its own); a skip by a
   fixed amount past the catalog's top would collide with the lost run's own skip.
   (Numbers of ~1.8e12: the sum of a vector, which the membership messages carry as a
   JSON-exact integer below 2^53, stays exact up to ~5,000 peers; a clock set back
   leaves step 3.)
2. **Pull back.** Each member, the first time this peer learns of it (at start: its
   first neighbours; later: one that comes back), is asked once for the facts of our
   own origin it holds in the gap (a pull with ``own``, ``sync``: those only; the
   others come by the usual pulls) — not only when its vector shows more than ours: once
   the new epoch's facts reach it, its vector's maximum hides what it holds in the gap.
   A vector heard with ours in the gap (a neighbour's pull request, the answer to a
   pull) asks its sender again. A fact pulled back loses to one issued since the start
   (a higher number: after the restore, so newer) and wins over the backup's (newer).
   Whether the archive still holds each copy pulled back is left to scrub (its next
   pass re-hashes every copy of this peer's archives; a missing one is replaced from a
   replica). A catalog that ``catalog rebuild`` made (``Catalog.rebuilt``) numbers its
   facts above the lost ones: its first start pulls back from 0, and the lost facts'
   rows (their last-writer-wins stamps) and tombstones come back with them.
3. **Skip ahead and re-issue**, if a vector shows facts of ours above our counter (the
   lost run outran the clock, or the clock was set back): the counter jumps ``GAP``
   (2^24) past them and every
   fact of ours issued since the start (numbers the others hold, for other content) is
   re-issued with fresh numbers from there (``Catalog.reissue``, one transaction), so
   everybody takes them; the gap is pulled back from that peer, and what is pulled back
   is then re-issued too (a peer that took one of the reused numbers lacks the old fact
   numbered so).

The peer says so once (one warning line, when it first finds facts of its own it had
lost). Not covered: a peer down through all this that alone holds facts of ours in a
gap this peer no longer knows of (the gap is not kept across a second restart).
"""

from __future__ import annotations

import time

from twisted.logger import Logger

from pacsp2p.overlay.swimparts import DEAD

log = Logger()

GAP = 1 << 24          # numbers skipped past the cluster's top (a mend)
RETRY = 5.0            # seconds before a failed pull-back is tried again
TRIES = 3              # ... at most so many times in a row (a vector heard asks again)


class Reclaim:
    def __init__(self, catalog, sync, members, clock):
        """*sync*: ``AntiEntropy`` (its ``pull`` with ``own``); *members*: name ->
        member (``Membership.members``); *clock*: ``callLater``."""
        self.catalog, self.sync, self.members, self.clock = catalog, sync, members, clock
        self.me = catalog.peer
        self.epoch = int(time.time() * 1000)     # the numbers of this start: from it
        catalog.numbers_from = self.numbers_from
        self.base = None        # the catalog held ours up to it when opened
        self.below = 0          # the first number of ours issued (or re-issued) since
        self.pulled_to = 0      # the highest fact of ours in the gap pulled back
        self.reused = False     # facts of ours were numbered as the cluster's (a mend)
        self.probes: list[str] = []      # members to pull the gap from, in turn
        self.asked: set[str] = set()     # ... each once (unless its vector says more)
        self.tried: dict[str, int] = {}  # member -> its top in the gap, asked for
        self.failed: dict[str, int] = {}  # member -> pull-backs failed in a row
        self.busy = False       # a pull-back or re-issue runs
        self.later = None       # (holder, top) above our counter, heard while busy
        self.said = 0           # times this peer said it mended its catalog
        self.mends = 0          # times the counter skipped ahead
        self.reissued = 0       # facts re-issued

    def numbers_from(self, opened_at: int) -> int:
        """Our facts of this run are numbered above it (``Catalog.start``)."""
        return max(opened_at, self.epoch)

    def _start(self) -> None:
        if self.base is None:
            self.base = self.pulled_to = self.catalog.opened_at
            if getattr(self.catalog, "rebuilt", False):
                self.pulled_to = 0      # a rebuilt catalog: every fact of ours others hold
            self.below = self.numbers_from(self.base) + 1

    # -- what others hold -----------------------------------------------------------
    def member_changed(self, member, state) -> None:
        """A member learned of (or back): pull the gap from it, once."""
        if member.name not in self.asked and state != DEAD:
            self.asked.add(member.name)       # (a turn later: after the Hello answered)
            self.clock.callLater(0, self._probe, member.name)

    def vector_heard(self, member, vector: dict) -> None:
        self.heard(member.name, vector.get(self.me, 0))

    def heard(self, holder: str, top: int) -> None:
        """Peer *holder* holds facts of ours up to *top*."""
        self._start()
        if not top or holder == self.me:
            return
        if top > self.catalog.own_counter():
            if self.busy:
                self.later = max(self.later or (holder, top), (holder, top),
                                 key=lambda x: x[1])
            else:
                self._mend(holder, top)
        elif self.pulled_to < top < self.below and self.tried.get(holder) != top:
            self.tried[holder] = top            # ours in the gap, not pulled back yet
            self._probe(holder)

    def _probe(self, name: str, first: bool = False) -> None:
        self._start()
        if name in self.probes:
            self.probes.remove(name)
        self.probes.insert(0, name) if first else self.probes.append(name)
        self._next()

    def _alive(self, name) -> bool:
        m = self.members.get(name)
        return m is not None and m.state != DEAD

    def _next(self) -> None:
        if self.busy:
            return
        if self.later is not None:
            later, self.later = self.later, None
            return self.heard(*later)
        while self.probes and not self._alive(self.probes[0]):
            self.probes.pop(0)
        if self.probes:
            self._pull_back(self.probes.pop(0))

    # -- pull back ------------------------------------------------------------------
    def _pull_back(self, name: str) -> None:
        after, upto = self.pulled_to, self.below - 1
        if after >= upto:                   # no gap (a mend may open one)
            return self._next()
        self.busy = True
        d = self.sync.pull(self.members[name], own=(after, upto))

        def done(_their):
            self.failed.pop(name, None)
            got = self.sync.own_got
            if got <= after:
                return self._idle()
            self.pulled_to = got
            if not self.said:
                self._say(name, got, f"the facts of this peer above {after} are pulled "
                                     f"back, those numbered since it started (from "
                                     f"{self.below} on) are new to everybody")
            if not self.reused:
                log.info("catalog: facts of this peer up to {top} pulled back from {peer}",
                         top=got, peer=name)
                return self._idle()
            # numbers the others may hold for other content: re-issued to everybody
            return self._reissue(after, got, lambda n: log.info(
                "catalog: facts of this peer up to {top} pulled back from {peer}, {n} "
                "re-issued", top=got, peer=name, n=n))

        def failed(f):
            self.busy = False
            self.failed[name] = tries = self.failed.get(name, 0) + 1
            log.info("catalog: pulling back this peer's facts from {peer} failed "
                     "({n} of {most}): {err}", peer=name, n=tries, most=TRIES,
                     err=f.getErrorMessage())
            if tries < TRIES:
                self.clock.callLater(RETRY, self._probe, name)
            else:
                self._next()
        d.addCallbacks(done, failed)

    # -- skip ahead, re-issue -------------------------------------------------------
    def _mend(self, holder: str, top: int) -> None:
        start = top + GAP + 1
        self.busy = True

        def done(n, last):
            self.mends += 1
            self.reused = self.reused or n > 0
            start = last - n + 1          # (renumber starts above every fact it finds)
            self._say(holder, top, f"the {n} facts numbered since it started are "
                                   f"re-issued, and every new one numbered, from {start} on; "
                                   f"the facts of this peer above {self.pulled_to} are "
                                   f"pulled back")
            self.below = start
            self._probe(holder, first=True)
        self._reissue(self.below - 1, None, done, start)

    def _reissue(self, after: int, upto: int | None, then, start: int = 0) -> None:
        """Our facts numbered in (*after*, *upto*] re-issued (``Catalog.reissue``);
        then *then(n, last)* (or *then(n)*), and on to what is next."""
        d = self.catalog.reissue(after, upto, max(start, self.catalog.own_counter() + 1))

        def done(result):
            n, last = result
            self.reissued += n
            self.busy = False
            then(n, last) if start else then(n)
            self._next()

        def failed(f):
            log.error("catalog: re-issuing this peer's facts failed: {err}",
                      err=f.getErrorMessage())
            self.busy = False
        d.addCallbacks(done, failed)

    def _say(self, holder: str, top: int, how: str) -> None:
        """One warning line the first time this catalog is mended (info after)."""
        self.said += 1
        (log.warn if self.said == 1 else log.info)(
            "catalog: peer {peer} holds facts of this peer up to {top}, this catalog held "
            "them only up to {ours} when it started: it was restored from an older backup "
            "(or the data directory replaced); mended: {how}", peer=holder, top=top,
            ours=self.base, how=how)

    def _idle(self) -> None:
        self.busy = False
        self._next()

    def status(self) -> dict:
        return {"mends": self.mends, "reissued": self.reissued,
                "pulled_back_to": self.pulled_to, "probes": len(self.probes)}
