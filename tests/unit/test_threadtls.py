"""The thread-served mutual-TLS port (``overlay.threadtls``) keeps the Twisted ports'
guarantees: only a certificate of the cluster CA (valid now) gets an answer; a connection
that does not complete its handshake is dropped after the handshake timeout, and the
oldest pending one is closed to make room; a request's head and body are bounded; a
connection accepted while every thread serves another gets one (the longest idle is
closed). Real sockets, real TLS; the handler answers without the reactor.
"""
from __future__ import annotations

import datetime
import socket
import ssl
import time

import pytest
from twisted.internet.task import Clock

from pacsp2p.overlay import threadtls, tls

PATIENCE = 60.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("threadtls")
    tls.init_ca(root / "tls")
    for name in ("a", "b"):
        tls.issue(root / "tls", name)
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    tls.issue(root / "tls", "old", days=2, not_before=long_ago, out=root / "old")
    tls.init_ca(root / "other")
    tls.issue(root / "other", "b")
    tls.init_ca(root / "dicom", tls.DICOM_CA)
    tls.issue(root / "dicom", "b", kind="server")
    return root


def echo(request):
    return 200, b"text/plain", [b"%s %s " % (request.method, request.target),
                                request.peer.encode(), b" ", request.body]


@pytest.fixture
def server(certs):
    made = []

    def make(**kw):
        s = threadtls.ThreadServer(Clock(), threadtls.server_context(certs / "tls", "a"),
                                   kw.pop("handler", echo), "test port", **kw)
        made.append(s.listen(0, "127.0.0.1"))
        return s
    yield make
    for s in made:
        s.stopListening()


def connect(certs, port, who="tls/b", timeout=PATIENCE):
    ctx = ssl.create_default_context(cafile=str(certs / "tls" / "ca.crt"))
    ctx.check_hostname = False
    if who is not None:
        ctx.load_cert_chain(certs / f"{who}.crt", certs / f"{who}.key")
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="a")


def answer(s) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        got = s.recv(4096)
        if not got:
            raise ConnectionError("closed")
        data += got
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split(b" ")[1]), body


def test_a_cluster_peer_is_served_many_requests_on_one_connection(certs, server):
    port = server().port
    with connect(certs, port) as s:
        for i in range(3):
            s.sendall(b"POST /x/%d HTTP/1.1\r\ncontent-length: 4\r\n\r\nbody" % i)
            assert answer(s) == (200, b"POST /x/%d b body" % i)


def test_only_a_valid_certificate_of_the_cluster_ca_is_answered(certs, server):
    port = server().port
    for who in (None, "other/b", "dicom/b", "old/old"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with connect(certs, port, who) as s:      # (TLS 1.3: refused at the 1st read)
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                answer(s)


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(certs, server):
    srv = server(handshake_timeout=1.0)
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=PATIENCE)
    t0 = time.monotonic()
    assert silent.recv(1) == b""                        # closed by the server
    assert time.monotonic() - t0 < PATIENCE
    deadline = time.monotonic() + PATIENCE
    while srv.guard.expired < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.guard.expired == 1 and srv.guard.pending == 0


def test_the_oldest_pending_connection_makes_room(certs, server):
    srv = server(max_pending=4, max_connections=2)
    silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=PATIENCE)
              for _ in range(6)]
    assert silent[0].recv(1) == b"" and silent[1].recv(1) == b""    # the two oldest
    deadline = time.monotonic() + PATIENCE
    while (srv.guard.evicted, srv.guard.pending) != (2, 4) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (srv.guard.evicted, srv.guard.pending) == (2, 4)
    for s in silent:
        s.close()


def test_a_request_past_its_bounds_is_refused_with_a_short_answer(certs, server):
    port = server(max_body=100).port
    cases = [(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 431),
             (b"POST /x HTTP/1.1\r\ncontent-length: 101\r\n\r\n" + b"x" * 101, 413),
             (b"POST /x HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (1 << 30), 413),
             (b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", 501),
             (b"POST /x HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 400),
             (b"GET x HTTP/1.1\r\n\r\n", 400),
             (b"GET / HTTP/2\r\n\r\n", 400)]
    for request, code in cases:
        with connect(certs, port) as s:
            s.sendall(request)
            got, body = answer(s)
            assert got == code and len(body) < 64
            assert s.recv(1) == b""                     # and closed


def test_a_connection_waiting_for_a_thread_closes_the_longest_idle_one(certs, server):
    port = server(max_connections=2).port
    kept = []
    for _ in range(2):                                  # the first idle the longest
        kept.append(connect(certs, port))
        kept[-1].sendall(b"GET /kept HTTP/1.1\r\n\r\n")
        assert answer(kept[-1])[0] == 200               # idle in its thread now
    with connect(certs, port) as s:
        s.sendall(b"GET /new HTTP/1.1\r\n\r\n")
        assert answer(s)[0] == 200
    assert kept[0].recv(1) == b""                       # the longest idle made room
    kept[1].sendall(b"GET /again HTTP/1.1\r\n\r\n")
    assert answer(kept[1])[0] == 200
    for s in kept:
        s.close()


def test_a_failing_handler_answers_500_without_its_message(certs, server):
    def broken(request):
        raise RuntimeError("/secret/path")
    port = server(handler=broken).port
    with connect(certs, port) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert answer(s) == (500, b"internal error\n")
