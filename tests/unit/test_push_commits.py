"""``Commits`` on the push port (``pushport.COMMIT``): a writer's phase 2 for the copies
it pushed goes on the same stdlib-TLS connection, between copies, instead of as an AMP
box; the holder records them in one catalog transaction and answers seqs and prevs as
the AMP responder does. What a hostile writer sends is checked as that responder checks
it (a bad UID or list is refused and the connection goes on; an oversized frame closes
it). Real sockets, real mutual TLS, a real ``ReplicaService`` and a real ``Catalog``.
"""
from __future__ import annotations

import hashlib
import json

import pytest
from twisted.internet.threads import deferToThreadPool

from pacsp2p import threads

from pacsp2p.catalog.db import Catalog
from pacsp2p.overlay import threadtls
from pacsp2p.testing.cluster import patience
from pacsp2p.transfer import pushport
from pacsp2p.transfer.pushport import COMMIT, FRAME, Pushes, _frame
from pacsp2p.transfer.pushrecv import PushServer
from pacsp2p.transfer.replicas import ReplicaService
from test_catalog_scale import ThreadReactor
from test_push_port import (UID, Archive, answer, certs, closed, connect,  # noqa: F401
                            meta_json, push)


class Reactor(ThreadReactor):
    """The test's thread is the reactor (``wait`` pumps what threads hand it)."""

    def __init__(self):
        super().__init__()
        self.shutdown = []

    def seconds(self):
        return 0.0

    def addSystemEventTrigger(self, phase, event, fn):   # noqa: N802 (thread pools)
        self.shutdown.append(fn)

    def wait(self, d, timeout: float = 60):
        return super().wait(d, patience(timeout))


def serve_pushes(reactor, certs, tmp_path, archive, max_connections: int = 4):
    """peerb's push port on 127.0.0.1 over *archive* ("local"): a real started
    ``Catalog``, a real ``ReplicaService`` (incoming under *tmp_path*), a real TLS
    ``PushServer``; (catalog, service, server)."""
    catalog = Catalog(tmp_path / "catalog.sqlite", reactor, peer="peerb")
    reactor.wait(catalog.start())
    svc = ReplicaService("peerb", {"local": archive}, catalog, None, reactor)
    svc.tmpdir = tmp_path / "incoming"
    svc.tmpdir.mkdir()
    server = PushServer(svc, reactor, threadtls.server_context(certs, "peerb"), "push port",
                        max_connections=max_connections).listen(0, "127.0.0.1")
    return catalog, svc, server


@pytest.fixture
def holder(certs, tmp_path):  # noqa: F811
    reactor = Reactor()
    catalog, svc, server = serve_pushes(reactor, certs, tmp_path, Archive())
    yield reactor, svc, server
    server.stopListening()
    reactor.wait(catalog.stop())
    for stop in reactor.shutdown:
        stop()


def copies(*entries) -> str:
    return json.dumps([list(e) for e in entries])


def test_a_pushed_copy_is_committed_on_the_push_port(certs, holder):  # noqa: F811
    """The writer's ``Pushes.commit`` after its copy: recorded in the holder's catalog,
    answered with its fact's number and the one before; once more: nothing pending, a
    null seq (the writer's hint stays), as ``Commits`` answers."""
    reactor, svc, server = holder
    pushes = Pushes(certs, "peera", reactor)
    data = b"c" * 200_000
    sha = hashlib.sha256(data).hexdigest()
    copy = pushes.open("peerb", "127.0.0.1", server.port, "local", UID, b"HEAD",
                       meta_json(), lambda: None, lambda: None)
    copy.feed(data)
    copy.finish()
    assert reactor.wait(copy.answer)["sha256"] == sha
    assert ("local", UID, sha) in svc.pending
    got = reactor.wait(pushes.commit("peerb", "127.0.0.1", server.port,
                                     copies(("local", UID, sha))))
    seq = got["seqs"][0]
    assert type(seq) is int and seq > 0 and got["prevs"] == [svc.catalog.previous(seq)]
    assert svc.pending == {}
    refs = reactor.wait(svc.catalog.resolve(_image(UID)))
    assert [(loc.peer, loc.archive, loc.sha256) for loc in refs[0].locations] == \
        [("peerb", "local", sha)]
    again = reactor.wait(pushes.commit("peerb", "127.0.0.1", server.port,
                                       copies(("local", UID, sha))))
    assert again == {"seqs": [None], "prevs": [None]}
    pushes.stop()
    stopped = []        # a writer that stops starts no sender: the commit fails at once
    pushes.commit("peerb", "127.0.0.1", server.port, copies(("local", UID, sha))) \
        .addErrback(stopped.append)
    assert stopped and stopped[0].check(pushport.ReplicaRefused)


def test_a_hostile_commit_is_refused_and_the_connection_goes_on(certs, holder):  # noqa: F811
    reactor, svc, server = holder
    sock = connect(certs, server.port)

    def commit(payload):
        sock.sendall(_frame(COMMIT, payload.encode() if isinstance(payload, str) else payload))
        return reactor.wait(_in_thread(reactor, answer, sock))

    assert commit(copies(("local", "1.2.x", "0" * 64)))["invalid"] is True
    assert commit(copies(("local", UID, "../etc")))["invalid"] is True
    assert commit(b'{"a": 1}')["invalid"] is True
    assert commit(b"\xff\xfe")["invalid"] is True
    assert commit(b"[]")["invalid"] is True
    too_many = copies(*[("local", f"1.2.3.{i}", "0" * 64) for i in range(300)])
    assert commit(too_many)["invalid"] is True
    # nothing pending: a null seq, and the connection still takes a copy
    assert commit(copies(("local", UID, "0" * 64))) == \
        {"seqs": [None], "prevs": [None]}
    assert reactor.wait(_in_thread(reactor, push, sock, b"ok"))["sha256"] == hashlib.sha256(b"ok").hexdigest()
    sock.sendall(FRAME.pack(COMMIT, pushport.MAX_OPEN + 1))
    assert closed(sock)


def _in_thread(reactor, fn, *args):
    """Deferred[fn(*args)], run in a thread while the test's thread runs the reactor
    (the holder's commit and store need it)."""
    return deferToThreadPool(reactor, threads.pool(reactor, "test-reads", 1, 1), fn, *args)


def _image(uid):
    from pacsp2p.types import Query
    return Query("IMAGE", {"SOPInstanceUID": uid})


def counting_reactor():
    """A test ``Reactor`` and the list its ``callFromThread`` calls go into (names)."""
    reactor, turns = Reactor(), []
    plain = reactor.callFromThread

    def counted(fn, *args, **kw):
        turns.append(getattr(fn, "__qualname__", repr(fn)))
        plain(fn, *args, **kw)
    reactor.callFromThread = counted
    return reactor, turns


def test_a_kept_copy_is_noted_pending_without_a_reactor_turn(certs, tmp_path):  # noqa: F811
    """An archive that can ``keep`` takes a pushed copy in the thread that read it; the
    pending copy is noted there too (under the service's lock), before the answer goes:
    no blocking turn of the reactor per copy (the holder's reactor was woken and waited
    for once per copy before), and a COMMIT on the same connection finds it."""
    from pacsp2p.adapters.embedded import EmbeddedArchive
    reactor, turns = counting_reactor()
    archive = EmbeddedArchive("local", tmp_path / "archive", reactor)
    reactor.wait(archive.start())
    catalog, svc, server = serve_pushes(reactor, certs, tmp_path, archive)
    try:
        sock = connect(certs, server.port)
        data = b"k" * 50_000
        turns.clear()
        got = push(sock, data)                  # in the test's thread: no reactor runs
        assert "sha256" in got, got
        assert turns == [], turns
        (key,) = list(svc.pending)
        assert key[:2] == ("local", UID)
        sock.sendall(_frame(COMMIT, copies(key).encode()))
        seq = reactor.wait(_in_thread(reactor, answer, sock))["seqs"][0]
        assert type(seq) is int and seq > 0 and svc.pending == {}
        sock.close()
    finally:
        server.stopListening()
        reactor.wait(catalog.stop())
        archive.stop()
        for stop in reactor.shutdown:
            stop()


def test_a_commit_is_recorded_by_the_thread_that_read_it(certs, tmp_path):  # noqa: F811
    """A ``COMMIT``'s copies are recorded by the push-port thread that read the frame, in
    one transaction on the catalog writer's connection (under its lock), and answered
    with no reactor turn waited for: before, that thread handed the copies to the
    holder's reactor, which handed them to the catalog writer's thread and back, then
    back to the thread (~2 ms of hand-offs per COMMIT at a busy holder: the eleventh
    session's timing). The reactor is told after (``committed_now``: the version
    vector, the listeners), not waited for. Here the test's thread is the reactor and
    does not run while the writer's end reads the answer."""
    import time
    from pacsp2p.adapters.embedded import EmbeddedArchive
    reactor, turns = counting_reactor()
    reactor.seconds = time.time     # the copy is made after any deletion another test
                                    # of this process learned (``no_news_since``)
    archive = EmbeddedArchive("local", tmp_path / "archive", reactor)
    reactor.wait(archive.start())
    catalog, svc, server = serve_pushes(reactor, certs, tmp_path, archive)
    try:
        sock = connect(certs, server.port)
        sock.settimeout(patience(10))
        assert "sha256" in push(sock, b"n" * 50_000)
        (key,) = list(svc.pending)
        turns.clear()
        sock.sendall(_frame(COMMIT, copies(key, ("local", UID, "0" * 64)).encode()))
        got = answer(sock)             # in the test's thread: no reactor runs meanwhile
        seq = got["seqs"][0]
        assert type(seq) is int and seq > 0 and got["seqs"][1] is None, got
        assert got["prevs"] == [catalog.previous(seq), None]
        assert svc.pending == {}                       # (the other: none pending, refused)
        reactor.wait(catalog.resolve(_image(UID)))          # the reactor runs again
        assert turns[0] == "Catalog.committed_now", turns
        assert catalog.vector["peerb"] == seq
        refs = reactor.wait(catalog.resolve(_image(UID)))
        assert [(loc.peer, loc.archive, loc.sha256) for loc in refs[0].locations] == \
            [("peerb", "local", key[2])]
        sock.close()
    finally:
        server.stopListening()
        reactor.wait(catalog.stop())
        archive.stop()
        for stop in reactor.shutdown:
            stop()
