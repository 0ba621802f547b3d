"""Unrepaired copies tried again: a copy the scrub found damaged or missing and could not
replace is checked and mended again, with backoff, until a good replica serves it.

A scrub finds a bad copy when no good replica can be read: the other replica's peer is
down, or this peer has not yet pulled the facts that name the good replica (a scrub just
after a start). The copy is *unrepaired* (logged, listed, ``pacsp2p scrub`` exits 1),
and before this nothing tried again until the next full pass, a week later by default:
one copy short for a week although the good replica was back a minute later.

Each such copy — (instance, archive) and the hash it should have — is kept here (at
most ``MOST``; beyond that the next pass finds the rest) and tried again after
``FIRST`` s, the wait doubling up to ``LAST`` s (truncated binary exponential backoff,
as TCP's retransmission timer). A try reads the catalog's row again (a copy deleted,
forgotten or stored again with another hash since is dropped), checks the copy again (it
may have been put back by hand) and, if it is still bad, mends it (``Scrub.mend``: from a
good replica, or made again elsewhere for an archive that cannot restore). Kept with the
scrub's saved state (``saved``/``restore``: at its saves and when the peer stops), so a
restart tries them again after ``FIRST`` s, not after the next full pass.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.catalog import scrub as sql
from pacsp2p.types import Location
from pacsp2p.validate import is_uid

log = Logger()

FIRST = 5.0             # seconds before the first try again
LAST = 3600.0           # the longest wait between two tries
MOST = 10_000           # copies kept to try again


class Unrepaired:
    def __init__(self, scrubber):
        self.scrub = scrubber
        self._due: dict[tuple, list] = {}        # (uid, archive) -> [sha, due, wait]
        self._busy = False
        self.repaired = 0

    def __len__(self) -> int:
        return len(self._due)

    def add(self, c: sql.Copy, sha: str) -> None:
        """The pass (or a check) could not replace *c*: try again later."""
        key = (c.uid, c.archive)
        if key in self._due:
            return                      # (its own try failed: it reschedules itself)
        if len(self._due) >= MOST:
            return
        self._due[key] = [sha, time.monotonic() + FIRST, FIRST]

    def saved(self) -> list:
        """What the scrub's saved state keeps of them: [[uid, archive, sha]]."""
        return [[uid, name, sha] for (uid, name), (sha, _, _) in self._due.items()]

    def restore(self, saved) -> None:
        """Those of a saved state (``saved``), each tried again after ``FIRST`` s."""
        for entry in saved[:MOST] if isinstance(saved, list) else ():
            if isinstance(entry, list) and len(entry) == 3 and is_uid(entry[0]) and all(
                    isinstance(v, str) and len(v) <= 256 for v in entry[1:]):
                self._due.setdefault((entry[0], entry[1]),
                                     [entry[2], time.monotonic() + FIRST, FIRST])

    def discard(self, c: sql.Copy) -> None:
        """*c* was replaced (by a pass, or a retrieval's report): not to try again."""
        self._due.pop((c.uid, c.archive), None)

    def tick(self) -> None:
        """Try the copies whose wait is over (one round at a time)."""
        now = time.monotonic()
        if self._busy or not any(due <= now for _, due, _ in self._due.values()):
            return
        self._busy = True
        d = self._round(now)
        d.addErrback(lambda f: log.failure("scrub: trying unrepaired copies again failed", f))
        d.addBoth(lambda _: setattr(self, "_busy", False))

    @defer.inlineCallbacks
    def _round(self, now: float):
        s = self.scrub
        for key in [k for k, (_, due, _) in self._due.items() if due <= now]:
            if not s.running:
                return
            entry = self._due.get(key)
            if entry is None:
                continue
            sha = entry[0]
            uid, name = key
            archive = s.archives.get(name)
            c = yield s.catalog.read(sql.own_copy(s.peer, Location(uid, name, s.peer, sha, 0)))
            if archive is None or c is None or (sha and c.sha256 != sha):
                del self._due[key]              # gone from the config or the catalog
                continue
            if not getattr(archive, "up", True):
                state = "unknown"
            else:
                state, _ = yield s.check_copy(archive, c)
            if state == "ok":
                del self._due[key]
                log.info("scrub: {uid} on archive {archive} is good again", uid=uid,
                         archive=name)
                continue
            source = None
            if state in ("damaged", "missing"):
                source = yield s.mend(c, sha)
            if source:
                del self._due[key]
                self.repaired += 1
                s.totals["repaired"] += 1
                continue
            entry[2] = min(LAST, entry[2] * 2)
            entry[1] = time.monotonic() + entry[2]
            log.info("scrub: {uid} on archive {archive} is tried again in {wait:.0f} s",
                     uid=uid, archive=name, wait=entry[2])
