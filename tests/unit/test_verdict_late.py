"""A pipelined copy's verdict that comes after its sender gave up waiting for it
(``pushport.VERDICT``: the copy was answered without a ``COMMIT_LAST``, to be committed
the plain way) is skipped by the sender, not read as the next copy's verdict. Before,
the next copy on that connection read it and failed ("a verdict of another copy"): a
copy failed for nothing (at W=2 a C-STORE refused or sent the slower way). The order of
events is made, not timed: the test's thread is the reactor and holds the first copy's
``done`` while the second copy is handed to the same sender. Real sockets, real mutual
TLS, a real ``ReplicaService``, ``Catalog`` and embedded archive at the holder
(``test_commit_last``'s holder)."""
from __future__ import annotations

import hashlib

from pacsp2p.testing.cluster import patience, wait_until
from pacsp2p.transfer import pushport
from pacsp2p.transfer.commits import one_recorded
from pacsp2p.transfer.pushport import Pushes
from test_commit_last import embedded  # noqa: F401 (a fixture)
from test_push_commits import copies
from test_push_port import UID, certs, meta_json  # noqa: F401 (a fixture)

OTHER = "1.2.3.4.9"


def _open(pushes, port, uid, data):
    copy = pushes.open("peerb", "127.0.0.1", port, "local", uid, b"HEAD", meta_json(uid),
                       lambda: None, lambda: None)
    copy.pipelined = True
    copy.feed(data)
    copy.finish()
    return copy


def test_a_verdict_given_after_its_sender_gave_up_is_skipped(certs, embedded,  # noqa: F811
                                                             monkeypatch):
    reactor, catalog, svc, server = embedded
    pushes = Pushes(certs, "peera", reactor)
    data_a, data_b = b"a" * 50_000, b"b" * 60_000
    sha_a, sha_b = (hashlib.sha256(d).hexdigest() for d in (data_a, data_b))
    monkeypatch.setattr(pushport, "VERDICT", 0.2)      # the first copy's verdict is late
    try:
        _late(reactor, svc, server, pushes, monkeypatch, data_a, data_b, sha_a, sha_b)
    finally:
        pushes.stop()


def _late(reactor, svc, server, pushes, monkeypatch, data_a, data_b, sha_a, sha_b):
    first = _open(pushes, server.port, UID, data_a)
    wait_until(lambda: any(pushes.idle.values()), 60, 0.01,
               "the first copy answered without its verdict (its done not run yet)")
    monkeypatch.setattr(pushport, "VERDICT", patience(600))
    second = _open(pushes, server.port, OTHER, data_b)
    assert second.sender is first.sender
    told = []
    assert first.verdict(copies(("local", UID, sha_a)), told.append)   # late: queued
    assert second.verdict(copies(("local", OTHER, sha_b)))
    assert reactor.wait(first.answer, patience(60))["sha256"] == sha_a
    assert first.committed is None and told == [None]       # none sent for it
    assert reactor.wait(second.answer, patience(60))["sha256"] == sha_b   # before: refused
    assert one_recorded(second.committed)["seq"] > 0, second.committed
    assert set(svc.pending) == {("local", UID, sha_a)}      # left to the plain way
    assert len(pushes.senders) == 1
