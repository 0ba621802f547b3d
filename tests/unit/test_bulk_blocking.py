"""The bulk channel's batch requests on a blocking socket (``pacsp2p.overlay.blocking``)
keep the channel's mutual TLS and read HTTP/1.1 framing as hostile input.

A request (a pool thread's job) is made here directly, in the test's thread, against a
real TLS server in a thread (stdlib ``ssl``) that answers as told: a holder presenting a
certificate of another cluster CA, or one of ours for another peer's name, is refused
before any request is sent; a chunked answer in odd pieces gives the exact bytes; an
answer over its cap fails with IOError; malformed framing fails it as a broken answer;
a kept connection is reused for the next request.
"""
from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import error
from twisted.web.client import ResponseFailed

from pacsp2p.overlay import blocking, fetching, tls
from pacsp2p.testing import datasets

PATIENCE = 60.0


class Holder:
    """Serves connections as *name* with the certificate in *cert_dir*; each request is
    answered by *answer(request) -> bytes*, the connection closed after it if *once*."""

    def __init__(self, cert_dir: Path, name: str, ca: Path, answer, once: bool = False):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_dir / f"{name}.crt", cert_dir / f"{name}.key")
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx, self.answer, self.once = ctx, answer, once
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(PATIENCE)
        self.port = self.sock.getsockname()[1]
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
        raw.settimeout(PATIENCE)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                while True:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        got = s.recv(4096)
                        if not got:
                            return
                        request += got
                    self.requests.append(request)
                    s.sendall(self.answer(request))
                    if self.once:
                        return
        except OSError:
            return

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocking")
    tls.init_ca(root / "tls")
    for name in ("a", "b", "c"):
        tls.issue(root / "tls", name)
    tls.init_ca(root / "other")
    tls.issue(root / "other", "a")                   # peer a's name, another cluster
    return root


CAP = 200_000


def getter(certs: Path):
    return blocking.BlockingGetter(tls.Credentials(certs / "tls", "b").files, None,
                                   fetching.NotHeld)


def fetch(g, port: int, name: str = "a") -> bytes:
    """The answer's body to a batch request, at most CAP bytes."""
    member = SimpleNamespace(name=name, host="127.0.0.1", bulk_port=port)
    path = "/instances/local"
    return g._fetch(blocking._Job(), member, blocking._post(member, path, b"[]"), path,
                    lambda job, answer, length: blocking._capped(answer, length, CAP))


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


@pytest.mark.parametrize("cert_dir, name", [("other", "a"), ("tls", "c")])
def test_a_holder_without_the_right_certificate_is_refused_before_any_request(
        certs, tmp_path, cert_dir, name):
    holder = Holder(certs / cert_dir, name, certs / "tls" / "ca.crt", lambda r: ok(b"x"))
    try:
        g = getter(certs)
        with pytest.raises(error.ConnectError):
            fetch(g, holder.port, "a")
        assert holder.requests == []
    finally:
        holder.close()


def test_a_chunked_answer_gives_the_exact_bytes(certs, tmp_path):
    path = datasets.write(datasets.make_image("CT", size=64, seed=3,
                                              SOPInstanceUID=datasets.uid("blk", 1)),
                          tmp_path / "one.dcm")
    data = path.read_bytes()
    pieces, pos = [], 0
    while pos < len(data):                          # odd sizes: 1000 to 1006 bytes
        pieces.append(data[pos:pos + 1000 + len(pieces) % 7])
        pos += len(pieces[-1])
    chunked = b"".join(b"%x;x=y\r\n%s\r\n" % (len(p), p) for p in pieces)
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked +
              b"0\r\nTrailer: z\r\n\r\n")
    holder = Holder(certs / "tls", "a", certs / "tls" / "ca.crt", lambda r: answer)
    try:
        g = getter(certs)
        assert fetch(g, holder.port) == data
        assert fetch(g, holder.port) == data        # on the same connection, kept
        assert holder.connections == 1 and len(holder.requests) == 2
        assert holder.requests[0].startswith(b"POST /instances/local HTTP/1.1\r\n")
    finally:
        holder.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\n\r\nhello",                             # no framing
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * (blocking.MAX_HEAD + 10) + b"\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nhello",      # then closed: short
])
def test_malformed_framing_fails_the_fetch_as_a_broken_answer(certs, tmp_path, answer):
    holder = Holder(certs / "tls", "a", certs / "tls" / "ca.crt", lambda r: answer,
                    once=True)
    try:
        g = getter(certs)
        with pytest.raises(ResponseFailed):
            fetch(g, holder.port)
    finally:
        holder.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (CAP + 1),
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" +
    b"%x\r\n%s\r\n" % (65536, b"\0" * 65536) * 4,
])
def test_an_answer_over_its_cap_fails_and_its_connection_is_closed(certs, answer):
    holder = Holder(certs / "tls", "a", certs / "tls" / "ca.crt", lambda r: answer)
    try:
        g = getter(certs)
        with pytest.raises(OSError, match="an answer over"):
            fetch(g, holder.port)
        assert not g._idle.get(("a", "127.0.0.1", holder.port))     # not kept
    finally:
        holder.close()
