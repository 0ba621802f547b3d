"""The janitor of pending copies (``ReplicaService._expire``, the reactor) and a push
port's ``COMMIT`` (``commits_now``, a thread; ``Commit`` here) both take pending copies out. The janitor
looked whether a key's oldest copy was too old, let go of the lock, then took "the
oldest" under it again: a commit taking that copy in between left it None (TypeError:
the janitor's LoopingCall stopped for good -- no copy expired or was recorded for a dead
writer again) or the next copy of the key, a young one whose commit was on its way
(dropped: that commit refused, the C-STORE failed or its hint redid the copy).

The interleaving is made deterministic: the lock runs the commit right after the
janitor's check releases it, as a push-port thread would. A real SQLite catalog; the
archive and the overlay are the stand-ins of test_replica_pending.
"""
from __future__ import annotations

import threading

from pacsp2p.transfer.replicas import PENDING_TTL

from test_delete_guards import UID, result
from test_replica_pending import SHA, copy, service


class _Interleaved:
    """A lock that runs *hook* once, after its *n*-th release."""

    def __init__(self, n, hook):
        self.lock, self.n, self.hook = threading.Lock(), n, hook

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        self.n -= 1
        if self.n == 0:
            self.hook()


def test_a_copy_committed_while_the_janitor_looks_at_it(tmp_path):
    """Whichever comes first, the janitor or the late commit, the copy is recorded
    (the commit took it) or dropped (its writer alive), once, and the janitor runs on."""
    for n in range(1, 5):              # the commit after each of the lock's releases
        svc, cat = service(tmp_path / str(n))
        copy(svc, "t1")
        svc.reactor.advance(PENDING_TTL + 1)
        committed = []
        svc.lock = _Interleaved(n, lambda: committed.append(
            result(svc.commit("local", UID, SHA).addErrback(lambda f: None))))
        svc._expire()                  # n=2 raised TypeError ('NoneType' ...)
        if not committed:
            svc.lock.hook()
        discarded = svc.archives["local"].discarded
        assert (committed, len(cat.recorded), discarded) in (
            ([1], 1, []), ([None], 0, [(UID, SHA)])), n
        assert not svc.pending and not svc.more, n


def test_a_young_copy_behind_it_is_left_alone(tmp_path, monkeypatch):
    """Two copies of one key: the first past PENDING_TTL (its commit comes late, now),
    the second noted 10 s ago by a writer since declared dead (its commit may still
    come; it is not the janitor's before PENDING_TTL). Whichever comes first, one copy
    is recorded and the bytes stay; n=2 had the janitor take the young copy and record
    it too."""
    from test_replica_pending import Overlay
    monkeypatch.setattr(Overlay.membership, "dead", {"peerc"})
    for n in range(1, 5):
        svc, cat = service(tmp_path / str(n))
        copy(svc, "t1")
        svc.reactor.advance(PENDING_TTL - 10)
        copy(svc, "t2", writer="peerc")
        svc.reactor.advance(11)
        svc.lock = _Interleaved(n, lambda: result(svc.commit("local", UID, SHA)))
        svc._expire()
        if svc.lock.n > 0:
            svc.lock.hook()
        assert len(cat.recorded) == 1, n
        assert svc.archives["local"].discarded == [], n


def test_a_discard_while_the_other_copy_is_committed(tmp_path):
    """Two pending copies of the same bytes (a C-STORE sent twice at once): the first
    discarded (AMP, the reactor) while the second is committed (a push port's thread).
    Whichever comes first, the committed copy keeps its bytes; a commit between the
    discard's take and its drop recorded the second and the drop then removed the bytes
    it names (a recorded copy of an acknowledged instance gone)."""
    for n in range(1, 4):
        svc, cat = service(tmp_path / str(n))
        copy(svc, "t1"), copy(svc, "t2")
        svc.lock = _Interleaved(n, lambda: result(svc.commit("local", UID, SHA)))
        result(svc.discard("local", UID, SHA))
        if svc.lock.n > 0:
            svc.lock.hook()
        assert len(cat.recorded) == 1, n
        assert svc.archives["local"].discarded == [], n
        assert not svc.pending and not svc.more, n
