"""A pushes-only copy's commit pipelined behind its END (``pushport.COMMIT_LAST``): the
writer's sender thread sends the commit as soon as the writer's verdict is in, without
waiting for the copy's answer, and reads both answers; the holder reads it once the copy
is durable and answered, and records that copy only if it hashes to the writer's hash.
One round trip per holder fewer for the C-STOREs the writer keeps no copy of (a third of
them at 3 peers, nearly all at 32). Real sockets, real mutual TLS, a real
``ReplicaService``, ``Catalog`` and embedded archive at the holder; the test's thread is
the reactor (``test_push_commits``)."""
from __future__ import annotations

import hashlib
import select
import time

import pytest

from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.overlay.commands import ReplicaRefused
from pacsp2p.testing.cluster import patience
from pacsp2p.transfer import pushrecv
from pacsp2p.transfer.pushport import COMMIT, COMMIT_LAST, Pushes, _frame
from test_push_commits import Reactor, _image, _in_thread, copies, serve_pushes
from test_push_port import UID, answer, certs, connect, meta_json, push  # noqa: F401


@pytest.fixture
def embedded(certs, tmp_path):  # noqa: F811
    """peerb's push port over a real embedded archive: (reactor, catalog, service,
    server)."""
    reactor = Reactor()
    reactor.seconds = time.time     # copies made after any deletion learned in this
                                    # process (``no_news_since``): recorded by the thread
    archive = EmbeddedArchive("local", tmp_path / "archive", reactor)
    reactor.wait(archive.start())
    catalog, svc, server = serve_pushes(reactor, certs, tmp_path, archive)
    yield reactor, catalog, svc, server
    server.stopListening()
    reactor.wait(catalog.stop())
    archive.stop()
    for stop in reactor.shutdown:
        stop()


def _watch(monkeypatch) -> list:
    """For each copy the holder receives: whether the writer's next frame is there
    already when the holder has the copy's answer ready, before it is sent."""
    seen = []
    real = pushrecv._receive

    def receive(service, reader, *args):
        got = real(service, reader, *args)
        sock = reader.sock
        ready = sock.pending() > 0 or bool(select.select([sock], [], [], patience(5))[0])
        seen.append(ready)
        return got
    monkeypatch.setattr(pushrecv, "_receive", receive)
    return seen


def _copy(pushes, port, data, verdict):
    """A pipelined copy of *data* sent, its verdict *verdict(sha)* given (JSON or None)
    once END is queued, as ``recorded.store_remote`` gives it."""
    copy = pushes.open("peerb", "127.0.0.1", port, "local", UID, b"HEAD", meta_json(),
                       lambda: None, lambda: None)
    copy.pipelined = True
    copy.feed(data)
    copy.finish()
    copy.verdict(verdict(hashlib.sha256(data).hexdigest()))
    return copy


def test_the_commit_reaches_the_holder_before_the_copy_is_answered(certs, embedded,  # noqa: F811
                                                                    monkeypatch):
    """Before: the writer sent its COMMIT only once the copy's answer had reached its
    reactor (a second round trip per holder); the holder found nothing to read after
    the copy until it had answered."""
    reactor, catalog, svc, server = embedded
    seen = _watch(monkeypatch)
    pushes = Pushes(certs, "peera", reactor)
    data = b"p" * 100_000
    sha = hashlib.sha256(data).hexdigest()
    copy = _copy(pushes, server.port, data, lambda sha: copies(("local", UID, sha)))
    got = reactor.wait(copy.answer, patience(60))
    assert got["sha256"] == sha
    assert seen == [True]                     # the commit was there before the answer
    seq = copy.committed["seqs"][0]
    assert type(seq) is int and seq > 0, copy.committed
    assert copy.committed["prevs"] == [catalog.previous(seq)]
    assert svc.pending == {}
    refs = reactor.wait(catalog.resolve(_image(UID)))
    assert [(loc.peer, loc.archive, loc.sha256) for loc in refs[0].locations] == \
        [("peerb", "local", sha)]
    pushes.stop()


def test_another_hash_or_no_verdict_records_nothing(certs, embedded):  # noqa: F811
    """A commit naming a hash other than the bytes received is refused (nothing
    recorded, the copy stays pending for the writer's general way to drop); a data set
    the writer does not keep (verdict None) sends no commit; the connection goes on."""
    reactor, catalog, svc, server = embedded
    pushes = Pushes(certs, "peera", reactor)
    other = _copy(pushes, server.port, b"q" * 20_000, lambda sha: copies(("local", UID,
                                                                          "0" * 64)))
    sha = reactor.wait(other.answer, patience(60))["sha256"]
    assert isinstance(other.committed, ReplicaRefused), other.committed
    assert "hash" in str(other.committed)
    assert ("local", UID, sha) in svc.pending
    none = _copy(pushes, server.port, b"r" * 20_000, lambda sha: None)
    sha2 = reactor.wait(none.answer, patience(60))["sha256"]
    assert none.committed is None and ("local", UID, sha2) in svc.pending
    assert reactor.wait(catalog.resolve(_image(UID))) == []
    assert len(pushes.senders) == 1           # one connection carried all of it
    pushes.stop()


def test_a_commit_last_names_the_copy_just_received_or_is_refused(certs, embedded):  # noqa: F811
    """A hostile writer: a COMMIT_LAST with no copy before it, after a commit, after a
    refused copy, or naming another instance is refused and the connection goes on."""
    reactor, catalog, svc, server = embedded
    sock = connect(certs, server.port)

    def last(*entry):
        sock.sendall(_frame(COMMIT_LAST, copies(*entry).encode()))
        return reactor.wait(_in_thread(reactor, answer, sock))

    assert "refused" in last(("local", UID, "0" * 64))              # no copy before it
    data = b"h" * 10_000
    sha = hashlib.sha256(data).hexdigest()
    assert reactor.wait(_in_thread(reactor, push, sock, data))["sha256"] == sha
    assert "refused" in last(("local", "1.2.3.4.6", sha))          # another instance
    assert "refused" in last(("local", UID, sha))                   # not right behind
    assert "refused" in reactor.wait(_in_thread(reactor, push, sock, b"x",
                                                "1.2.3.4.7", meta_json("1.2.3.4.8")))
    assert "refused" in last(("local", "1.2.3.4.7", hashlib.sha256(b"x").hexdigest()))
    assert "refused" in last(("local", UID, sha), ("local", UID, sha))
    assert ("local", UID, sha) in svc.pending                       # nothing recorded
    sock.sendall(_frame(COMMIT, copies(("local", UID, sha)).encode()))
    assert reactor.wait(_in_thread(reactor, answer, sock))["seqs"][0] > 0
    sock.close()


class _Timer:
    """A ``callLater`` that never fires by itself (the test sends the queue)."""

    def active(self):
        return True

    def cancel(self):
        pass


@pytest.mark.parametrize("first_ok", [True, False])
def test_what_waits_for_that_holder_rides_with_the_copy(certs, embedded, first_ok):  # noqa: F811
    """``GroupCommits.behind``: the commits queued for that holder (copies of C-STOREs
    the writer kept a copy of, not waited for) go in the same COMMIT_LAST, recorded in
    the same transaction, instead of a box and a transaction of their own 50 ms later
    (the waited-for COMMIT carried them so before it was pipelined), numbered before the
    copy (the order the writer learns them in). If the holder
    refuses it (here: another hash), they are queued again and go the plain way."""
    from pacsp2p.transfer.commits import GroupCommits, one_recorded
    reactor, catalog, svc, server = embedded
    reactor.callLater = lambda delay, fn, *args: _Timer()
    pushes = Pushes(certs, "peera", reactor)
    group = GroupCommits(None, reactor, push=lambda peer, c: pushes.commit(
        peer, "127.0.0.1", server.port, c))
    other, data = "1.2.3.4.9", b"w" * 30_000
    sock = connect(certs, server.port)
    sha_other = reactor.wait(_in_thread(reactor, push, sock, b"o" * 9_000, other,
                                        meta_json(other)))["sha256"]
    sock.close()
    queued = group.commit("peerb", "local", other, sha_other)
    sha = hashlib.sha256(data).hexdigest()
    copy = pushes.open("peerb", "127.0.0.1", server.port, "local", UID, b"HEAD",
                       meta_json(), lambda: None, lambda: None)
    copy.pipelined = True
    copy.feed(data)
    copy.finish()
    group.behind(copy, "peerb", ["local", UID, sha if first_ok else "0" * 64])
    assert group.queued == {}
    reactor.wait(copy.answer, patience(60))
    if first_ok:
        mine = one_recorded(copy.committed)
        got = reactor.wait(queued)
        assert got["seq"] > 0 and group.queued == {}
        # numbered in the order the writer learns them (the queued ones as the answer
        # comes, the copy by its store): with the copy first, the writer learned the
        # queued ones first, found them not next, and pulled from the holder each time
        assert mine["prev"] == got["seq"] < mine["seq"], (got, mine)
        assert set(svc.pending) == set()
    else:
        assert isinstance(copy.committed, ReplicaRefused)
        assert [c[1] for c in group.queued["peerb"]] == [other]      # queued again
        group.send("peerb")
        assert reactor.wait(queued)["seq"] > 0
        assert set(svc.pending) == {("local", UID, sha)}             # not recorded
    assert len(reactor.wait(catalog.resolve(_image(other)))) == 1
    pushes.stop()
