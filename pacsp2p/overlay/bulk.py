"""The bulk channel: HTTPS between peers, with the overlay's mutual-TLS credentials.

Instance bytes and catalog facts never travel as AMP values (64 KiB each); they stream
over plain HTTP/1.1 inside the same mutual TLS:

- ``POST /changes`` with ``{"vector": {origin: seq}, "limit": M}`` -> this peer's vector
  and, for every origin it holds more of, the facts above the asker's (at most M in
  all; ``sync.py``); the asker's vector is told to ``heard`` (it may be ahead of us)
- ``GET /changes/<origin>?after=N&limit=M`` -> JSON list of one origin's facts
- ``GET /instances/<archive>/<uid>?sha256=H`` -> the Part-10 file, streamed from disk
- ``POST /instances/<archive>`` with ``[[uid, sha256 or ""], ...]`` (at most
  ``MAX_BATCH``) -> one frame per instance asked, in order: a status byte (``OK``,
  ``NOT_HELD``, ``ALONE``: too big for a batch or not read in one, ask it alone;
  ``FAILED``), the body's length (4 bytes, big-endian) and the Part-10 file (``OK``
  only). The instances are read whole in ONE job of the archive's pool (``read_many``):
  a small instance costs neither its own request, its own catalog query nor its own
  thread hops (the sender's side of a relayed C-MOVE of 2,000 small MR instances).

The two instance reads are served on the read port too (``reads.Reads`` on ``threadtls``:
stdlib ``ssl`` in threads, each answer one ``sendall`` that OpenSSL encrypts and writes
in C: half the holder's CPU per image of this Twisted site). A peer advertises that port
in its member info (``read_port``) and askers use it; this site keeps serving the reads
to peers of before it (a rolling upgrade), with the same checks (``check_get``,
``check_batch``, ``read_one``, ``read_batch``).

Everything in a request is hostile until checked: the UID must be valid (PS3.5 §9.1, else
400) and the catalog must place it on that archive of this peer (else 404): the channel
serves instances the catalog knows, by UID, never a path. Error bodies are fixed short
texts (never a filesystem path or an exception's message); the details go to the log,
bounded. Connections must complete their TLS handshake within the handshake timeout
(``guard``).

Files are read and written in a thread pool chunk by chunk with producer/consumer flow
control, so neither side's reactor blocks on disk and memory stays bounded. A fetched
instance of at most ``MEMORY`` bytes is kept in memory instead (a ``Part10Bytes``,
examined and hashed in one pool job: no temporary file to create, write, read back and
unlink), within a byte budget shared by a client's downloads (``MEMORY_BUDGET``); a
larger one, or one arriving while the budget is spent, spills to a temporary file. This
module is the server side; the client side is ``fetching``.
"""

from __future__ import annotations

import json
import re
import struct

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web import http, resource, server

from pacsp2p.flow import fetch_gate, open_gated
from pacsp2p.overlay import tls
from pacsp2p.overlay.dissemination import check_vector
from pacsp2p.overlay.sync import BATCH, MAX_PULL_BODY, serve
from pacsp2p.validate import is_uid, shown

log = Logger()

CHUNK = 1 << 20               # read from files
MAX_CHANGES = 20000
MAX_NAME = 255                # characters of a peer, archive or token name in a path
_SHA256 = re.compile(rb"[0-9a-f]{64}\Z")
_SHA256_TEXT = re.compile(r"[0-9a-f]{64}\Z", re.ASCII)

MAX_BATCH = 64                # instances asked in one POST /instances/<archive>
MAX_BATCH_BODY = 16 << 10     # bytes of such a request (64 UIDs and hashes: < 10 KB)
BATCH_ITEM = 256 << 10        # bytes of one instance served in a batch (else ALONE):
                              # a batch read holds at most MAX_BATCH of them (16 MB)
WHOLE = 1 << 20               # an instance asked alone up to this size: read in one job
BATCH_BYTES = 8 << 20         # bytes of one batch answer (past them: ALONE)
OK, NOT_HELD, ALONE, FAILED = 0, 1, 2, 3
FRAME = struct.Struct(">BI")  # status, length of the body that follows
SEND_LIMIT = 1 << 20          # bytes the TCP transport hands the kernel per write event
                              # (Twisted's 128 KB: a 512 KB image took 4-5 reactor turns)


MAX_BODY = MAX_PULL_BODY       # bytes of any request's body (the largest: a pull's)


class _Request(server.Request):
    """A request whose body past ``MAX_BODY`` is dropped as it arrives and answered 413
    (Twisted spools a body of any size to a temporary file before a resource reads
    it: one POST could fill this peer's disk)."""

    _seen = 0
    _too_large = False

    def gotLength(self, length):
        self._too_large = length is not None and length > MAX_BODY
        super().gotLength(0 if self._too_large else length)

    def handleContentChunk(self, data):
        self._seen += len(data)
        self._too_large = self._too_large or self._seen > MAX_BODY
        if not self._too_large:
            super().handleContentChunk(data)

    def process(self):
        if not self._too_large:
            return super().process()
        self.setResponseCode(413)
        self.setHeader(b"content-type", b"text/plain")
        self.write(b"request too large\n")
        self.finish()


def tcp_of(transport):
    """The TCP transport under *transport*'s wrappers (TLS, the handshake guard)."""
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return transport


class _Channel(http.HTTPChannel):
    """An HTTP channel whose TCP transport sends ``SEND_LIMIT`` bytes per write event."""

    def connectionMade(self):
        super().connectionMade()
        tcp = tcp_of(self.transport)
        if tcp is not None and hasattr(tcp, "SEND_LIMIT"):
            tcp.SEND_LIMIT = SEND_LIMIT


def _answer(request, code: int, body: bytes) -> bytes:
    """A short fixed answer (no path, no exception text)."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain")
    return body


class _Changes(resource.Resource):
    isLeaf = True

    def __init__(self, catalog, heard=None):
        super().__init__()
        self.catalog = catalog
        self.heard = heard              # (peer name, its vector) -> None

    def render_POST(self, request):
        """Every origin the asker lags on, from its vector, in one answer (issue 19.5)."""
        body = request.content.read(MAX_PULL_BODY + 1) if request.content else b""
        try:
            if len(body) > MAX_PULL_BODY or request.postpath not in ([], [b""]):
                raise ValueError("too big")
            ask = json.loads(body)
            if not isinstance(ask, dict):
                raise ValueError("not an object")
            theirs = check_vector(ask.get("vector"))
            limit = ask.get("limit", BATCH)
            if not isinstance(limit, int) or not 0 < limit:
                raise ValueError("bad limit")
            limit = min(limit, MAX_CHANGES)
            own = ask.get("own", 0)      # a pull-back: the asker's facts up to that
            if isinstance(own, bool) or not isinstance(own, int) or not 0 <= own < 2 ** 53:
                raise ValueError("bad own")
        except (ValueError, RecursionError):      # (JSON nested past the stack)
            return _answer(request, 400, b"bad request\n")
        asker = tls.peer_name(request.transport)
        if asker and self.heard is not None and not own:   # (own: its vector understated)
            self.heard(asker, theirs)

        def send(body):
            request.setHeader(b"content-type", b"application/octet-stream")
            request.write(body)
            request.finish()

        serve(self.catalog, theirs, asker, limit, own).addCallbacks(
            send, lambda f: _fail(request, f))
        return server.NOT_DONE_YET

    def render_GET(self, request):
        try:
            origin = request.postpath[0].decode()
            after = int(request.args.get(b"after", [b"0"])[0])
            limit = min(int(request.args.get(b"limit", [b"5000"])[0]), MAX_CHANGES)
        except (IndexError, ValueError, UnicodeDecodeError):
            return _answer(request, 400, b"bad request\n")
        if len(request.postpath) != 1 or not 0 < len(origin) <= MAX_NAME or after < 0 \
                or limit < 1:
            return _answer(request, 400, b"bad request\n")
        d = self.catalog.changes(origin, after, limit,      # encoded in the reader thread
                                 lambda rows: json.dumps(rows, separators=(",", ":")).encode())

        def send(body):
            request.setHeader(b"content-type", b"application/json")
            request.write(body)
            request.finish()

        d.addCallbacks(send, lambda f: _fail(request, f))
        return server.NOT_DONE_YET


class Refused(Exception):
    """A request refused before anything is read: its code and fixed short body."""

    def __init__(self, code: int, body: bytes):
        super().__init__(code)
        self.code, self.body = code, body


def _bad(body: bytes = b"bad request\n") -> Refused:
    return Refused(400, body)


def check_get(parts: list, sha: bytes) -> tuple[str, str, str | None]:
    """(archive, uid, sha256 or None) of ``GET /instances/<archive>/<uid>?sha256=H``
    (*parts*: the path's segments after ``instances``, unquoted); ``Refused``: 400 for
    an invalid UID (PS3.5 §9.1) or hash."""
    if len(parts) != 2:
        raise _bad()
    try:
        name, uid = (part.decode("ascii") for part in parts)
    except UnicodeDecodeError:
        raise _bad(b"invalid SOP Instance UID\n") from None
    if not is_uid(uid):
        log.warn("bulk request refused: invalid SOP Instance UID {uid}", uid=shown(uid))
        raise _bad(b"invalid SOP Instance UID\n")
    if sha and not _SHA256.match(sha):
        raise _bad(b"invalid sha256\n")
    return name, uid, sha.decode() or None


def check_batch(parts: list, body: bytes) -> tuple[str, list]:
    """(archive, [(uid, sha256 or "")]) of ``POST /instances/<archive>``; ``Refused``."""
    try:
        if len(parts) != 1 or len(body) > MAX_BATCH_BODY:
            raise ValueError("path or size")
        return parts[0].decode("ascii"), _batch(json.loads(body))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad() from None


def archive_of(archives: dict, name: str):
    """The archive *name* of this peer that can be read; ``Refused`` 404 otherwise."""
    archive = archives.get(name)
    if archive is None or "open" not in archive.capabilities:
        raise Refused(404, b"no such archive\n")
    return archive


def read_one(catalog, archive, name: str, uid: str, sha: str | None):
    """Reactor: Deferred[bytes, or an open file (larger than ``WHOLE``)] of *uid* on
    *archive*, if the catalog places it there (else KeyError); at most ``max_fetches``
    reads of the archive at once (``flow``); not hashed here (the asker hashes it)."""
    def opened(held):
        if uid not in held:
            raise KeyError("not in the catalog")
        if "read_many" in archive.capabilities:         # up to 1 MB: read in one job
            return fetch_gate(archive).run(archive.read_many, [(uid, sha)], WHOLE,
                                           examined=False).addCallback(whole)
        return open_gated(archive, uid, sha)

    def whole(results):
        got = results[0]
        if isinstance(got, BaseException):
            raise got
        return got[0] if isinstance(got, tuple) else got
    return catalog.held(catalog.peer, name, [uid]).addCallback(opened)


def read_batch(catalog, archive, name: str, items) -> defer.Deferred:
    """Reactor: Deferred[[(status, body)]], one frame per item of a batch (see the
    module's docstring), the held ones read whole in ONE job of the archive's pool."""
    uids = [uid for uid, _ in items]
    if "read_many" not in archive.capabilities:         # each alone, as a GET
        return defer.succeed([(ALONE, b"")] * len(items))

    def read(held):
        asked = [(uid, sha or None) for uid, sha in items if uid in held]
        if not asked:
            return held, []
        return fetch_gate(archive).run(archive.read_many, asked, BATCH_ITEM,
                                       examined=False).addCallback(lambda r: (held, r))

    return catalog.held(catalog.peer, name, uids).addCallback(read).addCallback(
        lambda answer: frames_of(uids, *answer))


def frames_of(uids, held, results) -> list:
    """The frames of a batch: *results* of ``read_many`` for the *held* ones of *uids*."""
    results, out, size = iter(results), [], 0
    for uid in uids:
        frame = _frame(next(results)) if uid in held else (NOT_HELD, b"")
        size += len(frame[1])
        out.append(frame if size <= BATCH_BYTES else (ALONE, b""))
    return out


def _not_held(failure_or_error) -> bool:
    return isinstance(failure_or_error, (KeyError, FileNotFoundError, LookupError))


class _Instances(resource.Resource):
    """The instance reads on the Twisted port (askers of before the read port)."""

    isLeaf = True

    def __init__(self, archives, pool, reactor, catalog):
        super().__init__()
        self.archives, self.pool, self.reactor = archives, pool, reactor
        self.catalog = catalog

    def render_GET(self, request):
        """``/instances/<archive>/<uid>``: 400 for an invalid UID or hash, 404 for an
        archive or an instance this peer's catalog does not place there."""
        try:
            name, uid, sha = check_get(request.postpath,
                                       request.args.get(b"sha256", [b""])[0])
            archive = archive_of(self.archives, name)
        except Refused as r:
            return _answer(request, r.code, r.body)

        def stream(f):
            if isinstance(f, bytes):                    # the whole file: one write
                _send(request, b"application/dicom", f)
                return None
            request.setHeader(b"content-type", b"application/dicom")
            return _FileProducer(f, request, self.pool, self.reactor).start()

        d = read_one(self.catalog, archive, name, uid, sha)
        d.addCallback(stream)
        d.addErrback(self._not_served, request, name, uid)
        return server.NOT_DONE_YET

    def render_POST(self, request):
        """``/instances/<archive>``: a batch (see the module's docstring); 400 for a bad
        request (any invalid UID or hash), 404 for an archive this peer has not."""
        try:
            body = request.content.read(MAX_BATCH_BODY + 1) if request.content else b""
            name, items = check_batch(request.postpath, body)
            archive = archive_of(self.archives, name)
        except Refused as r:
            return _answer(request, r.code, r.body)
        d = read_batch(self.catalog, archive, name, items)
        d.addCallback(lambda frames: _sendframes_of(request, frames))
        d.addErrback(lambda f: _fail(request, f))
        return server.NOT_DONE_YET

    @staticmethod
    def _not_served(failure, request, name, uid):
        if _not_held(failure.value):
            log_not_held(name, uid, failure.value)
            _fail(request, None, 404, b"unknown instance\n")
        else:
            _fail(request, failure)


def log_not_held(name, uid, err) -> None:
    log.info("bulk request: {uid} on {archive} not held ({err})", uid=uid,
             archive=shown(name), err=shown(str(err), 200))


def _batch(asked) -> list[tuple[str, str]]:
    """The (uid, sha256 or "") of a batch request, checked (ValueError otherwise)."""
    if not isinstance(asked, list) or not 0 < len(asked) <= MAX_BATCH:
        raise ValueError("not a list of 1 to MAX_BATCH items")
    items = []
    for item in asked:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(x, str) for x in item)):
            raise ValueError("not [uid, sha256]")
        uid, sha = item
        if not is_uid(uid) or (sha and not _SHA256_TEXT.match(sha)):
            raise ValueError("invalid UID or hash")
        items.append((uid, sha))
    if len({uid for uid, _ in items}) != len(items):
        raise ValueError("an instance asked twice")
    return items


def _frame(result) -> tuple[int, bytes]:
    """A ``read_many`` result as a frame's (status, body); a file it left open (larger
    than a batch takes) is closed: ALONE."""
    if isinstance(result, tuple):
        return OK, result[0]
    if isinstance(result, (KeyError, FileNotFoundError, LookupError)):
        return NOT_HELD, b""
    if isinstance(result, BaseException):
        log.warn("bulk batch: reading an instance failed: {err}", err=shown(str(result), 200))
        return FAILED, b""
    result.close()
    return ALONE, b""


def _sendframes_of(request, frames) -> None:
    parts = []
    for status, body in frames:
        parts += (FRAME.pack(status, len(body)), body)
    _send(request, b"application/octet-stream", b"".join(parts))


def _gone(request) -> bool:
    """The asker gave up (cancelled, stalled): its connection is lost, nothing more is
    written, nor finished (Twisted raises RuntimeError then)."""
    return getattr(request, "_disconnected", False)


def _send(request, content_type: bytes, data: bytes) -> None:
    """The whole answer *data* at once, with its length; the request finished once the
    connection has taken it (``_Taken``)."""
    if _gone(request):
        return
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(data))
    taken = _Taken(request)
    request.registerProducer(taken, True)
    request.write(data)
    taken.end()


class _Taken:
    """An answer written whole: its request is finished only when the connection is not
    full (else once it resumes). Twisted serves the next pipelined request as soon as
    one is finished: an asker that sent many and reads none had every answer buffered
    here (4 connections of 40 GETs of 0.9 MB: +150 MB); now one per connection."""

    def __init__(self, request):
        self.request, self.paused, self.ended = request, False, False

    def end(self):
        if self.ended or self.paused:
            return
        self.ended = True
        if not _gone(self.request):
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.end()

    def stopProducing(self):
        self.ended = True


def _fail(request, failure, code=500, body=b"internal error\n"):
    """Answer *code* with the fixed *body*; log *failure* (bounded), never send it."""
    if failure is not None:
        log.warn("bulk request {uri} failed: {err}", uri=shown(request.uri.decode("ascii",
                 "replace")), err=shown(failure.getErrorMessage(), 200))
    if _gone(request):
        return
    if not request.finished and not request.startedWriting:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        request.write(body)
    if not request.finished:
        request.finish()


class _FileProducer:
    """Stream an open file to *consumer*, reading chunks in a thread pool."""

    def __init__(self, f, consumer, pool, reactor):
        self.f, self.consumer, self.pool, self.reactor = f, consumer, pool, reactor
        self.paused = False
        self.reading = False
        self.done = defer.Deferred()

    def start(self):
        if _gone(self.consumer):               # the asker gave up while it was opened
            self.f.close()
            self.done.callback(None)
            return self.done
        self.consumer.registerProducer(self, True)
        self._next()
        return self.done

    def _next(self):
        if self.paused or self.reading or self.done.called:
            return
        self.reading = True
        deferToThreadPool(self.reactor, self.pool, self.f.read, CHUNK).addCallbacks(
            self._got, self._error)

    def _got(self, data):
        self.reading = False
        if not data:
            self._finish()
            return
        self.consumer.write(data)
        self._next()

    def _error(self, failure):
        self.reading = False
        log.warn("reading for bulk transfer failed: {err}", err=failure.getErrorMessage())
        self.consumer.loseConnection() if hasattr(self.consumer, "loseConnection") else None
        self._finish()

    def _finish(self):
        if self.done.called:
            return
        self.f.close()
        self.consumer.unregisterProducer()
        if hasattr(self.consumer, "finish") and not self.consumer.finished:
            self.consumer.finish()
        self.done.callback(None)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._next()

    def stopProducing(self):
        self.paused = True
        if not self.done.called:
            self.f.close()
            self.done.callback(None)


class _Offers(resource.Resource):
    """Files this peer offers to a peer it asked to keep a replica (by one-time token)."""

    isLeaf = True

    def __init__(self, offers: dict, pool, reactor):
        super().__init__()
        self.offers, self.pool, self.reactor = offers, pool, reactor

    def render_GET(self, request):
        token = (request.postpath[0].decode("ascii", "replace")
                 if len(request.postpath) == 1 else "")
        opener = self.offers.get(token) if len(token) <= MAX_NAME else None
        if opener is None:
            return _answer(request, 404, b"no such offer\n")
        d = defer.maybeDeferred(opener)
        d.addCallback(lambda f: _FileProducer(f, request, self.pool, self.reactor).start())
        d.addErrback(lambda f: _fail(request, f, 404, b"offer not available\n"))
        return server.NOT_DONE_YET


def site(catalog, archives: dict, pool, reactor, offers: dict | None = None,
         heard=None) -> server.Site:
    """*heard*: told (peer, its vector) when a peer pulls from us."""
    root = resource.Resource()
    root.putChild(b"changes", _Changes(catalog, heard))
    root.putChild(b"instances", _Instances(archives, pool, reactor, catalog))
    root.putChild(b"incoming", _Offers(offers if offers is not None else {}, pool, reactor))
    s = server.Site(root)
    s.requestFactory = _Request
    s.protocol = _Channel
    s.noisy = False
    s.log = lambda request: None
    return s
