"""A mutual-TLS port served by stdlib ``ssl`` sockets in a named thread pool.

For bulk transfers between peers where Twisted's TLS (pyOpenSSL over memory BIOs, one
16 KB record per Python call, a reactor turn per 128 KB) costs twice what the bytes do:
here each connection is served by a thread of the server's pool (a thread per connection,
HTTP/1.1 keep-alive, thread-per-connection server as in Stevens, UNP vol. 1 §30.10), and
an answer is written by ONE ``SSLSocket.sendall``: OpenSSL encrypts and writes every
record in C with the GIL released. The contexts are the overlay's mutual TLS (``tls``):
our certificate, only certificates of the cluster CA accepted, TLS 1.2 at least.

What the Twisted ports guarantee, this one does too: a connection must complete its
handshake within *handshake_timeout* seconds of its accept, and at most ``MAX_PENDING``
(``MAX_PENDING_PER_ADDRESS`` of one address) have not: the oldest pending one is closed
to make room (``tls.HandshakeGuard``, whose counters ``Overlay.status`` shows). At most
*max_connections* are served at once (one thread each); a connection accepted while all
are taken waits for one (counted as pending), and the one idle longest (waiting for its
next request) is closed to make room. A request's head is read to ``MAX_HEAD`` bytes, its
body (``content-length`` only) to *max_body* (one larger: 413, read and dropped if at most
``DRAIN`` bytes past, else refused on its head), within ``REQUEST_TIMEOUT`` seconds of its
first byte; a connection idle ``IDLE_TIMEOUT`` seconds is closed; an answer that makes no
progress for ``SEND_TIMEOUT`` seconds is cut. Error answers are fixed short texts.

The *handler* runs in the connection's thread: ``handler(Request) -> (code, content type,
body)``, body bytes, a list of bytes or an open binary file (read and sent in ``CHUNK``
pieces; closed here). It must not touch reactor state except through ``on_reactor``.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from pathlib import Path

from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p import threads
from pacsp2p.overlay.tls import HANDSHAKE_TIMEOUT, MAX_PENDING, HandshakeGuard
from pacsp2p.validate import shown

log = Logger()

MAX_CONNECTIONS = 32          # connections served at once (a thread each)
MAX_HEAD = 8 << 10            # bytes of a request line and its headers
MAX_HEADERS = 64
IDLE_TIMEOUT = 60.0           # seconds a kept connection may wait for its next request
REQUEST_TIMEOUT = 30.0        # seconds for a request, from its first byte to its last
SEND_TIMEOUT = 60.0           # seconds an answer's write may make no progress
CHUNK = 1 << 20               # bytes of a file read and sent at a time
OUT = 256 << 10               # bytes gathered before a write (an answer's head and first
                              # part, a batch's frames: one TLS write, no fresh memory)
RECV = 64 << 10
DRAIN = 64 << 10              # bytes of a body past its bound read before the 413 answer
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           408: b"Request Timeout", 411: b"Length Required", 413: b"Content Too Large",
           431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
           501: b"Not Implemented", 503: b"Service Unavailable"}


Stopped = threads.Stopped    # the server stopped while a handler waited for the reactor


def server_context(tls_dir, name: str) -> ssl.SSLContext:
    """The server side of the overlay's mutual TLS, from the files ``tls.Credentials``
    reads: present *name*'s certificate, require one signed by the cluster CA."""
    tls_dir = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
    ctx.load_verify_locations(tls_dir / "ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls_dir, name: str) -> ssl.SSLContext:
    """The client side: present *name*'s certificate, accept only a peer certificate of
    the cluster CA for the name asked (``wrap_socket(..., server_hostname=peer)``)."""
    tls_dir = Path(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)        # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls_dir / f"{name}.crt", tls_dir / f"{name}.key")
    ctx.load_verify_locations(tls_dir / "ca.crt")
    return ctx


def peer_name(sock: ssl.SSLSocket) -> str | None:
    """The common name of the verified certificate on the other end of *sock*."""
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class Request:
    """One request as read (``target``: the raw request target, bytes)."""

    __slots__ = ("method", "target", "headers", "body", "peer", "host")

    def __init__(self, method, target, headers, body, peer, host):
        self.method, self.target, self.headers = method, target, headers
        self.body, self.peer, self.host = body, peer, host


class _Bad(Exception):
    def __init__(self, code: int, text: bytes):
        super().__init__(code)
        self.code, self.text = code, text


class _Conn:
    """One accepted connection; ``transport`` is itself, for ``HandshakeGuard``."""

    def __init__(self, sock: socket.socket, host: str, server: "ThreadServer"):
        self.sock, self.host, self.tls, self.server = sock, host, None, server
        self.accepted = time.monotonic()
        self.transport = self
        self.aborted = False

    def abortConnection(self):                          # noqa: N802 (Twisted's name)
        """Wake and end whatever its thread does with it (any thread may call this):
        the socket's own ``shutdown``, not ``SSLSocket.shutdown``, which unwraps the
        TLS layer under a thread that may be writing. One still waiting for a thread
        is closed and forgotten at once (a flood leaves no queue behind). Called with
        the server's lock held."""
        self.aborted = True
        if self.server._queued.pop(self, 1) is None:
            self.server._live.discard(self)
            self.sock.close()
            return
        try:
            socket.socket.shutdown(self.tls or self.sock, socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass


class ThreadServer:
    """A listening mutual-TLS port whose connections are served in a thread pool."""

    def __init__(self, reactor, context: ssl.SSLContext, handler, what: str,
                 name: str = "bulk-serve", max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_pending: int = MAX_PENDING,
                 max_body: int = 16 << 10, idle_timeout: float = IDLE_TIMEOUT):
        self.reactor, self.context, self.handler, self.what = reactor, context, handler, what
        self.guard = HandshakeGuard(reactor, what, handshake_timeout, max_pending)
        self.max_connections, self.max_body = max_connections, max_body
        self.idle_timeout = idle_timeout
        self.pool = ThreadPool(0, max_connections, name)
        self._acceptor = ThreadPool(0, 1, f"{name}-accept")
        self._lock = threading.Lock()
        self._queued: dict = {}         # _Conn -> None: accepted, waiting for a thread
        self._idle: dict = {}           # _Conn -> None: waiting for a request, oldest first
        self._live: set = set()
        self.waits = threads.ReactorWaits(reactor)      # handlers waiting for the reactor
        self.running = 0                # threads serving connections
        self.stopping = False
        self.socket = None
        self.refused = 0                # handshakes that failed (certificate, not TLS)
        self.requests = 0               # requests answered

    # -- life cycle ------------------------------------------------------------------
    def listen(self, port: int, interface: str = "") -> "ThreadServer":
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        self.socket = socket.create_server((interface, port), family=family, backlog=128)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.socket.getsockname()[1]
        self.pool.start()
        self._acceptor.start()
        self._acceptor.callInThread(self._accept_loop)
        return self

    def stopListening(self):                            # noqa: N802 (as a Twisted port)
        """Close the port and every connection; wait for the threads (they end at once:
        their sockets are shut down, handlers waiting for the reactor are released)."""
        with self._lock:
            if self.stopping:
                return
            self.stopping = True
            live = list(self._live)
        if self.socket is not None:
            try:
                self.socket.shutdown(socket.SHUT_RDWR)      # wakes accept() (Linux)
            except OSError:
                pass
            self.socket.close()
        with self._lock:
            for conn in live:
                conn.abortConnection()
        self.waits.stop()
        self._acceptor.stop()
        self.pool.stop()

    # -- accepting -------------------------------------------------------------------
    def _accept_loop(self):
        while not self.stopping:
            try:
                sock, address = self.socket.accept()
            except OSError as e:
                if self.stopping:
                    return
                log.warn("{what}: accept failed: {err}", what=self.what, err=e)
                time.sleep(0.1)             # (out of descriptors: let some close)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._accepted(_Conn(sock, address[0], self))

    def _accepted(self, conn: _Conn):
        with self._lock:
            if self.stopping:
                conn.sock.close()
                return
            self.guard.make_room(conn.host)
            self.guard.add(conn, conn.host)
            self._live.add(conn)
            self._queued[conn] = None
            start = self.running < self.max_connections
            if start:
                self.running += 1
            elif self._idle:                # every thread taken: the longest idle goes
                oldest = next(iter(self._idle))
                del self._idle[oldest]
                oldest.abortConnection()
        if start:
            self.pool.callInThread(self._work)

    def _work(self):
        """A thread: serve queued connections, one at a time, until none waits."""
        while True:
            with self._lock:
                conn = next(iter(self._queued), None)
                if conn is None or self.stopping:
                    self.running -= 1
                    return
                del self._queued[conn]
            try:
                self._serve(conn)
            except Exception as e:                      # never lose the thread's count
                log.warn("{what}: serving a connection failed: {err}", what=self.what,
                         err=shown(repr(e), 200))
            finally:
                with self._lock:
                    self._live.discard(conn)
                    self.guard.forget(conn)
                    self._idle.pop(conn, None)
                (conn.tls or conn.sock).close()

    # -- one connection --------------------------------------------------------------
    def _serve(self, conn: _Conn):
        if not self._handshake(conn):
            return
        peer = peer_name(conn.tls)
        buf = bytearray()
        out = _Writer(conn.tls)
        while not self.stopping:
            try:
                request, keep = self._read(conn, buf, peer)
            except _Bad as bad:
                self._answer(conn, out, (bad.code, b"text/plain", bad.text), False)
                return
            except (OSError, ValueError):       # closed, reset, timed out, TLS error
                return
            if request is None:
                return
            try:
                answer = self.handler(request)
            except Stopped:
                return
            except Exception as e:
                log.warn("{what}: {method} failed: {err}", what=self.what,
                         method=shown(request.method.decode("ascii", "replace"), 16),
                         err=shown(repr(e), 200))
                answer = (500, b"text/plain", b"internal error\n")
            self.requests += 1                  # (a lost count under a race: a statistic)
            if not self._answer(conn, out, answer, keep) or not keep:
                return

    def _handshake(self, conn: _Conn) -> bool:
        try:
            left = conn.accepted + self.guard.timeout - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.sock.settimeout(left)
            with self._lock:                    # (closed to make room: not wrapped)
                if conn.aborted or self.stopping:
                    return False
                conn.tls = self.context.wrap_socket(conn.sock, server_side=True,
                                                    do_handshake_on_connect=False)
            conn.tls.do_handshake()
            return True
        except TimeoutError:
            with self._lock:
                if conn in self.guard.waiting:          # (not closed to make room)
                    self.guard.timed_out()
            return False
        except (OSError, ValueError) as e:              # ssl.SSLError is an OSError
            self.refused += 1
            log.debug("{what}: handshake from {host} failed: {err}", what=self.what,
                      host=conn.host, err=shown(str(e), 200))
            return False
        finally:
            with self._lock:
                self.guard.forget(conn)

    def _read(self, conn: _Conn, buf: bytearray, peer):
        """The next request on *conn* (None: closed between requests) and whether the
        connection is kept after its answer; ``_Bad`` for one refused."""
        tls = conn.tls
        if not buf:                             # idle: waiting for the next request
            with self._lock:
                if self.stopping:
                    return None, False
                self._idle[conn] = None
            try:
                tls.settimeout(self.idle_timeout)
                got = tls.recv(RECV)
            except TimeoutError:
                return None, False
            finally:
                with self._lock:
                    self._idle.pop(conn, None)
            if not got:
                return None, False
            buf += got
        deadline = time.monotonic() + REQUEST_TIMEOUT
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise _Bad(431, b"request head too large\n")
            _recv(tls, buf, deadline)
            end = buf.find(b"\r\n\r\n")
        if end > MAX_HEAD:
            raise _Bad(431, b"request head too large\n")
        head = bytes(buf[:end])
        del buf[:end + 4]
        method, target, version, headers = _parse(head)
        if b"transfer-encoding" in headers:
            raise _Bad(501, b"only content-length bodies\n")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or len(length) > 19:
            raise _Bad(400, b"bad request\n")
        length = int(length)
        if length > self.max_body:
            if length - len(buf) <= DRAIN:      # a little past: read (and dropped), so that
                while len(buf) < length:        # the asker, still sending, reads the answer
                    _recv(tls, buf, deadline)   # instead of a reset
            raise _Bad(413, b"request too large\n")
        while len(buf) < length:
            _recv(tls, buf, deadline)
        body = bytes(buf[:length])
        del buf[:length]
        keep = version == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
        return Request(method, target, headers, body, peer, conn.host), keep

    def _answer(self, conn: _Conn, out: "_Writer", answer, keep: bool) -> bool:
        """Send *answer*; False if the connection broke."""
        code, ctype, body = answer
        f = None
        if hasattr(body, "read"):
            f, body = body, None
        try:
            if f is not None:
                length = _size(f)
            else:
                parts = body if isinstance(body, list) else [body]
                length = sum(len(p) for p in parts)
            conn.tls.settimeout(SEND_TIMEOUT)
            out.write(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
                      % (code, REASONS.get(code, b"Error"), ctype, length,
                         b"" if keep else b"connection: close\r\n"))
            if f is not None:
                left = length
                while left > 0:
                    data = f.read(min(CHUNK, left))
                    if not data:
                        raise OSError("the file ended early")
                    out.write(data)
                    left -= len(data)
            else:
                for part in parts:
                    out.write(part)
            out.flush()
            return True
        except (OSError, ValueError):
            return False
        finally:
            if f is not None:
                f.close()

    # -- handlers' access to the reactor ----------------------------------------------
    def on_reactor(self, fn, *args):
        """In a handler's thread: ``fn(*args)`` run in the reactor thread, its result (a
        Deferred's, waited for) returned or its exception raised; ``Stopped`` if the
        server stops meanwhile (a thread never waits on a reactor that has stopped)."""
        return self.waits.call(fn, *args)

    def status(self) -> dict:
        with self._lock:
            return {"port": self.port, "serving": self.running,
                    "waiting": len(self._queued), "idle": len(self._idle),
                    "refused": self.refused, "requests": self.requests}


def _size(f) -> int:
    """Bytes of an open file from its start (a file on disk, or one in memory)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (OSError, ValueError):               # (io.UnsupportedOperation: in memory)
        end = f.seek(0, 2)
        f.seek(0)
        return end


def _recv(tls, buf: bytearray, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Bad(408, b"request timeout\n")
    tls.settimeout(left)
    try:
        got = tls.recv(RECV)
    except TimeoutError:
        raise _Bad(408, b"request timeout\n") from None
    if not got:
        raise ConnectionError("closed in a request")
    buf += got


def _parse(head: bytes):
    """(method, target, version, {lower-case name: value}) of a request head; ``_Bad``."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or \
            not parts[0].isalpha() or not parts[1].startswith(b"/") or \
            len(lines) > MAX_HEADERS + 1:
        raise _Bad(400, b"bad request\n")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        name = name.strip().lower()
        if not colon or not name or name in headers and name == b"content-length":
            raise _Bad(400, b"bad request\n")
        headers[name] = value.strip()
    return parts[0], parts[1], parts[2], headers


class _Writer:
    """Writes to a TLS socket gathered in one reused buffer of ``OUT`` bytes; a piece
    that does not fit goes after what is gathered, sent as it is if it is larger than
    the buffer (one ``sendall``: encrypted and written in C, never copied here: a CT
    image's 512 KB after its answer's head)."""

    def __init__(self, tls):
        self.tls, self.buf, self.used = tls, bytearray(OUT), 0

    def write(self, data) -> None:
        n = len(data)
        if self.used + n > OUT:
            self.flush()
            if n >= OUT:
                self.tls.sendall(data)
                return
        self.buf[self.used:self.used + n] = data
        self.used += n

    def flush(self) -> None:
        if self.used:
            with memoryview(self.buf) as view:
                self.tls.sendall(view[:self.used])
            self.used = 0
