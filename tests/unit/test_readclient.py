"""The read client (``overlay.readclient``): instances read from a peer's read port on
blocking stdlib-ssl sockets, pipelined on a few kept connections.

Against a real holder (tests/unit/bulk_server.py: catalog, embedded archive, read port)
from a real ``BulkClient`` in a process of its own: byte-identical, hashed as the
reactor's client hashes, a missing one answered ``NotHeld`` without breaking the others,
many reads over at most ``LANES`` connections. Against raw TLS servers written here
(real sockets, the cluster CA): every hostile answer fails its read (never a hang, never
an exception out of the lane), a read that stalls is cut by its cancel, a kept
connection the peer closed is replaced, ``stop`` cuts a lane blocked in a read.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from bulk_spawn import bulk_server
from test_bulk_fetch_memory import expected
from test_push_port import wait
from twisted.internet import defer, error
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from pacsp2p.dicom.header import read_meta
from pacsp2p.overlay import fetching, readclient, threadtls, tls
from pacsp2p.testing import datasets

HERE = Path(__file__).parent
PATIENCE = 300.0              # generous: the machine may be busy


class Reactor:
    """Runs what a thread hands the reactor at once, in that thread (each test's
    Deferreds are looked at only once they have fired)."""

    def __init__(self):
        self.shutdown = []

    def callFromThread(self, fn, *args, **kw):          # noqa: N802
        fn(*args, **kw)

    def addSystemEventTrigger(self, phase, event, fn, *args):   # noqa: N802
        self.shutdown.append((fn, args))

    def stop(self):
        shutdown, self.shutdown = self.shutdown, []
        for fn, args in shutdown:
            fn(*args)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A cluster CA and the certificates of peers "a" and "b" (other test modules of
    the read client import this fixture)."""
    root = tmp_path_factory.mktemp("readclient")
    tls.init_ca(root)
    for name in ("a", "b"):
        tls.issue(root, name)
    return root


@pytest.fixture(scope="module")
def instance(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("inst") / "i.dcm"
    datasets.write(datasets.make_image("CT", size=64, SOPInstanceUID=datasets.uid("rc", 1)),
                   path)
    return path.read_bytes()


def outcome(d) -> list:
    got = []
    d.addBoth(got.append)
    wait(lambda: got, "the read ended")
    return got[0]


class RawHolder:
    """A TLS server of peer "a" (the cluster CA) that answers each request with the next
    of *answers* (bytes sent as they are; None: read the request and say nothing; a
    callable: called with the connection), and then closes the connection if *close*."""

    def __init__(self, certs, answers, close=False):
        self.answers, self.close = list(answers), close
        self.ctx = threadtls.server_context(certs, "a")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections, self.conns = 0, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            self.conns.append(conn)
            buf = b""
            while self.answers:
                while b"\r\n\r\n" not in buf:
                    got = conn.recv(65536)
                    if not got:
                        return
                    buf += got
                buf = buf[buf.index(b"\r\n\r\n") + 4:]
                answer = self.answers.pop(0)
                if answer is None:
                    threading.Event().wait(PATIENCE)
                    return
                if callable(answer):
                    answer(conn)
                    continue
                conn.sendall(answer)
                if self.close:
                    break
            conn.close()
        except (OSError, ValueError):
            return

    def stop(self):
        self.sock.close()


def ok(data: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(data) + data


def client(certs, reactor, tmp_path):
    return readclient.ReadClient(threadtls.client_context(certs, "b"), reactor, tmp_path,
                                 fetching.NotHeld)


def member(port):
    return SimpleNamespace(name="a", host="127.0.0.1", bulk_port=port, read_port=port)


@pytest.fixture(scope="module")
def real(tmp_path_factory, certs):
    """A real holder's read port: (its ports, the files it holds, their UIDs)."""
    root = tmp_path_factory.mktemp("rcreal")
    files = [datasets.write(datasets.make_image("CT", size=size, seed=i,
                                                SOPInstanceUID=datasets.uid("rcreal", i)),
                            root / f"{i}.dcm")
             for i, size in enumerate((64, 256, 256, 800))]     # 800x800x2: > MEMORY
    assert files[3].stat().st_size > readclient.MEMORY >= files[2].stat().st_size
    with bulk_server(root / "srv", certs, files) as ports:
        yield ports, files, [read_meta(f).sop_instance_uid for f in files]


def fetched(tmp_path, certs, ports, asked, many=False) -> dict:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = subprocess.run([sys.executable, str(HERE / "bulk_fetch.py"), str(certs),
                          str(ports["port"]), str(tmp), str(fetching.MEMORY_BUDGET),
                          "--reads", str(ports["read_port"]), *(["--many"] if many else []),
                          *asked],
                         check=False, capture_output=True, text=True, timeout=PATIENCE)
    assert out.returncode == 0 and out.stdout, out.stderr
    assert list(tmp.iterdir()) == []          # every temporary file gone once closed
    return json.loads(out.stdout)


def test_pipelined_reads_from_a_real_holder_are_byte_identical(tmp_path, certs, real):
    ports, files, uids = real
    asked = uids * 3 + ["1.2.3.4.5"] + uids          # 17 reads at once, one unknown
    answer = fetched(tmp_path, certs, ports, asked)
    for f, uid in zip(files, uids):
        got = answer["instances"][uid]
        assert {k: got[k] for k in expected(f)} == expected(f), f
        assert not got["left_on_disk"]
    assert [answer["instances"][u]["kind"] for u in uids] == ["memory"] * 3 + ["file"]
    assert answer["instances"]["1.2.3.4.5"] == "NotHeld"
    assert 1 <= answer["connections"] <= readclient.LANES        # pipelined, kept


def test_a_batch_from_a_real_holder_in_a_lane(tmp_path, certs, real):
    ports, files, uids = real
    answer = fetched(tmp_path, certs, ports, uids + ["1.2.3.4.5"], many=True)
    for f, uid in zip(files[:3], uids):       # byte-identical, hashed as a single read
        got = answer["instances"][uid]
        assert {k: got[k] for k in expected(f)} == expected(f), f
        assert got["kind"] == "memory" and got["data_sha256"] == got["sha256"]
    assert answer["instances"][uids[3]] == "Unbatched"     # too big: to be read alone
    assert answer["instances"]["1.2.3.4.5"] == "NotHeld"
    assert answer["connections"] == 1


def test_a_batch_answer_not_the_frames_asked_fails_that_batch_only(tmp_path, certs,
                                                                    instance):
    good = fetching.bulk.FRAME.pack(fetching.bulk.OK, len(instance)) + instance
    holder = RawHolder(certs, [ok(good + b"x"), ok(good),
                               b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"])
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    m = member(holder.port)
    got = [reads.post(m, holder.port, "local", b"[]", cap, lambda d: fetching._split([d], 1))
           for cap in (1 << 20, 1 << 20, 10)]
    assert outcome(got[0]).check(IOError)                  # a trailing byte
    assert outcome(got[1])[0].read() == instance           # the connection went on
    assert outcome(got[2]).check(ResponseFailed)           # over its cap: closed
    assert holder.connections == 1
    reactor.stop()
    holder.stop()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nno length",
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n",
    b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nx: " + b"y" * (readclient.MAX_HEAD + 10) + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n",       # over MAX_INSTANCE
    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\ncut short",
    b"HTTP/1.1 500 Oops\r\ncontent-length: %d\r\n\r\n" % (readclient.MAX_ERROR_BODY + 1),
    b"garbage\r\n\r\n",
], ids=["chunked", "no-length", "two-lengths", "negative", "http10", "long-head",
        "over-max", "cut-short", "long-error", "garbage"])
def test_a_hostile_answer_fails_its_read_and_nothing_else(tmp_path, certs, answer,
                                                          monkeypatch):
    monkeypatch.setattr(readclient, "MAX_INSTANCE", 1 << 30)
    holder = RawHolder(certs, [answer], close=True)
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    got = outcome(reads.get(member(holder.port), holder.port, "local", "1.2.3", None))
    assert got.check(ResponseFailed, ResponseNeverReceived, IOError), got
    peer = next(iter(reads._peers.values()))
    wait(lambda: peer.lanes == 0 and not peer.queue, "the lane ended")
    assert not reads._socks and list(tmp_path.iterdir()) == []
    reactor.stop()
    holder.stop()


def test_an_error_answer_keeps_the_connection_and_the_next_read_on_it(tmp_path, certs,
                                                                       instance):
    holder = RawHolder(certs, [b"HTTP/1.1 404 Not Found\r\ncontent-length: 18\r\n\r\n"
                               b"unknown instance\r\n", ok(instance),
                               b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"])
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    m = member(holder.port)
    got = [reads.get(m, holder.port, "local", uid, None) for uid in ("1.1", "1.2", "1.3")]
    assert outcome(got[0]).check(fetching.NotHeld)
    f = outcome(got[1])
    assert f.read() == instance and f.sha256 == expected_sha(instance)
    third = outcome(got[2])
    assert third.check(IOError) and not third.check(fetching.NotHeld), third
    assert holder.connections == 1
    reactor.stop()
    holder.stop()


def expected_sha(data: bytes) -> str:
    return readclient.examined(data).sha256


def test_a_kept_connection_the_peer_closed_is_replaced(tmp_path, certs, instance):
    """The holder reads the second request and closes without an answer (as a peer
    restarted, or past its idle time, between the quiet check and the request): the read
    is asked again on a new connection."""
    def close_silently(conn):
        conn.close()
    holder = RawHolder(certs, [ok(instance), close_silently, ok(instance)])
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    m = member(holder.port)
    assert outcome(reads.get(m, holder.port, "local", "1.1", None)).read() == instance
    peer = next(iter(reads._peers.values()))
    wait(lambda: peer.lanes == 0 and peer.idle, "the connection kept")
    second = outcome(reads.get(m, holder.port, "local", "1.1", None))
    assert not isinstance(second, Exception) and getattr(second, "read", None), second
    assert second.read() == instance
    assert holder.connections == 2
    reactor.stop()
    holder.stop()


@pytest.fixture
def stalled(tmp_path, certs, monkeypatch):
    """A read asked of a holder that reads the request and never answers, the request
    sent: (reactor, client, the read's Deferred)."""
    monkeypatch.setattr(readclient, "IDLE", 3600.0)
    holder = RawHolder(certs, [None])
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    d = reads.get(member(holder.port), holder.port, "local", "1.1", None)
    wait(lambda: reads._socks and holder.conns, "the request sent")
    yield reactor, reads, d
    reactor.stop()
    holder.stop()


def test_a_stalled_read_is_cut_by_its_cancel(stalled):
    """The retrieval's stall cancels the read; the connection is shut at once (not after
    IDLE) and the lane ends."""
    reactor, reads, d = stalled
    peer = next(iter(reads._peers.values()))
    wait(lambda: not peer.queue and not reads._buffers, "asked")
    d.cancel()
    assert outcome(d).check(defer.CancelledError)
    wait(lambda: peer.lanes == 0 and not reads._socks, "the lane ended")


def test_stop_cuts_a_lane_blocked_in_a_read(stalled):
    reactor, reads, d = stalled
    reactor.stop()                                      # the reactor's shutdown: stop()
    got = outcome(d)
    assert got.check(ResponseNeverReceived, error.ConnectError), got
    peer = next(iter(reads._peers.values()))
    wait(lambda: peer.lanes == 0, "the lane ended")
    with pytest.raises(error.ConnectError):
        reads.get(member(1), 1, "local", "1.1", None)


def test_a_peer_that_cannot_be_reached_fails_what_is_asked(tmp_path, certs):
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()                                        # nothing listens there now
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    got = [reads.get(member(port), port, "local", f"1.{i}", None) for i in range(5)]
    for d in got:
        assert outcome(d).check(error.ConnectError)
    reactor.stop()


def test_a_holder_with_another_name_is_refused(tmp_path, certs, instance):
    """The certificate must name the peer asked: peer "b"'s port is not "a"'s."""
    holder = RawHolder(certs, [ok(instance)])
    holder.ctx = threadtls.server_context(certs, "b")
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    assert outcome(reads.get(member(holder.port), holder.port, "local", "1.1",
                             None)).check(error.ConnectError)
    reactor.stop()
    holder.stop()


def test_idle_connections_past_their_time_are_closed_by_later_reads(tmp_path, certs,
                                                                    instance, monkeypatch):
    """A peer no longer asked (gone, or on another port since its restart) leaves no
    connection open: the next read of any peer closes the ones idle past KEPT."""
    monkeypatch.setattr(readclient, "KEPT", 0.2)
    first, second = RawHolder(certs, [ok(instance)]), RawHolder(certs, [ok(instance)])
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    assert outcome(reads.get(member(first.port), first.port, "local", "1.1", None)
                   ).read() == instance
    key = ("a", "127.0.0.1", first.port)
    wait(lambda: reads._peers[key].idle, "the connection kept")
    kept = reads._peers[key].idle[0][0]
    threading.Event().wait(1.5)                 # past KEPT, and the once-a-second sweep
    assert outcome(reads.get(member(second.port), second.port, "local", "1.1", None)
                   ).read() == instance
    assert key not in reads._peers and kept.fileno() == -1     # closed here
    reactor.stop()
    first.stop()
    second.stop()


def test_what_arrives_for_a_cancelled_read_is_closed(tmp_path, certs, instance):
    """An answer handed over just after its read was cancelled (the stall timer fired
    meanwhile) is closed, a batch's entries each, and nothing is raised in the reactor."""
    reactor = Reactor()
    reads = client(certs, reactor, tmp_path)
    for result in (readclient.examined(instance),
                   [readclient.examined(instance), fetching.NotHeld("x")]):
        ask = readclient._Ask(b"", "test")
        ask.d = defer.Deferred()
        ask.d.addErrback(lambda f: None)
        ask.d.cancel()
        reads._done(ask, result)
        assert all(f.closed for f in (result if isinstance(result, list) else [result])
                   if hasattr(f, "closed"))
    reactor.stop()
