"""Mending a catalog restored from an older backup: pull back, skip ahead, re-issue.

An origin numbers its own facts 1, 2, 3, ... and every peer keeps the highest number it
holds of each origin (a version vector, Parker et al. 1983; ``sync``). A peer whose
catalog file was restored from an older backup (or whose data directory was replaced)
has lost the top of its own log: the others hold its facts up to T, it holds them up
to O < T, and the facts it numbers O+1, O+2, ... from now on are ignored by everybody as
already held — instances acknowledged after the restore stay unknown to the others.

What it does, the counter rule of Lamport's clocks ("Time, clocks, and the ordering of
events in a distributed system", CACM 1978) applied to an origin's own counter, as a
Dynamo-style store treats a replica that lost its state (its old counter values are
never used again):

1. **Detect.** Every whole vector this peer hears (a neighbour's pull request, the
   answer to its own pull, a ``Vector`` answer) is checked: ``their[me] > ours`` (ours:
   the highest number this peer has given, ``Catalog.own_counter``).
2. **Skip ahead and re-issue.** The counter jumps past T by ``GAP``, and every fact of
   ours issued since the catalog was opened (numbers above O, reused ones among them:
   their content may differ from what the others hold under the same number) is
   re-issued with fresh numbers from there (``Catalog.reissue``, one transaction), so
   everybody takes them; every later fact is new to everybody. ``GAP`` (2^20) leaves
   room for facts of ours that a peer not heard yet holds above T: a vector heard later
   in (T, T+GAP] means such facts, pulled back in turn; one above T+GAP, a new mend.
3. **Pull back** the facts of our own origin the cluster holds above O (a pull with
   ``own``: ``sync``), from a peer that holds them. A fact pulled back loses to a fact
   re-issued here (higher number: issued after the restore, so newer) and wins over the
   backup's (it is newer). What is pulled back is then re-issued too, so a peer that
   took a reused number before the mend gets the old fact as well. Whether the archive
   still holds each copy pulled back is left to scrub (its next pass re-hashes every
   copy of this peer's archives; a missing one is replaced from a replica).

At start the peer asks each member it learns of for its vector of our origin
(``Vector``), without waiting for the answer: a lone peer, or one whose neighbours do
not answer, starts and stores at once. Blocking the first stores until the others
answered would not make it sound either — the peer holding the top may be down then —
so the mend must (and does) re-issue whatever was numbered before it learned; asking
early only shortens that window (to the first round trip, not the first pull).

Not covered: a peer down through the restart that holds facts of ours above T+GAP that
nobody else holds is told apart only when it comes back (a new mend, then); the gap
known at one run is not kept across a restart.
"""

from __future__ import annotations

from twisted.logger import Logger

from pacsp2p.overlay.swimparts import DEAD

log = Logger()

GAP = 1 << 20          # numbers skipped past the highest of ours the cluster holds
RETRY = 5.0            # seconds before a failed or partial pull-back is tried again


class Reclaim:
    def __init__(self, catalog, sync, members, ask, clock):
        """*sync*: ``AntiEntropy`` (its ``pull`` with ``own``); *members*: name ->
        member (``Membership.members``); *ask(names)*: ask peers their vector of our
        origin (answers come back through ``heard``); *clock*: ``callLater``."""
        self.catalog, self.sync, self.members, self.ask = catalog, sync, members, ask
        self.clock = clock
        self.me = catalog.peer
        self.base = None        # facts of ours above it were issued by this process
        self.known = 0          # the highest of ours the cluster holds, numbered before
        self.below = 0          # the first number of this process's (re-)issued facts
        self.due = None         # facts of ours above it are to be pulled back
        self.first_due = None   # ... and above it, once pulled back, re-issued
        self.holder = None      # a peer holding ours up to ``known``
        self.busy = False       # a re-issue or pull-back runs
        self.later = None       # (holder, top) heard while busy
        self.asked: set[str] = set()
        self.mends = 0          # times the counter skipped ahead
        self.reissued = 0       # facts re-issued
        self.pulled_to = 0      # facts of ours pulled back up to

    def _start(self) -> None:
        if self.base is None:
            self.base = self.known = self.catalog.opened_at
            self.below = self.base + 1

    # -- what others hold -----------------------------------------------------------
    def member_changed(self, member, state) -> None:
        """A member learned of (or back): ask it once how far it holds our log."""
        if member.name not in self.asked and state != DEAD:
            self.asked.add(member.name)      # (a turn later: after the Hello answered)
            self.clock.callLater(0, self.ask, [member.name])

    def vector_heard(self, member, vector: dict) -> None:
        self.heard(member.name, vector.get(self.me, 0))

    def heard(self, holder: str, top: int) -> None:
        """Peer *holder* holds facts of ours up to *top*."""
        self._start()
        if not top or holder == self.me:
            return
        if self.busy:
            if top > (self.later or ("", 0))[1]:
                self.later = (holder, top)
            return
        if top > self.catalog.own_counter():
            self._mend(holder, top)
        elif self.known < top < self.below:   # facts of ours numbered before, not held
            self._owe()
            self.known, self.holder = top, holder
            self._pull_back()
        elif self.due is not None and top >= self.known and not self._alive(self.holder):
            self.holder = holder
            self._pull_back()

    def _alive(self, name) -> bool:
        m = self.members.get(name) if name else None
        return m is not None and m.state != DEAD

    # -- skip ahead, re-issue -------------------------------------------------------
    def _mend(self, holder: str, top: int) -> None:
        self.busy = True
        ours, start = self.catalog.own_counter(), top + GAP + 1
        d = self.catalog.reissue(self.below - 1, None, start)

        def done(result):
            n, last = result
            self.mends += 1
            self.reissued += n
            self._owe()
            start = last - n + 1          # (renumber starts above every fact it finds)
            self.known, self.holder, self.below = top, holder, start
            say = log.warn if self.mends == 1 else log.info
            say("catalog: peer {peer} holds facts of this peer up to {top}, this catalog "
                "only up to {ours}: it was restored from an older backup (or the data "
                "directory replaced); mended: the {n} facts numbered since it was opened "
                "are re-issued, and every new one numbered, from {start} on; the facts of "
                "this peer above {due} are pulled back", peer=holder, top=top, ours=ours,
                n=n, start=start, due=self.due)
            self._idle()

        def failed(f):
            log.error("catalog: re-issuing this peer's facts failed: {err}",
                      err=f.getErrorMessage())
            self.later = self.later or (holder, top)      # tried again at the next news
            self.busy = False
        d.addCallbacks(done, failed)

    def _owe(self) -> None:
        """Facts of ours above ``known`` are to be pulled back (and re-issued)."""
        self.due = self.known if self.due is None else min(self.due, self.known)
        self.first_due = self.due if self.first_due is None else min(self.first_due,
                                                                     self.due)

    def _idle(self) -> None:
        self.busy = False
        later, self.later = self.later, None
        if later is not None:
            self.heard(*later)
        if not self.busy:
            self._pull_back()

    # -- pull back ------------------------------------------------------------------
    def _pull_back(self) -> None:
        if self.busy or self.due is None:
            return
        if not self._alive(self.holder):
            # another holder tells us its vector soon (pulls both ways); ask them all
            self.ask([n for n in self.members if self._alive(n)])
            return
        self.busy = True
        name, due, upto = self.holder, self.due, self.known
        d = self.sync.pull(self.members[name], own=(due, upto))

        def done(their):
            reached = self.sync.own_reached
            self.pulled_to = max(self.pulled_to, min(reached, upto))
            if reached >= upto or (their or {}).get(self.me, 0) <= due:
                return self._reissue_pulled(name, upto)
            self.due = max(self.due, reached) if self.due is not None else None
            self._retry()

        def failed(f):
            log.info("catalog: pulling back this peer's facts from {peer} failed: {err}",
                     peer=name, err=f.getErrorMessage())
            self._retry()
        d.addCallbacks(done, failed)

    def _reissue_pulled(self, name: str, upto: int) -> None:
        """Pulled back up to *upto*: re-issue it (a peer that took one of the reused
        numbers lacks the old fact numbered so), then done — unless more came meanwhile."""
        if upto < self.known:           # a holder of more was heard meanwhile
            self.due = upto
            return self._retry(0)
        first, self.first_due, self.due = self.first_due or 0, None, None
        d = self.catalog.reissue(first, self.below - 1, self.catalog.own_counter() + 1)

        def done(result):
            self.reissued += result[0]
            log.info("catalog: facts of this peer up to {top} pulled back from {peer} "
                     "({n} re-issued)", top=upto, peer=name, n=result[0])
            self._idle()

        def failed(f):
            log.error("catalog: re-issuing the facts pulled back failed: {err}",
                      err=f.getErrorMessage())
            self._idle()
        d.addCallbacks(done, failed)

    def _retry(self, delay: float = RETRY) -> None:
        self.busy = False
        self.clock.callLater(delay, self._idle)

    def status(self) -> dict:
        return {"mends": self.mends, "reissued": self.reissued,
                "pulled_back_to": self.pulled_to, "pending": self.due is not None}
