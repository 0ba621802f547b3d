"""Instance reads from other peers' read ports on blocking stdlib-``ssl`` sockets, pipelined.

An instance asked alone (``fetching.BulkClient.fetch``: a CT image), or a batch of small
ones (``fetch_many``: ``post``, the answer split by the caller's function), received by the
reactor's TLS (pyOpenSSL over memory BIOs, a Python call per 16 KB record) and HTTP
client cost the asker's reactor about half of its busy time in a relayed C-MOVE, the
same reactor that sends to the destination. Here the reads of one peer go in *lanes*:
at most ``LANES`` connections to it, each served by a job of the ``bulk-read`` pool
(``pacsp2p.threads``) that pipelines up to ``DEPTH`` requests (HTTP/1.1 pipelining, RFC
9112 §9.3.2: the answers come in the order asked; the read port, ``threadtls``, reads
them one after the other), reads each answer's body with stdlib ``ssl`` into a buffer
reused by the lane (OpenSSL decrypts in C, the GIL released), and examines and hashes it
in the same thread (``examined``: hashlib gives the GIL up on large buffers): the
reactor sees one call per instance, with the hash to check (``transfer.verify``).

Same mutual TLS as the reactor's client: our certificate, the cluster CA the only trust
root, the peer's certificate must name the peer (``threadtls.client_context``). Every
answer is hostile: its head at most ``MAX_HEAD`` bytes, a ``content-length`` required (no
other framing) and at most ``MAX_INSTANCE`` (a batch's: the caller's cap; frames that are
not the ones asked fail that batch alone); a body up to ``MEMORY`` bytes is kept in
memory, a larger one written to a temporary file as it comes; an error answer's
body is dropped if short, else the connection closed; each read waits ``IDLE`` seconds
at most. A kept connection is reused only while quiet (a peer restarted meanwhile has
closed it); one that fails before its first answer byte is retried once on a new one.
A cancelled read (the retrieval's stall) shuts its connection down; the lane's other
requests are asked again on a new connection (once). ``stop`` cuts every connection.
"""

from __future__ import annotations

import hashlib
import io
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import deque
from urllib.parse import quote

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from pacsp2p import threads
from pacsp2p.dicom import header, part10

LANES = 2                     # connections to one peer at once (a lane job each)
DEPTH = 4                     # requests asked on one connection before their answers
THREADS = 16                  # lane jobs at once, all peers together
MEMORY = 1 << 20              # a body up to this size is kept in memory
MAX_INSTANCE = 4 << 30        # bytes of one answer's body (the facade's max_dataset)
MAX_HEAD = 8 << 10            # bytes of an answer's status line and headers
MAX_ERROR_BODY = 1 << 16      # an error answer's body read (to keep the connection)
RECV = 64 << 10               # bytes asked of the socket for a head
CHUNK = 1 << 20               # bytes of a large body read before they are written
IDLE = 60.0                   # seconds any one read or write may wait
CONNECT = 5.0                 # seconds to connect and complete the handshake
KEEP = LANES                  # idle connections kept per peer ...
KEPT = 25.0                   # ... for this many seconds (the read port: 60 s idle)
MAX_PEERS = 64                # peers whose idle connections are kept (LRU)
TRIES = 2                     # times a request is sent (a connection lost under it)


def examined(data: bytes):
    """Thread: one instance's bytes as a fetch hands them over: a ``Part10Bytes`` (the
    File Meta walked once, the data set hashed: ``part10.examine``), else a BytesIO with
    no hash. ``sha256``, ``data_size`` and ``size`` set."""
    try:
        offset, ts, uid, sha = part10.examine(data)
    except (part10.BadFile, header.BadDataset, ValueError, struct.error):
        f, f.sha256, f.data_size = io.BytesIO(data), "", 0
    else:
        f = part10.Part10Bytes(data, offset, ts, uid)
        f.sha256, f.data_size = sha, len(data) - offset
    f.size = len(data)
    return f


class _Lost(Exception):
    """The connection broke under a request (*started*: part of its answer had come)."""

    def __init__(self, why: BaseException, started: bool, closed: bool = False):
        super().__init__(str(why))
        self.why, self.started, self.closed = why, started, closed


class _Ask:
    """One read: its request bytes, its Deferred (fired in the reactor), its tries; a
    batch's *split* (its answer's whole body to the result) and *cap* (bytes)."""

    __slots__ = ("request", "what", "d", "cancelled", "tries", "sock", "split", "cap")

    def __init__(self, request: bytes, what: str, split=None, cap: int | None = None):
        self.request, self.what, self.split, self.cap = request, what, split, cap
        self.d, self.cancelled, self.tries, self.sock = None, False, 0, None


class _Peer:
    """A peer's queue of reads, its lanes running and its idle connections."""

    def __init__(self, key):
        self.key = key                   # (name, host, port)
        self.queue: deque = deque()
        self.lanes = 0
        self.idle: list = []             # [(sock, since)]


class ReadClient:
    """Single instances and batches read from other peers' read ports (see the
    module's docstring). *context*: ``threadtls.client_context``; *tmpdir*: where a body over
    ``MEMORY`` bytes is written; *not_held*: what a 404 raises."""

    def __init__(self, context: ssl.SSLContext, reactor, tmpdir,
                 not_held=FileNotFoundError):
        self.context, self.reactor, self.tmpdir = context, reactor, str(tmpdir)
        self.not_held = not_held
        self._peers: dict = {}           # key -> _Peer, LRU order
        self._lock = threading.Lock()
        self._socks: set = set()         # connections in use (``stop`` cuts them)
        self._buffers: list = []         # lanes' body buffers, reused
        self._swept = 0.0                # when idle connections were last looked over
        self.stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    def get(self, member, port: int, archive: str, uid: str, sha256: str | None):
        """Deferred[``Part10Bytes`` or temporary file, ``sha256`` set as ``examined``
        sets it] of GET /instances/<archive>/<uid> on *member*'s read *port*."""
        path = f"/instances/{quote(archive)}/{quote(uid)}" + (
            f"?sha256={sha256}" if sha256 else "")
        request = f"GET {path} HTTP/1.1\r\nHost: {member.name}\r\n\r\n".encode("ascii")
        return self._ask(member, port, _Ask(request, f"{member.name}: GET {path}"))

    def post(self, member, port: int, archive: str, body: bytes, cap: int, split):
        """Deferred[``split(the answer's body)``, run in the lane] of the batch POST
        /instances/<archive> (JSON *body*) on *member*'s read *port*; an answer over
        *cap* bytes closes the connection (``ResponseFailed``)."""
        path = f"/instances/{quote(archive)}"
        request = (f"POST {path} HTTP/1.1\r\nHost: {member.name}\r\ncontent-type: "
                   f"application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                   ).encode("ascii") + body
        return self._ask(member, port, _Ask(request, f"{member.name}: POST {path}",
                                            split, cap))

    def _ask(self, member, port: int, ask: _Ask):
        ask.d = defer.Deferred(lambda _: self._cancel(ask))
        key = (member.name, member.host, port)
        with self._lock:
            if self.stopping:
                raise error.ConnectError(string="stopping")
            peer = self._peers.pop(key, None) or _Peer(key)
            self._peers[key] = peer
            peer.queue.append(ask)
            start = peer.lanes < LANES and (peer.lanes == 0 or
                                            len(peer.queue) > DEPTH * peer.lanes)
            if start:
                peer.lanes += 1
            self._trim()
        if start:
            threads.pool(self.reactor, "bulk-read", 1, THREADS).callInThread(
                self._lane, peer)
        return ask.d

    def _trim(self) -> None:
        """(lock held) Idle connections of at most MAX_PEERS peers kept, and at most a
        second past KEPT (looked over once a second: a peer gone, or on another port
        since its restart, leaves none open)."""
        now = time.monotonic()
        while len(self._peers) > MAX_PEERS:
            old = next((k for k, p in self._peers.items() if not p.lanes and not p.queue),
                       None)
            if old is None:
                break
            for sock, _ in self._peers.pop(old).idle:
                _close(sock)
        if now - self._swept < 1.0:
            return
        self._swept = now
        for key, peer in list(self._peers.items()):
            stale = [s for s, since in peer.idle if now - since >= KEPT]
            for sock in stale:
                _close(sock)
            peer.idle = [(s, since) for s, since in peer.idle if now - since < KEPT]
            if not (peer.idle or peer.lanes or peer.queue):
                del self._peers[key]

    def _cancel(self, ask: _Ask) -> None:
        with self._lock:
            ask.cancelled = True
            sock = ask.sock
        if sock is not None:            # being read: wakes up the lane's blocked read
            _shut(sock)

    def stop(self) -> None:
        """Cut every connection (a lane blocked in a read ends at once); no new reads."""
        with self._lock:
            self.stopping = True
            socks = list(self._socks)
            for peer in self._peers.values():
                socks += [s for s, _ in peer.idle]
                peer.idle = []
        for sock in socks:
            _shut(sock)
            _close(sock)

    # -- in the reactor --------------------------------------------------------------

    def _done(self, ask: _Ask, result) -> None:
        if ask.d.called:                # cancelled meanwhile: dispose of it
            for f in result if isinstance(result, list) else [result]:
                if hasattr(f, "close"):         # (a batch's entry may be an exception)
                    _close(f)
            return
        (ask.d.errback if isinstance(result, Failure) else ask.d.callback)(result)

    def _hand(self, ask: _Ask, result) -> None:
        self.reactor.callFromThread(self._done, ask, result)

    # -- a lane (a pool thread) ------------------------------------------------------

    def _lane(self, peer: _Peer) -> None:
        """Thread: serve *peer*'s queue, one connection at a time, until it is empty
        (``_connection`` ends the lane under the lock that ``get`` queues under)."""
        flying: deque = deque()
        buf = self._buffer()
        try:
            while True:
                got = self._connection(peer, flying)
                if got is None:
                    return
                sock, fresh = got
                try:
                    self._serve(peer, sock, flying, buf)
                except _Lost as lost:
                    self._lost(peer, sock, fresh, flying, lost)
                    continue
                self._keep(peer, sock)
        except BaseException as e:      # (a bug: what is in flight must still end)
            with self._lock:
                peer.lanes -= 1
            for ask in flying:
                self._hand(ask, Failure(e))
            raise
        finally:
            with self._lock:
                self._buffers.append(buf)

    def _buffer(self) -> bytearray:
        """A lane's body buffer, reused (fresh memory costs a page fault per 4 KB)."""
        with self._lock:
            return self._buffers.pop() if self._buffers else bytearray(MEMORY)

    def _connection(self, peer: _Peer, flying: deque):
        """(a connection for the lane: a kept quiet one or a new one, whether new), or
        None when there is nothing to ask (the lane ended); a peer that cannot be reached
        fails what is asked of it."""
        stranded = []
        with self._lock:
            if self.stopping or not (flying or peer.queue):
                peer.lanes -= 1             # (under the lock ``get`` queues under)
                if self.stopping:
                    stranded = list(flying) + list(peer.queue)
                    flying.clear()
                    peer.queue.clear()
                kept = None
            else:
                kept, now = False, time.monotonic()
                while peer.idle:
                    sock, since = peer.idle.pop()
                    if now - since < KEPT and quiet(sock):
                        self._socks.add(sock)
                        return sock, False
                    _close(sock)
        if kept is None:
            for ask in stranded:
                self._hand(ask, Failure(error.ConnectError(string="stopping")))
            return None
        name, host, port = peer.key
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT)
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self.context.wrap_socket(raw, server_hostname=name)
            except BaseException:
                raw.close()
                raise
        except (OSError, ValueError) as e:  # a refused handshake (ssl.SSLError); a name
            #                                 that is no TLS server name (UnicodeError)
            with self._lock:
                failed = list(flying) + list(peer.queue)
                flying.clear()
                peer.queue.clear()
            for ask in failed:
                self._hand(ask, Failure(error.ConnectError(string=f"{name}: {e}")))
            return self._connection(peer, flying)
        with self._lock:
            self._socks.add(sock)
        return sock, True

    def _keep(self, peer: _Peer, sock) -> None:
        with self._lock:
            self._socks.discard(sock)
            if not self.stopping and len(peer.idle) < KEEP:
                peer.idle.append((sock, time.monotonic()))
                return
        _close(sock)

    def _lost(self, peer: _Peer, sock, fresh: bool, flying: deque, lost: _Lost) -> None:
        """The connection broke: the read it broke under fails, unless nothing of its
        answer had come on a kept connection (the peer may have closed it meanwhile: all
        are asked again), or the peer closed it after an answer (``closed``); the others
        are asked again, each at most TRIES times in all."""
        with self._lock:
            self._socks.discard(sock)
        _close(sock)
        head_fails = lost.started or (fresh and not lost.closed)
        again = []
        for i, ask in enumerate(flying):
            if ask.cancelled:
                continue
            if (i == 0 and head_fails) or ask.tries >= TRIES:
                why = Failure(lost.why)
                self._hand(ask, Failure((ResponseFailed if lost.started and i == 0 else
                                         ResponseNeverReceived)([why])))
            else:
                again.append(ask)
        flying.clear()
        with self._lock:
            peer.queue.extendleft(reversed(again))

    def _serve(self, peer: _Peer, sock, flying: deque, buf: bytearray) -> None:
        """Thread: keep up to DEPTH requests asked on *sock*, read their answers in
        order, hand each over; return when none is left (the connection clean)."""
        reader = _Reader(sock)
        while True:
            with self._lock:
                fresh = []
                while len(flying) < DEPTH and peer.queue and not self.stopping:
                    ask = peer.queue.popleft()
                    if not ask.cancelled:
                        ask.tries += 1
                        flying.append(ask)
                        fresh.append(ask)
                if not flying:
                    return
                head = flying[0]
                if head.cancelled or self.stopping:
                    raise _Lost(defer.CancelledError(), False)
                head.sock = sock
            try:
                sock.settimeout(IDLE)
                if fresh:
                    sock.sendall(b"".join(a.request for a in fresh))
                result = self._answer(reader, head, buf)
            except (OSError, EOFError, ValueError) as e:
                raise _Lost(e, reader.started) from None
            finally:
                with self._lock:
                    head.sock = None
            flying.popleft()
            reader.started = False
            self._hand(head, result)
            if reader.closing:          # an error answer that closes the connection
                raise _Lost(EOFError("closed by the peer"), False, closed=True)

    def _answer(self, reader, ask: _Ask, buf: bytearray):
        """Thread: one answer: the examined instance (a batch's: *split*'s result), or a
        Failure (404: not held; other codes: IOError). OSError, EOFError, ValueError:
        the connection is lost."""
        code, length = reader.head()
        if code != 200:
            if length > MAX_ERROR_BODY:
                raise ValueError(f"an error answer of {length} bytes")
            reader.skip(length)
            return Failure((self.not_held if code == 404 else IOError)(
                f"{ask.what} answered {code}"))
        if length > (MAX_INSTANCE if ask.cap is None else ask.cap):
            raise ValueError(f"an answer of {length} bytes")
        if length > MEMORY and ask.split is None:
            return self._spooled(reader, length, buf)
        view = memoryview(buf if length <= len(buf) else bytearray(length))[:length]
        reader.read_into(view)
        data = bytes(view)
        if ask.split is None:
            return examined(data)
        try:
            return ask.split(data)
        except IOError as e:        # not the frames asked: this read fails, not the link
            return Failure(e)

    def _spooled(self, reader, length: int, buf: bytearray):
        """Thread: a large body written to a temporary file as it comes, its data set
        hashed on the way (as ``fetching._FileSink``); the file rewound."""
        f = tempfile.NamedTemporaryFile(dir=self.tmpdir, suffix=".dcm")
        try:
            hasher, left, first = hashlib.sha256(), length, True
            data_size = 0
            while left:
                view = memoryview(buf)[:min(left, len(buf))]
                reader.read_into(view)
                left -= len(view)
                f.write(view)
                if first:
                    first = False
                    try:
                        view = view[header.file_meta(bytes(view))[0]:]
                    except (header.BadDataset, ValueError, struct.error):
                        hasher = None
                if hasher is not None:
                    hasher.update(view)
                    data_size += len(view)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        f.sha256 = hasher.hexdigest() if hasher is not None else ""
        f.data_size = data_size if hasher is not None else 0
        f.size = length
        return f


class _Reader:
    """An HTTP/1.1 answer stream on *sock*: heads (``content-length`` framing only) and
    bodies, bytes past one answer kept for the next (pipelined answers)."""

    def __init__(self, sock):
        self.sock, self.buf, self.started = sock, bytearray(), False
        self.closing = False             # the peer closes the connection after this answer

    def _more(self) -> None:
        data = self.sock.recv(RECV)
        if not data:
            raise EOFError("the connection was closed")
        self.started = True
        self.buf += data

    def head(self) -> tuple[int, int]:
        """(status, content-length); ValueError if malformed or over its bounds."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise ValueError("an answer head over its bound")
            self._more()
        if end > MAX_HEAD:
            raise ValueError("an answer head over its bound")
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[:end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version != b"HTTP/1.1" or len(code) != 3 or not code.isdigit():
            raise ValueError("not an HTTP/1.1 status line")
        length = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if not colon or not name:
                raise ValueError("a malformed header")
            if name == b"transfer-encoding":
                raise ValueError("not a content-length answer")
            if name == b"connection" and value.lower() == b"close":
                self.closing = True
            if name == b"content-length":
                if length is not None or not value.isdigit() or len(value) > 15:
                    raise ValueError("a bad content-length")
                length = int(value)
        if length is None:
            raise ValueError("no content-length")
        return int(code), length

    def read_into(self, view: memoryview) -> None:
        """Fill *view* exactly: what is buffered first, then straight from the socket."""
        n = min(len(self.buf), len(view))
        view[:n] = self.buf[:n]
        del self.buf[:n]
        while n < len(view):
            got = self.sock.recv_into(view[n:])
            if not got:
                raise EOFError("the connection was closed")
            self.started = True
            n += got

    def skip(self, length: int) -> None:
        self.read_into(memoryview(bytearray(length)))


def quiet(sock) -> bool:
    """A kept connection has nothing to read: neither the peer's close (EOF, reset, a
    close_notify) nor anything else an idle HTTP connection should not hold."""
    if sock.pending():
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def _shut(sock) -> None:
    try:        # the plain socket's shutdown: wakes up a read blocked in another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _close(f) -> None:
    try:
        f.close()
    except OSError:
        pass
