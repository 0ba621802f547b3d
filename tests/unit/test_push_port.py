"""The push port (``transfer.pushport``): a holder's thread reads a pushed copy straight
into a file, hashing it, and answers with the receipt ``Replicate`` answers; what a
hostile writer sends is bounded and checked before a byte is kept (a UID or header that
does not check is refused and the connection goes on; an oversized frame or data set, or
a connection cut mid-copy, closes it and leaves no file); a holder's answer of another
shape is refused at the writer. Real sockets, real mutual TLS (the cluster CA), a real
``ReplicaService``; the archive stores in the reactor as an adapter does (a stand-in).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import ssl
import threading

import pytest
from twisted.internet import defer

from pacsp2p.overlay import threadtls, tls
from pacsp2p.transfer import pushport, pushrecv
from pacsp2p.transfer.pushport import (DATA, END, HEAD, OPEN, FRAME, Pushes,
                                       ReplicaRefused, _frame, _receipt)
from pacsp2p.transfer.pushrecv import PushServer
from pacsp2p.transfer.replicas import ReplicaService
from pacsp2p.types import InstanceMeta, Stored

UID = "1.2.3.4.5"
CT = "1.2.840.10008.5.1.4.1.1.2"
PATIENCE = 60.0


class Reactor:
    """Runs what a thread hands the reactor at once, in that thread (the service's
    reactor-side state is touched by one test thread at a time here)."""

    def callFromThread(self, fn, *args, **kw):          # noqa: N802
        fn(*args, **kw)

    def __init__(self):
        self.shutdown = []

    def seconds(self):
        return 0.0

    def addSystemEventTrigger(self, phase, event, fn):   # noqa: N802 (thread pools)
        self.shutdown.append(fn)


class Archive:
    name = "local"
    capabilities = frozenset({"store"})

    def __init__(self):
        self.held = {}

    def store(self, path, meta):
        data = path.read_bytes()
        self.held[meta.sop_instance_uid] = data
        return defer.succeed(Stored("local", meta.sha256, len(data)))


def meta_json(uid=UID):
    return json.dumps(dataclasses.asdict(InstanceMeta(uid, CT, "1.2.840.10008.1.2.1", {
        "SOPInstanceUID": uid, "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"})))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pushport")
    for name in ("peera", "peerb"):
        if name == "peera":
            tls.init_ca(root)
        tls.issue(root, name)
    return root


@pytest.fixture
def holder(certs, tmp_path):
    reactor = Reactor()
    svc = ReplicaService("peerb", {"local": Archive()}, None, None, reactor)
    svc.tmpdir = tmp_path
    server = PushServer(svc, reactor, threadtls.server_context(certs, "peerb"), "push port",
                        max_connections=4).listen(0, "127.0.0.1")
    yield svc, server
    server.stopListening()
    for stop in reactor.shutdown:
        stop()


def connect(certs, port):
    ctx = threadtls.client_context(certs, "peera")
    ctx.check_hostname = False
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=PATIENCE))
    sock.settimeout(PATIENCE)
    return sock


def answer(sock):
    return json.loads(pushport._Reader(sock).payload(pushport.ANSWER, 1 << 16))


def push(sock, data, uid=UID, meta=None, archive="local"):
    opening = json.dumps({"archive": archive, "uid": uid,
                          "meta": meta if meta is not None else meta_json(uid)}).encode()
    sock.sendall(_frame(OPEN, opening) + _frame(HEAD, b"HEAD") + _frame(DATA, data) +
                 _frame(END))
    return answer(sock)


def closed(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def test_a_pushed_copy_is_kept_pending_and_answered_with_its_hash(certs, holder):
    svc, server = holder
    sock = connect(certs, server.port)
    data = b"x" * 300_000
    got = push(sock, data)
    sha = hashlib.sha256(data).hexdigest()
    assert got.get("sha256") == sha, got
    assert _receipt(got)["sha256"] == sha
    assert svc.archives["local"].held[UID] == b"HEAD" + data
    assert ("local", UID, sha) in svc.pending
    assert push(sock, b"second")["sha256"] == hashlib.sha256(b"second").hexdigest()
    sock.close()


def test_a_bad_uid_or_header_is_refused_and_the_connection_goes_on(certs, holder):
    svc, server = holder
    sock = connect(certs, server.port)
    assert push(sock, b"a", uid="1.2.x")["invalid"] is True
    assert "refused" in push(sock, b"a", meta=meta_json("1.2.3.9"))
    assert "refused" in push(sock, b"a", archive="nowhere")
    assert svc.pending == {} and svc.archives["local"].held == {}
    assert push(sock, b"ok")["sha256"] == hashlib.sha256(b"ok").hexdigest()
    assert svc.archives["local"].held == {UID: b"HEADok"}
    sock.close()
    no_file_left(svc, server)


def no_file_left(svc, server):
    """Wait until no thread serves and no received file is left (removed in a pool)."""
    for _ in range(600):
        if not list(svc.tmpdir.iterdir()) and server.status()["serving"] == 0:
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"left: {list(svc.tmpdir.iterdir())}, {server.status()}")


@pytest.mark.parametrize("cut", ["frame", "dataset", "mid-copy"])
def test_an_oversized_frame_or_data_set_or_a_cut_copy_closes_and_leaves_no_file(
        certs, holder, monkeypatch, cut):
    svc, server = holder
    monkeypatch.setattr(pushrecv, "MAX_PUSH", 100_000)   # (the holder's bound)
    sock = connect(certs, server.port)
    opening = json.dumps({"archive": "local", "uid": UID, "meta": meta_json()}).encode()
    sock.sendall(_frame(OPEN, opening) + _frame(HEAD, b"HEAD") + _frame(DATA, b"y" * 60_000))
    if cut == "frame":
        sock.sendall(FRAME.pack(DATA, pushport.MAX_DATA + 1))
    elif cut == "dataset":
        sock.sendall(_frame(DATA, b"y" * 60_000))
    else:
        sock.close()
    if cut != "mid-copy":
        assert closed(sock)
    no_file_left(svc, server)
    assert svc.pending == {}


def test_the_writer_refuses_an_answer_of_another_shape():
    good = {"duplicate": False, "conflict": False, "size": 3, "sha256": "ab" * 32,
            "given": ""}
    assert _receipt(good)["size"] == 3
    for bad in ({**good, "sha256": "../x"}, {**good, "size": -1}, {**good, "size": True},
                {**good, "duplicate": "no"}, [good], {"refused": "full", "invalid": True}):
        with pytest.raises(Exception) as e:
            _receipt(bad)
        assert isinstance(e.value, (ReplicaRefused, pushport.InvalidArgument))


def test_the_writer_checks_the_holder_is_the_peer_it_meant(certs, holder):
    svc, server = holder
    pushes = Pushes(certs, "peera", Reactor())
    with pytest.raises(ReplicaRefused, match="is peer 'peerb', not peerc"):
        pushes.connect(("peerc", "127.0.0.1", server.port))
    sock = pushes.connect(("peerb", "127.0.0.1", server.port))
    sock.close()


def test_a_whole_copy_through_the_writer_and_one_cut_when_it_stops(certs, holder):
    """The writer's side end to end (a ThreadPush fed in pieces, its thread sending),
    then a copy still arriving when the writer stops: its thread ends at once (no wait
    of IDLE seconds at shutdown), the copy fails, the holder keeps no file of it."""
    svc, server = holder
    reactor = Reactor()
    pushes = Pushes(certs, "peera", reactor)
    outcome = []

    def start(uid):
        push = pushes.open("peerb", "127.0.0.1", server.port, "local", uid, b"HEAD",
                           meta_json(uid), lambda: None, lambda: None)
        push.answer.addBoth(outcome.append)
        return push

    whole = start(UID)
    for _ in range(5):
        whole.feed(memoryview(b"w" * 100_000))
    whole.finish()
    wait(lambda: outcome, "the first answer")
    assert outcome.pop()["sha256"] == hashlib.sha256(b"w" * 500_000).hexdigest()
    cut = start("1.2.3.4.6")
    cut.feed(b"z" * 300_000)                         # sent on: BOX is 256 KB
    wait(lambda: cut.sender.sock is not None and cut.queued == 0, "the bytes sent")
    pushes.stop()
    wait(lambda: outcome, "the copy cut")
    assert outcome[0].check(ReplicaRefused), outcome[0]
    assert list(svc.pending) == [("local", UID, hashlib.sha256(b"w" * 500_000).hexdigest())]
    no_file_left(svc, server)
    for stop in reactor.shutdown:
        stop()


def wait(condition, what):
    for _ in range(int(PATIENCE * 10)):
        if condition():
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"not within {PATIENCE} s: {what}")


def test_a_holder_that_never_answers_the_handshake_is_cut_when_the_writer_stops(
        certs, monkeypatch):
    """A holder's push port that accepts and then says nothing (hung, or not TLS): a
    writer that stops cuts the handshake at once; before, its push-send thread waited
    the handshake's whole timeout (CONNECT), and the pool's join held the reactor's
    shutdown that long."""
    monkeypatch.setattr(pushport, "CONNECT", 600.0)
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    acceptor = threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True)
    acceptor.start()
    reactor = Reactor()
    pushes = Pushes(certs, "peera", reactor)
    outcome = []
    push = pushes.open("peerb", "127.0.0.1", silent.getsockname()[1], "local", UID,
                       b"HEAD", meta_json(), lambda: None, lambda: None)
    push.answer.addBoth(outcome.append)
    push.feed(b"x" * 1000)
    push.finish()
    wait(lambda: held, "the connection accepted")
    pushes.stop()
    wait(lambda: outcome, "the copy cut")
    assert outcome[0].check(ReplicaRefused), outcome[0]
    assert not pushes.senders
    for stop in reactor.shutdown:
        stop()
    held[0].close()
    silent.close()
