"""The bulk channel: HTTPS between peers, with the overlay's mutual-TLS credentials.

Instance bytes and catalog facts never travel as AMP values (64 KiB each); they stream
over plain HTTP/1.1 inside the same mutual TLS:

- ``POST /changes`` with ``{"vector": {origin: seq}, "limit": M}`` -> this peer's vector
  and, for every origin it holds more of, the facts above the asker's (at most M in
  all; ``sync.py``); the asker's vector is told to ``heard`` (it may be ahead of us)
- ``GET /changes/<origin>?after=N&limit=M`` -> JSON list of one origin's facts
- ``GET /instances/<archive>/<uid>?sha256=H`` -> the Part-10 file, streamed from disk

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
larger one, or one arriving while the budget is spent, spills to a temporary file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import struct
import tempfile
from urllib.parse import quote

from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone,
                                _HTTP11ClientFactory, readBody)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pacsp2p.dicom import header, part10
from pacsp2p.flow import open_gated
from pacsp2p.overlay import tls
from pacsp2p.overlay.dissemination import check_vector
from pacsp2p.overlay.sync import BATCH, MAX_PULL_BODY, serve
from pacsp2p.validate import is_uid, shown

log = Logger()

CHUNK = 1 << 20               # read from files
SINK_CHUNK = 1 << 20         # received bytes gathered before a write job (a typical
                             # instance: one job, which also makes its temporary file)
SINK_AHEAD = 2 * SINK_CHUNK  # received while a write job runs before reading pauses
MEMORY = 1 << 20             # a fetched instance up to this size is kept in memory ...
MEMORY_BUDGET = 64 << 20     # ... while a client's bodies being received in memory hold
                             # less than this (handed over, they are bounded by count:
                             # a retrieval's window)
MAX_CHANGES = 20000
MAX_AGENTS = 64               # peers whose HTTP connections we keep (LRU)
IDLE_CONNECTION = 30.0        # seconds an idle persistent connection is kept
MAX_NAME = 255                # characters of a peer, archive or token name in a path
_SHA256 = re.compile(rb"[0-9a-f]{64}\Z")


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
        except ValueError:
            return _answer(request, 400, b"bad request\n")
        asker = tls.peer_name(request.transport)
        if asker and self.heard is not None:
            self.heard(asker, theirs)

        def send(body):
            request.setHeader(b"content-type", b"application/octet-stream")
            request.write(body)
            request.finish()

        serve(self.catalog, theirs, asker, limit).addCallbacks(
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
        d = self.catalog.changes(origin, after, limit)

        def send(rows):
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(rows, separators=(",", ":")).encode())
            request.finish()

        d.addCallbacks(send, lambda f: _fail(request, f))
        return server.NOT_DONE_YET


class _Instances(resource.Resource):
    isLeaf = True

    def __init__(self, archives, pool, reactor, catalog):
        super().__init__()
        self.archives, self.pool, self.reactor = archives, pool, reactor
        self.catalog = catalog

    def render_GET(self, request):
        """``/instances/<archive>/<uid>``: 400 for an invalid UID or hash, 404 for an
        archive or an instance this peer's catalog does not place there."""
        if len(request.postpath) != 2:
            return _answer(request, 400, b"bad request\n")
        try:
            name, uid = (part.decode("ascii") for part in request.postpath)
        except UnicodeDecodeError:
            return _answer(request, 400, b"invalid SOP Instance UID\n")
        if not is_uid(uid):
            log.warn("bulk request refused: invalid SOP Instance UID {uid}", uid=shown(uid))
            return _answer(request, 400, b"invalid SOP Instance UID\n")
        sha = request.args.get(b"sha256", [b""])[0]
        if sha and not _SHA256.match(sha):
            return _answer(request, 400, b"invalid sha256\n")
        archive = self.archives.get(name)
        if archive is None or "open" not in archive.capabilities:
            return _answer(request, 404, b"no such archive\n")
        d = self.catalog.held(self.catalog.peer, name, [uid])

        def opened(held):
            if uid not in held:
                raise KeyError("not in the catalog")
            return open_gated(archive, uid, sha.decode() or None)   # max_fetches at once

        def stream(f):
            request.setHeader(b"content-type", b"application/dicom")
            return _FileProducer(f, request, self.pool, self.reactor).start()

        d.addCallback(opened)
        d.addCallback(stream)
        d.addErrback(self._not_served, request, name, uid)
        return server.NOT_DONE_YET

    @staticmethod
    def _not_served(failure, request, name, uid):
        if failure.check(KeyError, FileNotFoundError, LookupError):
            log.info("bulk request: {uid} on {archive} not held ({err})", uid=uid,
                     archive=shown(name), err=shown(failure.getErrorMessage(), 200))
            _fail(request, None, 404, b"unknown instance\n")
        else:
            _fail(request, failure)


def _fail(request, failure, code=500, body=b"internal error\n"):
    """Answer *code* with the fixed *body*; log *failure* (bounded), never send it."""
    if failure is not None:
        log.warn("bulk request {uri} failed: {err}", uri=shown(request.uri.decode("ascii",
                 "replace")), err=shown(failure.getErrorMessage(), 200))
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
    s.noisy = False
    s.log = lambda request: None
    return s


# -- client side ---------------------------------------------------------------------

@implementer(IPolicyForHTTPS)
class _PeerPolicy:
    """Connect to peer *name* only: its certificate must be ours-CA-signed for that name."""

    def __init__(self, credentials, name):
        from twisted.internet import ssl
        self.options = ssl.optionsForClientTLS(
            name, trustRoot=credentials.ca, clientCertificate=credentials.own)

    def creatorForNetloc(self, hostname, port):
        return self.options


class _Budget:
    """Bytes that bodies being received in memory may hold together."""

    def __init__(self, limit: int = MEMORY_BUDGET):
        self.limit, self.held = limit, 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True


def _kept(chunks: list, hashed: bool):
    """Thread: the whole body (its *chunks* joined here, not in the reactor) as the
    object handed over, hashed as ``_append`` hashes a file: a ``Part10Bytes`` (File
    Meta Information walked), or an ``io.BytesIO`` if it is not a Part-10 file."""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        offset = header.file_meta(data)[0]
    except (header.BadDataset, ValueError, struct.error):
        f, offset = io.BytesIO(data), None
    else:
        try:
            probe = io.BytesIO(data)
            ts, uid = part10.dataset_start(probe)
            f = (part10.Part10Bytes(data, offset, ts, uid) if probe.tell() == offset
                 else io.BytesIO(data))
        except (part10.BadFile, ValueError, struct.error):
            f = io.BytesIO(data)
    if hashed and offset is not None:
        f.sha256 = hashlib.sha256(memoryview(data)[offset:]).hexdigest()
        f.data_size = len(data) - offset
    else:
        f.sha256, f.data_size = "", 0
    f.size = len(data)
    return f


class _FileSink(protocol.Protocol):
    """Receive a response body (a Part-10 file) into a temporary file, writing in a thread
    pool and, with *hashed*, hashing its data set on the way: the file handed over then
    carries ``sha256`` and ``data_size`` (empty and 0 if it is not a Part-10 file).
    *make_file* makes the temporary file, in the pool, with the first write. With a
    *budget*, a body of at most ``MEMORY`` bytes is kept in memory (``_kept``) while the
    budget lasts; it spills to the file otherwise. *finished* cancelled (``stop``): the
    connection is closed, and what was received given back (budget, file)."""

    def __init__(self, make_file, pool, reactor, finished, hashed: bool = False,
                 budget: _Budget | None = None):
        self.make_file, self.f = make_file, None
        self.budget, self.memory = budget, budget is not None   # in memory so far
        self.pool, self.reactor, self.finished = pool, reactor, finished
        self.buffer: list[bytes] = []
        self.size = 0
        self.writing = False
        self.ended = None
        self.hasher = hashlib.sha256() if hashed else None
        self.data_size, self.started = 0, not hashed
        self.written = 0
        self.paused = False
        self.stopped = False

    def stop(self):
        """The fetch was cancelled (*finished* has failed): close the connection (a
        stalled or endless body would hold the budget, the file and the connection for
        ever); ``connectionLost`` then gives back what was received."""
        self.stopped = True
        if self.ended is None and self.transport is not None:
            self.transport.stopProducing()      # the connection: not kept for reuse

    def dataReceived(self, data):
        self.buffer.append(data)
        self.size += len(data)
        if self.memory:
            if self.size <= MEMORY and self.budget.take(len(data)):
                return
            self._spill()                       # too big for memory: to the file
        if self.size >= SINK_CHUNK:
            self._write()
        if self.writing and self.size >= SINK_AHEAD and not self.paused:
            self.paused = True                  # the disk is behind: let TCP push back
            self.transport.pauseProducing()

    def _append(self, data):
        """Thread: write and hash (the data set: after the File Meta Information)."""
        if self.f is None:
            self.f = self.make_file()
        self.f.write(data)
        self.written += len(data)
        if not self.started:
            self.started = True
            try:
                offset = header.file_meta(data)[0]
            except (header.BadDataset, ValueError, struct.error):
                self.hasher = None
                return
            data = memoryview(data)[offset:]
        if self.hasher is not None:
            self.hasher.update(data)
            self.data_size += len(data)

    def _write(self):
        empty_body = (self.ended is not None and self.f is None
                      and self.ended.check(ResponseDone))      # still needs its file
        if self.writing or not (self.buffer or empty_body):
            if not self.writing and self.ended is not None:
                self._close()
            return
        data, self.buffer, self.size = b"".join(self.buffer), [], 0
        self.writing = True                     # reading goes on meanwhile (bounded)
        deferToThreadPool(self.reactor, self.pool, self._append, data).addCallbacks(
            self._written, self._failed)

    def _written(self, _):
        self.writing = False
        if self.paused and self.ended is None:
            self.paused = False
            self.transport.resumeProducing()
        self._write() if (self.ended is not None or self.size >= SINK_CHUNK) else None

    def _failed(self, failure):
        self.writing = False
        self.ended = failure
        self._close()

    def _spill(self):
        """From now on to the temporary file (what is buffered is its first write)."""
        self.memory = False
        self.budget.held -= self.size - len(self.buffer[-1])    # (the last: not taken)

    def connectionLost(self, reason):
        self.ended = reason
        if self.memory:
            self._hand_over()
        elif not self.writing:
            self._write()

    def _hand_over(self):
        """The whole body is in memory: examined and hashed in one pool job."""
        self.memory = False
        chunks, self.buffer = self.buffer or [b""], []
        self.budget.held -= self.size
        if self.stopped:
            return
        if not self.ended.check(ResponseDone):
            self.finished.errback(self.ended)
            return
        d = deferToThreadPool(self.reactor, self.pool, _kept, chunks,
                              self.hasher is not None)
        d.addCallbacks(self._examined, self._not_examined)

    def _examined(self, f):
        if self.stopped:                        # cancelled while it was examined
            f.close()
        else:
            self.finished.callback(f)

    def _not_examined(self, failure):
        if not self.stopped:
            self.finished.errback(failure)

    def _close(self):
        if self.finished.called:
            if self.stopped and self.f is not None:
                self.f.close()                  # (a temporary file: deleted)
            return
        if self.ended is not None and self.ended.check(ResponseDone):
            self.f.seek(0)
            self.f.sha256 = self.hasher.hexdigest() if self.hasher is not None else ""
            self.f.data_size = self.data_size if self.hasher is not None else 0
            self.f.size = self.written
            self.finished.callback(self.f)
        else:
            if self.f is not None:
                self.f.close()
            self.finished.errback(self.ended)


class _Discard(protocol.Protocol):
    """An error answer's body, dropped as it comes; past 64 KB (a hostile peer's that
    never ends: ``readBody`` kept it all, even cancelled) its connection is closed."""

    size = 0

    def dataReceived(self, data):
        self.size += len(data)
        if self.size > 1 << 16:
            self.transport.stopProducing()


class _NoDelayClient(HTTP11ClientProtocol):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False

    def buildProtocol(self, addr):
        return _NoDelayClient(self._quiescentCallback)


class BulkClient:
    """Fetch from other peers' bulk channels."""

    def __init__(self, credentials, reactor, pool: ThreadPool, tmpdir):
        self.credentials, self.reactor, self.pool, self.tmpdir = (
            credentials, reactor, pool, str(tmpdir))
        self._agents: dict[str, tuple] = {}     # name -> (Agent, its pool), LRU order
        self.budget = _Budget()                  # bodies being received in memory

    def _agent(self, name: str) -> Agent:
        """The agent for peer *name*; agents (and their idle connections) of at most
        MAX_AGENTS peers are kept, idle connections for IDLE_CONNECTION seconds."""
        entry = self._agents.pop(name, None)
        if entry is None:
            pool = HTTPConnectionPool(self.reactor, persistent=True)
            pool._factory = _QuietFactory
            pool.maxPersistentPerHost = 8          # a retrieval runs up to 8 per source
            pool.cachedConnectionTimeout = IDLE_CONNECTION
            entry = (Agent(self.reactor, contextFactory=_PeerPolicy(
                self.credentials, name), pool=pool, connectTimeout=5), pool)
            while len(self._agents) >= MAX_AGENTS:
                oldest = next(iter(self._agents))
                self._agents.pop(oldest)[1].closeCachedConnections()
        self._agents[name] = entry
        return entry[0]

    def _get(self, member, path: str):
        url = f"https://{member.host}:{member.bulk_port}{path}".encode()
        return self._agent(member.name).request(b"GET", url, Headers({}))

    @defer.inlineCallbacks
    def pull_body(self, member, vector: dict, limit: int):
        """Deferred[bytes]: the answer of ``POST /changes`` (not decoded yet)."""
        url = f"https://{member.host}:{member.bulk_port}/changes".encode()
        data = json.dumps({"vector": vector, "limit": limit},
                          separators=(",", ":")).encode()
        response = yield self._agent(member.name).request(
            b"POST", url, Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(data)))
        body = yield readBody(response)
        if response.code != 200:
            raise IOError(f"{member.name}: /changes answered {response.code}")
        return body

    def changes(self, member, origin: str, after: int, limit: int):
        """Deferred[list of facts] of *origin* above sequence *after*."""
        return self.changes_body(member, origin, after, limit).addCallback(json.loads)

    @defer.inlineCallbacks
    def changes_body(self, member, origin: str, after: int, limit: int):
        """Deferred[bytes]: the JSON body of ``GET /changes`` (not decoded yet)."""
        response = yield self._get(member, f"/changes/{quote(origin)}?after={after}&limit={limit}")
        body = yield readBody(response)
        if response.code != 200:
            raise IOError(f"{member.name}: /changes answered {response.code}")
        return body

    def fetch(self, member, archive: str, uid: str, sha256: str | None = None):
        """Deferred[temporary file, or in memory up to ``MEMORY`` bytes: a
        ``Part10Bytes``] holding the instance (deleted when closed), its data set hashed
        on the way (``sha256``: the reader checks it, ``transfer.verify``)."""
        query = f"?sha256={sha256}" if sha256 else ""
        return self.download(member, f"/instances/{quote(archive)}/{quote(uid)}{query}",
                             hashed=True, in_memory=True)

    def fetch_offer(self, member, token: str):
        """Deferred[temporary file] of an offered instance, its data set hashed."""
        return self.download(member, f"/incoming/{quote(token)}", hashed=True)

    @defer.inlineCallbacks
    def download(self, member, path: str, hashed: bool = False, in_memory: bool = False):
        """Deferred[temporary file] with the body of GET *path* (deleted when closed);
        with *in_memory*, a file-like object in memory if the body is small enough (see
        ``_FileSink``): for callers that only read, seek and close it (no ``name``)."""
        response = yield self._get(member, path)
        if response.code != 200:
            response.deliverBody(_Discard())
            raise IOError(f"{member.name}: GET {path} answered {response.code}")
        finished = defer.Deferred(lambda _: sink.stop())
        make_file = functools.partial(tempfile.NamedTemporaryFile, dir=self.tmpdir,
                                      suffix=".dcm")
        sink = _FileSink(make_file, self.pool, self.reactor, finished, hashed,
                         self.budget if in_memory else None)
        response.deliverBody(sink)
        result = yield finished
        return result
