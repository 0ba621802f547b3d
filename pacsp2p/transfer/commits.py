"""The writer's group commit of the remote copies it need not wait for.

When the writer keeps a copy of its own it records that copy, with a hint for each
remote copy, before it answers the C-STORE; the remote copies' commits (phase 2) may
come later (``ingest``). Those are gathered per holder and sent as one ``Commits`` box
every ``DELAY`` seconds (sooner once ``MAX_COMMITS`` wait or the box would near AMP's
64 KiB per value), which the holder records in one catalog transaction: group commit
(DeWitt et al., "Implementation techniques for main memory database systems", SIGMOD
1984; Gawlick & Kinkade, 1985), one command and one transaction per batch instead of
one each per copy. Nothing acknowledged depends on it: until a copy's commit is
answered its hint stays, and hinted hand-off redoes a copy whose commit was lost.

A commit the writer does wait for (it holds no copy of its own: about a third of the
instances with R=2 on three peers) goes at once (``commit(..., now=True)``), in a
``Commits`` box that carries with it whatever waits for that holder: one box and one
catalog transaction there for all of them, not a ``Commit`` of its own.

A holder that takes them on its push port (``pushport``: ``COMMIT``) gets each box
there, from a thread, instead of over AMP (*push*): the same list, the same answer, the
same transaction there — no AMP box and no pyOpenSSL on either reactor. A waited-for
commit pipelined behind its copy's END (``pushport.COMMIT_LAST``, ``behind``) carries
what is queued for that holder in the same way.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p.overlay.commands import MAX_COMMITS, Commits, ReplicaRefused

log = Logger()

DELAY = 0.05              # seconds a commit waits for others to the same holder
MAX_JSON = 60000          # bytes of one Commits' list (an AMP value: at most 65,535)


class GroupCommits:
    """Commits queued per holder peer (reactor thread)."""

    def __init__(self, overlay, reactor, delay: float = DELAY, push=None):
        self.overlay, self.reactor, self.delay = overlay, reactor, delay
        self.push = push        # (peer, copies JSON) -> Deferred[answer], or None: AMP
        self.queued: dict[str, list] = {}     # peer -> [(archive, uid, sha256, Deferred)]
        self.size: dict[str, int] = {}        # peer -> bytes of its list's JSON
        self.timers: dict[str, object] = {}

    def commit(self, peer: str, archive: str, uid: str, sha256: str,
               now: bool = False) -> defer.Deferred:
        """Deferred[{"seq": n}], as a ``Commit`` answers; fails with ReplicaRefused if
        the holder refused it, or with the call's error. *now*: someone waits for it,
        send it (and what is queued for *peer*) at once."""
        d = defer.Deferred()
        queue = self.queued.setdefault(peer, [])
        queue.append((archive, uid, sha256, d))
        self.size[peer] = self.size.get(peer, 2) + len(json.dumps([archive, uid, sha256])) + 2
        if now or len(queue) >= MAX_COMMITS or self.size[peer] >= MAX_JSON:
            self.send(peer)
        elif peer not in self.timers:
            self.timers[peer] = self.reactor.callLater(self.delay, self.send, peer)
        return d

    def behind(self, push, peer: str, last: list) -> None:
        """The commit *last* ([archive, uid, sha256]) sent behind *push*'s END
        (``pushport.COMMIT_LAST``) after what is queued for *peer* (one box and one
        transaction there for all, as a waited-for commit carries them; numbered there
        in that order, and learned here in that order: the queued ones once the answer
        is in, *last* by its store); those are queued again if it is refused, lost or
        not sent (a holder that recorded them then answers null: their hints stay, as
        for any commit lost)."""
        queue = self._take(peer)
        copies = json.dumps([[a, u, s] for a, u, s, _ in queue] + [last])
        if not push.verdict(copies, lambda answer: self._rode(peer, answer, queue)):
            self._rode(peer, None, queue)

    def _rode(self, peer: str, answer, queue) -> None:
        """Reactor: *answer*, a checked ``Commits`` answer of *queue* and the last copy
        (else its error, or None), given to *queue*'s commits; or they go again."""
        if isinstance(answer, dict) and len(answer["seqs"]) == 1 + len(queue):
            self._answered({"seqs": answer["seqs"][:-1], "prevs": answer["prevs"][:-1]},
                           queue)
        else:
            for archive, uid, sha256, d in queue:
                self.commit(peer, archive, uid, sha256).chainDeferred(d)

    def _take(self, peer: str) -> list:
        """What is queued for *peer*, taken out (its timer cancelled)."""
        timer = self.timers.pop(peer, None)
        if timer is not None and timer.active():
            timer.cancel()
        self.size.pop(peer, None)
        return self.queued.pop(peer, [])

    def send(self, peer: str) -> None:
        """Send what is queued for *peer* now."""
        queue = self._take(peer)
        if not queue:
            return
        copies = json.dumps([[a, u, s] for a, u, s, _ in queue])
        d = self.push(peer, copies) if self.push is not None else None
        if d is None:
            d = defer.maybeDeferred(self.overlay.membership.call, peer, Commits,
                                    copies=copies)
        d.addCallbacks(self._answered, self._failed, callbackArgs=(queue,),
                       errbackArgs=(queue,))

    def stop(self) -> None:
        """The peer stops (its overlay has already): nothing more is sent. What is
        queued stays owed — each copy's hint is in our catalog, and hinted hand-off
        redoes the commit once we are back (a duplicate of the pending copy there)."""
        for timer in self.timers.values():
            if timer.active():
                timer.cancel()
        left = sum(len(q) for q in self.queued.values())
        self.timers, self.queued, self.size = {}, {}, {}
        if left:
            log.info("{n} commits of remote copies left to hinted hand-off", n=left)

    @staticmethod
    def _answered(answer, queue) -> None:
        seqs = _listed(answer.get("seqs"))
        if not isinstance(seqs, list) or len(seqs) != len(queue):
            GroupCommits._failed(ReplicaRefused("a Commits answer of another shape"), queue)
            return
        prevs = _prevs(answer.get("prevs"), len(seqs))
        for (_, uid, _, d), seq, prev in zip(queue, seqs, prevs):
            if _count(seq):
                d.callback({"seq": seq, "prev": prev if _count(prev) and prev < seq else None})
            else:
                d.errback(ReplicaRefused(f"the holder did not record {uid}"))

    @staticmethod
    def _failed(failure, queue) -> None:
        for *_, d in queue:
            d.errback(failure)


def one_recorded(answer) -> dict | None:
    """{"seq", "prev"} (as ``commit`` gives it) if *answer*, the holder's answer to a
    ``COMMIT_LAST`` (checked: ``pushport``; or its error, or None), recorded the copy
    it names last; else None."""
    seqs = answer.get("seqs") if isinstance(answer, dict) else None
    if not (isinstance(seqs, list) and seqs and _count(seqs[-1])):
        return None
    prev = _prevs(answer.get("prevs"), len(seqs))[-1]
    return {"seq": seqs[-1], "prev": prev if _count(prev) and prev < seqs[-1] else None}


def _count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def _prevs(prevs, n: int) -> list:
    """A ``Commits`` answer's *prevs* (absent from an older holder): n values."""
    found = _listed(prevs)
    return found if isinstance(found, list) and len(found) == n else [None] * n


def _listed(value):
    """A list an answer holds: as JSON (over AMP) or already a list (the push port)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):      # (nested past the decoder's depth)
            return None
    return value
