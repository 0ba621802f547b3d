"""The bulk channel's client side: fetch instances and catalog facts from other peers.

Over the same mutual TLS as the overlay (``_PeerPolicy``: a peer's certificate must be
signed by our CA for that peer's name); one HTTP connection pool per peer, at most
``MAX_AGENTS`` peers' kept (LRU). Everything a peer answers is hostile: a fetched body is
written to a temporary file in a thread pool with flow control, or kept in memory up to
``MEMORY`` bytes within a shared budget (``_FileSink``); an error answer's body is
dropped and its connection closed past 64 KB (``_Discard``); a ``/changes`` answer is
read into memory up to ``MAX_ANSWER`` bytes, and its connection closed past that
(``_Capped``), within ``ANSWER_TIMEOUT`` seconds. A cancelled fetch closes its
connection and gives back what it held. Small instances are fetched many to a request
(``fetch_many``: ``POST /instances/<archive>``, the frames of ``bulk``), the answer read
into memory up to its bound (``bulk.BATCH_BYTES`` and the frames' headers), then split,
examined and hashed in ONE pool job; a peer that serves no batches (an older one:
405) is asked one instance per request from then on. Given a ``readclient.ReadClient``,
both reads go to a peer's read port in its lanes instead (stdlib ``ssl`` in threads,
pipelined, examined and hashed there); a peer that names no read port (an older one) is
asked here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import tempfile
from urllib.parse import quote

from twisted.internet import defer, protocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone,
                                _HTTP11ClientFactory)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from pacsp2p.dicom import header, part10
from pacsp2p.overlay import bulk
from pacsp2p.overlay.readclient import examined

SINK_CHUNK = 1 << 20         # received bytes gathered before a write job (a typical
                             # instance: one job, which also makes its temporary file)
SINK_AHEAD = 2 * SINK_CHUNK  # received while a write job runs before reading pauses
MEMORY = 1 << 20             # a fetched instance up to this size is kept in memory ...
MEMORY_BUDGET = 64 << 20     # ... while a client's bodies being received in memory hold
                             # less than this (handed over, they are bounded by count:
                             # a retrieval's window)
MAX_AGENTS = 64               # peers whose HTTP connections we keep (LRU)
IDLE_CONNECTION = 30.0        # seconds an idle persistent connection is kept
MAX_ANSWER = 64 << 20         # bytes of a /changes answer read into memory (at most
                              # MAX_CHANGES facts of bounded values: a few MB)
ANSWER_TIMEOUT = 60.0         # seconds a /changes request may take, asked to answered
READ_SIZE = 1 << 18           # bytes a bulk connection's TCP transport reads per event
                              # (Twisted's 64 KB: a 512 KB image took 8 or more)


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
    budget lasts; it spills to the file otherwise. A body whose *length* is announced
    takes it from the budget at once, or goes to the file from its first byte: a body
    that would spill never holds budget another could use (which body is kept in memory
    no longer depends on which arrives first). *finished* cancelled (``stop``): the
    connection is closed, and what was received given back (budget, file)."""

    def __init__(self, make_file, pool, reactor, finished, hashed: bool = False,
                 budget: _Budget | None = None, length=None):
        self.make_file, self.f = make_file, None
        self.budget, self.memory = budget, budget is not None   # in memory so far
        self.taken = 0                          # bytes of the budget this body holds
        if self.memory and isinstance(length, int):
            if 0 <= length <= MEMORY and budget.take(length):
                self.taken = length
            else:
                self.memory = False
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
            need = self.size - self.taken
            if self.size <= MEMORY and (need <= 0 or self.budget.take(need)):
                self.taken += max(need, 0)
                return
            self._leave_memory()                # too big for memory: to the file
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

    def _leave_memory(self):
        """No longer kept in memory (spilled to the file: what is buffered is its first
        write; or handed over whole): the budget this body took given back."""
        self.memory = False
        self.budget.held -= self.taken
        self.taken = 0

    def connectionLost(self, reason):
        self.ended = reason
        if self.memory:
            self._hand_over()
        elif not self.writing:
            self._write()

    def _hand_over(self):
        """The whole body is in memory: examined and hashed in one pool job."""
        self._leave_memory()
        chunks, self.buffer = self.buffer or [b""], []
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


class NotHeld(FileNotFoundError):
    """The peer answered 404: it does not hold that copy (any more: moved, dropped)."""


class _Capped(protocol.Protocol):
    """A body read into memory up to *cap* bytes (``finished``: Deferred[bytes]); past
    that, or when *finished* is cancelled, the connection is closed (a hostile peer's
    answer that never ends: ``readBody`` kept it all, even cancelled)."""

    def __init__(self, finished, cap: int):
        self.finished, self.cap = finished, cap
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data):
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > self.cap:
            self.parts = []
            self.transport.stopProducing()
            self.finished.errback(IOError(f"an answer over {self.cap} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(reason)


def read_capped(response, cap: int = MAX_ANSWER):
    """Deferred[bytes]: *response*'s body, at most *cap* bytes (``_Capped``)."""
    capped = _Capped(defer.Deferred(lambda _: capped.transport
                                    and capped.transport.stopProducing()), cap)
    response.deliverBody(capped)
    return capped.finished


class Unbatched(IOError):
    """Not served in a batch: the peer serves none (an older peer), or asks that this
    instance be fetched alone (too big for a batch)."""


@implementer(IBodyProducer)
class _Body:
    """A request body in memory, written at once (no cooperator task)."""

    def __init__(self, data: bytes):
        self.data, self.length = data, len(data) or UNKNOWN_LENGTH

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def stopProducing(self):
        pass


def _split(chunks: list, n: int) -> list:
    """Thread: a batch answer's *n* frames (``bulk.FRAME``), each ``OK`` body examined
    and hashed (``readclient.examined``), the others left as their status (int).
    IOError if the frames are not exactly *n* well-formed ones."""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    out, pos, head = [], 0, bulk.FRAME.size
    while pos < len(data) and len(out) < n:
        if pos + head > len(data):
            break
        status, size = bulk.FRAME.unpack_from(data, pos)
        pos += head
        if status > bulk.FAILED or size > bulk.BATCH_ITEM or pos + size > len(data) or (
                size and status != bulk.OK):
            break
        out.append(examined(data[pos:pos + size]) if status == bulk.OK else status)
        pos += size
    if len(out) != n or pos != len(data):
        raise IOError(f"a batch answer of {len(data)} bytes is not {n} frames")
    return out


def _split_one(data: bytes, n: int) -> list:
    return _split([data], n)


def _named(frames: list, items, member) -> list:
    """A batch's entries: the instances, and for a status the exception it names."""
    why = {bulk.NOT_HELD: NotHeld, bulk.ALONE: Unbatched, bulk.FAILED: IOError}
    return [why[f](f"{member.name}: {uid} not served in a batch (status {f})")
            if isinstance(f, int) else f for f, (uid, _) in zip(frames, items)]


class _NoDelayClient(HTTP11ClientProtocol):
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        tcp = bulk.tcp_of(self.transport)
        if tcp is not None and hasattr(tcp, "bufferSize"):
            tcp.bufferSize = READ_SIZE


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False

    def buildProtocol(self, addr):
        return _NoDelayClient(self._quiescentCallback)


def _reads(member) -> int:
    """The port that serves *member*'s instance reads: its read port (``reads.Reads``),
    or the bulk port of a peer that advertises none (older; ``read_port = -1``)."""
    return getattr(member, "read_port", 0) or member.bulk_port


class BulkClient:
    """Fetch from other peers' bulk channels."""

    def __init__(self, credentials, reactor, pool: ThreadPool, tmpdir, reads=None):
        """*reads*: a ``readclient.ReadClient``, which then reads the instances asked
        alone of peers that name a read port (else the reactor's client does)."""
        self.credentials, self.reactor, self.pool, self.tmpdir = (
            credentials, reactor, pool, str(tmpdir))
        self.reads = reads
        self._agents: dict[str, tuple] = {}     # name -> (Agent, its pool), LRU order
        self.budget = _Budget()                  # bodies being received in memory
        self.answer_timeout = ANSWER_TIMEOUT
        self._unbatched: set[str] = set()      # peers that answered a batch 405

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

    def _get(self, member, path: str, port: int = 0):
        url = f"https://{member.host}:{port or member.bulk_port}{path}".encode()
        return self._agent(member.name).request(b"GET", url, Headers({}))

    def _answer(self, requested, member):
        """Deferred[bytes]: the body of the answer to *requested* (a request's Deferred),
        at most ``MAX_ANSWER`` bytes, whole within ``answer_timeout`` seconds, else
        cancelled and its connection closed: a peer that accepts and never answers
        (frozen, hostile) must not hold this peer's one pull at a time for ever."""
        @defer.inlineCallbacks
        def read():
            response = yield requested
            if response.code != 200:
                response.deliverBody(_Discard())
                raise IOError(f"{member.name}: /changes answered {response.code}")
            body = yield read_capped(response)
            return body
        return read().addTimeout(self.answer_timeout, self.reactor)

    def pull_body(self, member, vector: dict, limit: int, own: int = 0):
        """Deferred[bytes]: the answer of ``POST /changes`` (not decoded yet; ``_answer``);
        *own*: our own origin's facts instead, up to that number (a pull-back,
        ``reclaim``)."""
        url = f"https://{member.host}:{member.bulk_port}/changes".encode()
        ask = {"vector": vector, "limit": limit, **({"own": own} if own else {})}
        data = json.dumps(ask, separators=(",", ":")).encode()
        return self._answer(self._agent(member.name).request(
            b"POST", url, Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(data))), member)

    def fetch(self, member, archive: str, uid: str, sha256: str | None = None):
        """Deferred[temporary file, or in memory up to ``MEMORY`` bytes: a
        ``Part10Bytes``] holding the instance (deleted when closed), its data set hashed
        on the way (``sha256``: the reader checks it, ``transfer.verify``)."""
        if self.reads is not None and getattr(member, "read_port", 0):
            return self.reads.get(member, member.read_port, archive, uid, sha256)
        query = f"?sha256={sha256}" if sha256 else ""
        return self.download(member, f"/instances/{quote(archive)}/{quote(uid)}{query}",
                             hashed=True, in_memory=True, port=_reads(member))

    @defer.inlineCallbacks
    def fetch_many(self, member, archive: str, items):
        """Deferred[list], one entry per (uid, sha256) of *items* (at most
        ``bulk.MAX_BATCH``), in order: the instance in memory as ``fetch`` gives it (a
        ``Part10Bytes``, data set hashed), or the exception for that one (``NotHeld``;
        ``Unbatched``: fetch it alone). Fails as a whole with ``Unbatched`` if the peer
        serves no batches, else as a fetch does (link errors, IOError for a hostile or
        broken answer: over its bound, not the frames asked, ``answer_timeout``)."""
        if member.name in self._unbatched:
            raise Unbatched(f"{member.name} serves no batches")
        url = f"https://{member.host}:{_reads(member)}/instances/{quote(archive)}"
        body = json.dumps([[uid, sha or ""] for uid, sha in items],
                          separators=(",", ":")).encode()
        if self.reads is not None and getattr(member, "read_port", 0):
            frames = yield self.reads.post(
                member, member.read_port, archive, body,
                bulk.BATCH_BYTES + bulk.FRAME.size * len(items),
                functools.partial(_split_one, n=len(items)))
            return _named(frames, items, member)
        requested = self._agent(member.name).request(
            b"POST", url.encode(), Headers({b"content-type": [b"application/json"]}),
            _Body(body))
        response = yield requested.addTimeout(self.answer_timeout, self.reactor)
        if response.code != 200:
            response.deliverBody(_Discard())
            if response.code == 405:                # an older peer: GET each
                self._unbatched.add(member.name)
                raise Unbatched(f"{member.name} serves no batches")
            raise (NotHeld if response.code == 404 else IOError)(
                f"{member.name}: POST /instances/{archive} answered {response.code}")
        chunks = yield read_capped(response, bulk.BATCH_BYTES + bulk.FRAME.size * len(
            items)).addTimeout(self.answer_timeout, self.reactor)
        frames = yield deferToThreadPool(self.reactor, self.pool, _split, [chunks],
                                         len(items))
        return _named(frames, items, member)

    def fetch_offer(self, member, token: str):
        """Deferred[temporary file] of an offered instance, its data set hashed."""
        return self.download(member, f"/incoming/{quote(token)}", hashed=True)

    @defer.inlineCallbacks
    def download(self, member, path: str, hashed: bool = False, in_memory: bool = False,
                 port: int = 0):
        """Deferred[temporary file] with the body of GET *path* (deleted when closed);
        with *in_memory*, a file-like object in memory if the body is small enough (see
        ``_FileSink``): for callers that only read, seek and close it (no ``name``);
        *port*: another than the member's bulk port."""
        response = yield self._get(member, path, port)
        if response.code != 200:
            response.deliverBody(_Discard())
            raise (NotHeld if response.code == 404 else IOError)(
                f"{member.name}: GET {path} answered {response.code}")
        finished = defer.Deferred(lambda _: sink.stop())
        make_file = functools.partial(tempfile.NamedTemporaryFile, dir=self.tmpdir,
                                      suffix=".dcm")
        sink = _FileSink(make_file, self.pool, self.reactor, finished, hashed,
                         self.budget if in_memory else None, response.length)
        response.deliverBody(sink)
        result = yield finished
        return result
