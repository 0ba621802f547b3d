"""The bulk channel's batch requests on a blocking socket, in a named thread pool.

A batch of small instances (``fetching.BulkClient.fetch_many``: ``POST
/instances/<archive>``, up to 8 MB of frames) read by the reactor's TLS (pyOpenSSL behind
Twisted's memory BIO) and HTTP client costs the reactor thread a cffi call and a copy
per 16 KB record and a Python parse, while it also sends to the C-MOVE destination. Here
ONE job of the ``bulk-fetch`` pool (``pacsp2p.threads``) sends the request, reads the
answer with stdlib ``ssl`` (TLS 1.3, RFC 8446; the GIL released while it reads and
decrypts), its HTTP/1.1 framing (RFC 9112: Content-Length or chunked) with ``_Answer``,
and splits, examines and hashes the frames (the caller's *split*). One instance asked
alone (a CT image) stays on the reactor: with 16 of them in flight, 16 threads taking
the GIL back after every record cost more than the reactor's TLS (docs/benchmarks.md,
issue 15.1, seventh session).

Same mutual TLS as the reactor's client (``fetching._PeerPolicy``): our certificate,
the cluster CA as the only trust root, the peer's certificate must name the peer. Same
bounds: the answer's head at most ``MAX_HEAD`` bytes, a chunk-size line ``MAX_LINE``,
the body at most the caller's cap (IOError past it, the connection closed); an error
answer's body is read only if it is short, else its connection is closed; every read
has ``IDLE`` seconds. A cancelled request shuts its socket down (the blocked read ends
at once). Connections are kept for reuse while quiet, at most ``KEEP`` per peer for
``IDLE_CONNECTION`` seconds, for at most ``MAX_PEERS`` peers.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections import OrderedDict

from twisted.internet import defer, error
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from pacsp2p import threads

MAX_HEAD = 16 << 10           # bytes of an answer's status line and headers
MAX_LINE = 1 << 10            # bytes of a chunk-size line
MAX_ERROR_BODY = 1 << 16      # an error answer's body read (to keep the connection)
IDLE = 60.0                   # seconds any one read or write may wait
CONNECT = 5.0                 # seconds to connect and complete the handshake
KEEP = 8                      # idle connections kept per peer
MAX_PEERS = 64                # peers whose idle connections are kept (LRU)
IDLE_CONNECTION = 30.0        # seconds an idle connection is kept
THREADS = 8                   # batch requests at once (more wait in the pool's queue)


class Cancelled(Exception):
    """The fetch was cancelled while it ran (its Deferred has failed already)."""


class Refused(IOError):
    """The peer answered 405: it does not serve this method there (an older peer)."""


class _Job:
    """One fetch: cancelled from the reactor thread, run in a pool thread."""

    def __init__(self):
        self.cancelled = False
        self.sock = None
        self.lock = threading.Lock()

    def cancel(self):
        with self.lock:
            self.cancelled = True
            sock = self.sock
        if sock is not None:
            try:        # the plain socket's shutdown: wakes up a read blocked in a thread
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def use(self, sock):
        with self.lock:
            if self.cancelled:
                raise Cancelled()
            self.sock = sock


class _Answer:
    """An HTTP/1.1 answer read from *sock*: ``head()``, then the body (``read_into``,
    ``chunks``)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.started = False                 # a byte of the answer has arrived

    def _more(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError("the connection was closed")
        self.started = True
        self.buf += data

    def _line(self, limit: int) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > limit:
                raise ValueError("a line over its bound")
            self._more()

    def head(self) -> tuple[int, dict]:
        """(status, headers: lower-case name -> value); ValueError if malformed."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("an answer head over its bound")
            self._more()
        end = self.buf.index(b"\r\n\r\n")
        if end > MAX_HEAD:
            raise ValueError("an answer head over its bound")
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[:end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version != b"HTTP/1.1" or len(code) != 3 or not code.isdigit():
            raise ValueError("not an HTTP/1.1 status line")
        headers: dict = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            name = name.strip().lower()
            if not colon or not name:
                raise ValueError("a malformed header")
            if name in headers and name in (b"content-length", b"transfer-encoding"):
                raise ValueError("a framing header twice")
            headers[name] = value.strip()
        return int(code), headers

    def chunks(self, length: int | None):
        """The body's pieces: *length* bytes, or chunked (``length`` None)."""
        if length is not None:
            yield from self._pieces(length)
            return
        while True:
            line = self._line(MAX_LINE).split(b";")[0].strip()
            if not line or len(line) > 16 or not all(c in b"0123456789abcdefABCDEF"
                                                     for c in line):
                raise ValueError("a malformed chunk size")
            size = int(line, 16)
            if size == 0:
                while self._line(MAX_HEAD):          # trailers, up to the empty line
                    pass
                return
            yield from self._pieces(size)
            if self._line(MAX_LINE):
                raise ValueError("a chunk not followed by CRLF")

    def _pieces(self, left: int):
        while left:
            if not self.buf:
                self._more()
            piece = bytes(self.buf[:left])
            del self.buf[:len(piece)]
            left -= len(piece)
            yield piece


def _capped(answer, length: int | None, cap: int) -> bytes:
    """Thread: a whole body of at most *cap* bytes (IOError past them: the caller closes
    the connection, an endless answer is not read on)."""
    if length is not None and length > cap:
        raise IOError(f"an answer over {cap} bytes")
    parts, size = [], 0
    for piece in answer.chunks(length):
        size += len(piece)
        if size > cap:
            raise IOError(f"an answer over {cap} bytes")
        parts.append(piece)
    return b"".join(parts)


def _framing(headers: dict) -> tuple[int | None, bool]:
    """(Content-Length or None if chunked, the connection may be kept)."""
    keep = headers.get(b"connection", b"").lower() != b"close"
    te = headers.get(b"transfer-encoding")
    if te is not None:
        if te.lower() != b"chunked" or b"content-length" in headers:
            raise ValueError("an unsupported transfer encoding")
        return None, keep
    cl = headers.get(b"content-length")
    if cl is None or not cl.isdigit() or len(cl) > 15:
        raise ValueError("no usable Content-Length")
    return int(cl), keep


class BlockingGetter:
    """Batch requests to other peers' bulk channels on blocking sockets (see the
    module's docstring); *not_held*: what a 404 raises."""

    def __init__(self, files: dict, reactor, not_held=FileNotFoundError):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # verifies cert and name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(files["ca"]))
        ctx.load_cert_chain(str(files["crt"]), str(files["key"]))
        self.ctx, self.reactor, self.not_held = ctx, reactor, not_held
        self._idle: OrderedDict = OrderedDict()     # peer -> [(sock, since)], LRU
        self._lock = threading.Lock()

    def post(self, member, path: str, body: bytes, cap: int, split):
        """Deferred[``split(answer body)``, in the pool thread] of POST *path* (JSON
        *body*): a batch (``fetching.BulkClient.fetch_many``); its answer at most *cap*
        bytes (IOError past them, the connection closed)."""
        return self._run(member, _post(member, path, body), path,
                         lambda job, answer, length: split(_capped(answer, length, cap)))

    def _run(self, member, request: bytes, path: str, body):
        job = _Job()
        outer = defer.Deferred(lambda _: job.cancel())
        inner = deferToThreadPool(self.reactor, threads.pool(self.reactor, "bulk-fetch",
                                                             1, THREADS),
                                  self._fetch, job, member, request, path, body)

        def done(result):
            if outer.called:                    # cancelled meanwhile: dispose of it
                if isinstance(result, list):
                    for f in result:
                        getattr(f, "close", lambda: None)()
                return None
            (outer.errback if isinstance(result, Failure) else outer.callback)(result)
        inner.addBoth(done)
        return outer

    # -- connections (any thread) ----------------------------------------------------

    def _take(self, member, fresh: bool = False):
        """(a connection to *member*, whether it was kept): a kept one that is still
        quiet (the peer has neither closed it nor sent anything since), else a new one;
        with *fresh*, a new one (every kept one closed: the peer may have restarted)."""
        key = (member.name, member.host, member.bulk_port)
        now = time.monotonic()
        with self._lock:
            kept = self._idle.get(key, [])
            while kept:
                sock, since = kept.pop()
                if not fresh and now - since < IDLE_CONNECTION and _quiet(sock):
                    return sock, True
                _close(sock)
        sock = socket.create_connection((member.host, member.bulk_port), timeout=CONNECT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ctx.wrap_socket(sock, server_hostname=member.name)
        except BaseException:
            sock.close()
            raise
        return tls, False

    def _give(self, member, sock) -> None:
        key = (member.name, member.host, member.bulk_port)
        with self._lock:
            kept = self._idle.pop(key, [])
            self._idle[key] = kept
            if len(kept) < KEEP:
                kept.append((sock, time.monotonic()))
                sock = None
            while len(self._idle) > MAX_PEERS:
                for old, _ in self._idle.popitem(last=False)[1]:
                    _close(old)
        if sock is not None:
            _close(sock)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, OrderedDict()
        for kept in idle.values():
            for sock, _ in kept:
                _close(sock)

    # -- one fetch (a pool thread) ---------------------------------------------------

    def _fetch(self, job, member, request: bytes, path: str, body):
        """Thread: send *request*, read the answer's head; a 200's body is *body(job,
        answer, length)*'s to read, an error's is dropped (``_error``)."""
        method = request.split(b" ", 1)[0].decode()
        for attempt in (0, 1):
            if job.cancelled:
                raise Cancelled()
            try:
                sock, reused = self._take(member, fresh=attempt > 0)
            except OSError as e:                # (ssl.SSLError: a refused handshake)
                raise error.ConnectError(string=f"{member.name}: {e}") from None
            answer = _Answer(sock)
            try:
                job.use(sock)
                sock.settimeout(IDLE)
                sock.sendall(request)
                code, headers = answer.head()
                length, keep = _framing(headers)
            except BaseException as e:
                _close(sock)
                if job.cancelled or isinstance(e, Cancelled):
                    raise Cancelled() from None
                if reused and not answer.started and attempt == 0:
                    continue                # a kept connection the peer had closed
                if not isinstance(e, (OSError, EOFError, ValueError)):
                    raise
                raise (ResponseFailed if answer.started else ResponseNeverReceived)(
                    [Failure(e)]) from None
            refused = None
            try:
                if code != 200:
                    keep = self._error(answer, length, keep)
                    refused = (self.not_held if code == 404 else Refused if code == 405
                               else IOError)(f"{member.name}: {method} {path} answered {code}")
                else:
                    result = body(job, answer, length)
                    keep = keep and not answer.buf  # (bytes past the answer: not ours)
            except BaseException as e:
                keep = False
                if job.cancelled:
                    raise Cancelled() from None
                if isinstance(e, (EOFError, ValueError, ssl.SSLError, TimeoutError,
                                  ConnectionError)):
                    raise ResponseFailed([Failure(e)]) from None
                raise
            finally:
                if keep and not job.cancelled:
                    self._give(member, sock)
                else:
                    _close(sock)
            if refused is not None:
                raise refused
            return result

    @staticmethod
    def _error(answer, length, keep: bool) -> bool:
        """An error answer's body dropped if short (the connection kept), else not read
        (an endless one: the connection closed). Whether it may be kept."""
        if length is None or length > MAX_ERROR_BODY:
            return False
        try:
            for _ in answer.chunks(length):
                pass
        except (OSError, EOFError, ValueError):
            return False
        return keep

def _post(member, path: str, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path.encode("ascii"),
                                             member.host.encode("ascii"),
                                             member.bulk_port, len(body))) + body


def _quiet(sock) -> bool:
    """A kept connection has nothing to read: neither the peer's close (EOF, reset, a
    close_notify) nor anything else an idle HTTP connection should not hold."""
    if sock.pending():
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass
