"""The push port: the bytes of a pushed copy on a stdlib-``ssl`` socket served by threads.

Cut-through forwarding (``forward``; chain replication, van Renesse & Schneider, OSDI
2004; HDFS's write pipeline) sends a C-STORE's data set on to its remote holders while
it arrives. On the overlay link (AMP over Twisted TLS) every 256 KB cost both reactors a
box, pyOpenSSL's memory BIOs and a Deferred chain. Here, each holder listens on a
mutual-TLS port of its own (``overlay.threadtls``: the cluster CA, a handshake timeout,
bounded connections) whose connections are served by threads of the named pool
``push-recv``: a thread reads a copy straight into a file of ``incoming``, hashing on the
way, and keeps it (``keep``: durable in the same thread) before it answers; the reactor
sees one call per copy (the pending copy noted). At the writer, a thread of the pool
``push-send`` per connection to a holder (kept while copies come) writes what the
reactor hands it (a queue of at most ``HIGH`` bytes per copy: over it the association is
paused, as the link's full buffer paused it), then reads the holder's answer: one
wake-up of that thread per hand-over, no pool job per copy.

One connection carries one copy at a time, in frames of a kind byte and a 4-byte length:
``OPEN`` (JSON: archive, uid, meta), ``HEAD`` (preamble and File Meta Information),
``DATA``..., ``END``; the holder answers ``ANSWER`` (JSON: the receipt ``Replicate``
answers, or a refusal). Between copies a ``COMMIT`` frame (JSON: the [archive, uid,
sha256] list an AMP ``Commits`` carries, checked as its responder checks it) records
pending copies (phase 2), answered ``ANSWER`` (seqs and prevs, as ``Commits`` answers)
once the holder's catalog transaction, made by the thread that read the frame,
committed: no AMP box, no hand-off to the holder's reactor (``push_commits`` in its
Hello). The holder's end is ``pushrecv``. A data set abandoned closes the connection. A
holder tells its port in its Hello (``push_port``); a peer whose Hello names none (an
older release) gets its copies over AMP as before. Everything read is
bounded (frame sizes, the data set at ``MAX_PUSH``, connections at ``max_connections``)
and checked as the AMP responders check it (``commands.check``, ``check_meta``) before a
byte is written; the answer's fields are checked at the writer (``ingest``).

A copy whose C-STORE keeps no copy at the writer (pushes only: ``recorded.store_remote``)
is committed in one round trip fewer, pipelined as HTTP/1.1 requests are: its sender
thread, once it has sent ``END``, waits for the writer's verdict on the whole data set
(``ThreadPush.verdict``: its SHA-256 known, its checks passed) and sends ``COMMIT_LAST``
(the group commits waiting for that holder, then [archive, uid, the writer's sha256])
right behind ``END``, then reads both answers; the holder, once the copy is durable and
answered, records it all in one transaction if the copy hashes to the writer's hash
(``pushrecv``; a holder says ``commit_last`` in its Hello, else the writer commits after
the answers as before). What cannot go otherwise than before:

- a holder records a copy only on the writer's commit, carrying the writer's hash: a
  copy refused or hashed otherwise is refused its ``COMMIT_LAST`` (nothing recorded;
  the writer goes the general way, ``Ingest.store``, which drops it);
- Success only once W holders' copies are durable and recorded (``store_remote``
  counts the answers to the commits, as before);
- one holder's copy fails after the other recorded its copy: the general way makes the
  missing copy elsewhere, the recorded one counted as recorded; if W is not met the
  C-STORE fails and the recorded copy stays, as a copy whose ``COMMIT`` succeeded stays
  today when the other's fails: an extra copy of an instance the modality was told
  failed, which its retry stores again (a duplicate there);
- the writer's checks refuse the data set after ``END`` (``Forward.abort``): the verdict
  is "no commit" (``verdict(None)``), the pending copy is discarded as today;
- the connection dies between ``END`` and ``COMMIT_LAST`` or before its answer (or is
  cut: the holder declared dead, ``Pushes.cut``): the copy's answer, if read, counts;
  the commit goes again as a plain ``COMMIT`` (``Ingest.remote_copy``): refused if the
  holder had recorded it, then as a failed commit today; a sender that waits
  ``VERDICT`` s for a verdict sends none (the copy is committed the plain way, if at
  all); the verdict given later is skipped, not read as the next copy's.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import struct
import threading
import time

from twisted.internet import defer
from twisted.logger import Logger

from pacsp2p import threads
from pacsp2p.overlay.commands import InvalidArgument, ReplicaRefused
from pacsp2p.overlay.readclient import quiet
from pacsp2p.overlay.threadtls import IDLE_TIMEOUT, client_context, peer_name
from pacsp2p.validate import shown

log = Logger()

OPEN, HEAD, DATA, END, ANSWER, COMMIT, COMMIT_LAST = 1, 2, 3, 4, 5, 6, 7
FRAME = struct.Struct(">BI")        # kind, length of what follows
MAX_OPEN = 64 << 10                 # bytes of an OPEN's JSON (meta: < 60,000) or an ANSWER
MAX_HEAD = 64 << 10                 # bytes of the preamble and File Meta Information
MAX_DATA = 4 << 20                  # bytes of one DATA frame
MAX_PUSH = 4 << 30                  # bytes of one data set (the facade's max_dataset)
BOX = 256 << 10                     # bytes the writer gathers before a thread sends them
HIGH, LOW = 8 << 20, 2 << 20        # queued bytes that pause the association, resume it
IDLE = 300.0                        # seconds a holder waits for the next frame of a copy
KEPT = IDLE_TIMEOUT / 2             # seconds a writer reuses an idle connection (the
                                    # holder closes it after IDLE_TIMEOUT)
ANSWER_WAIT = 600.0                 # seconds a writer waits for the answer (a slow store)
CONNECT = 10.0                      # seconds to connect and complete the TLS handshake
SEND_THREADS = 64                   # connections to holders at once (push-send threads)
VERDICT = IDLE_TIMEOUT / 2          # seconds a sender waits for the writer's verdict
_SHA256 = re.compile(r"[0-9a-f]{64}\Z", re.ASCII)
_ABORT = object()
_NO_COMMIT = object()                # the verdict: not kept (no COMMIT_LAST)


class ProtocolError(Exception):
    """The other end broke the framing (the connection is closed)."""


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


class _Reader:
    """Frames read from a blocking socket into one reused buffer."""

    def __init__(self, sock, size: int = MAX_DATA):
        self.sock, self.buf = sock, bytearray(size)
        self.view = memoryview(self.buf)

    def exactly(self, n: int) -> memoryview:
        """The next *n* bytes (a view of the buffer, valid until the next read)."""
        got = 0
        while got < n:
            k = self.sock.recv_into(self.view[got:n], n - got)
            if not k:
                raise ProtocolError("connection closed mid-frame")
            got += k
        return self.view[:n]

    def frame(self, eof_ok: bool = False):
        """(kind, length) of the next frame; None at a clean end if *eof_ok*."""
        try:
            first = self.sock.recv_into(self.view[:FRAME.size], FRAME.size)
        except (ConnectionError, TimeoutError):
            if eof_ok:
                return None
            raise
        if not first:
            if eof_ok:
                return None
            raise ProtocolError("connection closed")
        if first < FRAME.size:
            rest = self.exactly(FRAME.size - first)
            self.buf[first:FRAME.size] = bytes(rest)
        return FRAME.unpack_from(self.buf)

    def payload(self, kind: int, limit: int) -> bytes:
        got = self.frame()
        if got[0] != kind or got[1] > limit:
            raise ProtocolError(f"frame {got[0]} of {got[1]} bytes, expected {kind}")
        return bytes(self.exactly(got[1]))


# -- the writer --------------------------------------------------------------------------

class Pushes:
    """The writer's senders: a thread of ``push-send`` per connection to a holder's push
    port, kept while copies come (``KEPT`` seconds idle at most), each sending the copies
    handed to it one after the other (one wake-up of its thread per hand-over)."""

    def __init__(self, tls_dir, name: str, reactor):
        self.tls_dir, self.name, self.reactor = tls_dir, name, reactor
        self._context = None
        self.idle: dict[tuple, list] = {}         # (peer, host, port) -> idle _Senders
        self.senders: set = set()                 # every _Sender whose thread runs
        self.lock = threading.Lock()
        self.stopped = False

    def context(self):
        if self._context is None:          # the name is checked as the common name
            self._context = client_context(self.tls_dir, self.name)
            self._context.check_hostname = False
        return self._context

    def open(self, peer: str, host: str, port: int, archive: str, uid: str, head: bytes,
             meta_json: str, pause, resume) -> ThreadPush:
        """Reactor: a copy of *uid* for archive *archive* of *peer* (its push port
        *host*:*port*), bytes to ``feed``; its ``answer`` is Deferred[the receipt]."""
        return ThreadPush(self, self._sender((peer, host, port)), archive, uid, head,
                          meta_json, pause, resume)

    def commit(self, peer: str, host: str, port: int, copies: str) -> defer.Deferred:
        """Reactor: the ``Commits`` *copies* (its JSON list) sent to *peer*'s push port
        (an idle connection, else a new one); Deferred[{"seqs": [...], "prevs": [...]}],
        failing as a ``Commits`` call does (refused, connection lost; at once once
        stopped: no sender is started then)."""
        if self.stopped:
            return defer.fail(ReplicaRefused("the peer stops"))
        job = _CommitJob()
        if not self._sender((peer, host, port)).put(
                (job, _frame(COMMIT, copies.encode("utf-8")), True)):
            job.done(None, ReplicaRefused("the peer stops"))
        return job.answer

    def _sender(self, key) -> _Sender:
        """Reactor: an idle sender of *key*, or a new one (one idle one of another holder
        told to end if the pool's threads are all taken)."""
        with self.lock:
            idle = self.idle.get(key)
            if idle:
                return idle.pop()
            spare = None
            if len(self.senders) >= SEND_THREADS:
                spare = next((q.pop() for q in self.idle.values() if q), None)
            sender = _Sender(self, key)
            self.senders.add(sender)
        if spare is not None:
            spare.queue.put(None)
        threads.pool(self.reactor, "push-send", 1, SEND_THREADS).callInThread(sender.run)
        return sender

    def connect(self, key, sender=None):
        """Thread: a new connection to *key*'s holder, its certificate's name checked;
        *sender*'s ``sock`` while the handshake runs (so ``stop`` cuts a holder that
        never answers it, instead of the pool's join waiting ``CONNECT`` seconds)."""
        peer, host, port = key
        raw = sock = socket.create_connection((host, port), timeout=CONNECT)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self.context().wrap_socket(raw, do_handshake_on_connect=False)
            if sender is not None:
                sender.sock = sock
            if self.stopped:
                raise ReplicaRefused("the peer stops")
            sock.do_handshake()
            name = peer_name(sock)
            if name != peer:
                raise ReplicaRefused(f"the push port at {host}:{port} is peer {name!r}, "
                                     f"not {peer}")
        except Exception:
            sock.close()
            raise
        return sock

    def free(self, sender) -> None:
        """Thread: *sender* is through with its copy: idle."""
        with self.lock:
            if not self.stopped and sender in self.senders:
                self.idle.setdefault(sender.key, []).append(sender)

    def retire(self, sender) -> bool:
        """Thread: *sender* waited ``KEPT`` seconds for a copy: True if it ends (not
        handed one meanwhile)."""
        with self.lock:
            idle = self.idle.get(sender.key, [])
            if sender in idle:
                idle.remove(sender)
                return True
            return self.stopped

    def gone(self, sender) -> None:
        with self.lock:
            self.senders.discard(sender)
            idle = self.idle.get(sender.key, [])
            if sender in idle:
                idle.remove(sender)

    def stop(self) -> None:
        """Reactor: end every sender (their sockets shut down: the pool can stop)."""
        with self.lock:
            self.stopped = True
        self.cut()

    def cut(self, peer: str | None = None) -> None:
        """Reactor: end the senders to *peer* (declared dead: a copy waiting for its
        answer fails now and is placed again, not ``ANSWER_WAIT`` s on), or all."""
        with self.lock:
            senders = [s for s in self.senders if peer in (None, s.key[0])]
            self.idle = {k: q for k, q in self.idle.items() if peer not in (None, k[0])}
        for sender in senders:
            sender.cut()


class _Sender:
    """One connection to a holder's push port and the thread that writes on it: the
    items ``(push, bytes, end)`` the reactor queues, then each copy's answer."""

    def __init__(self, pushes, key):
        self.pushes, self.key = pushes, key
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.sock = None
        self.lock = threading.Lock()
        self.ended = False                       # its thread is through (``_end``)

    def put(self, item) -> bool:
        """Any thread: *item* queued; False once the thread has ended (none reads it)."""
        with self.lock:
            if not self.ended:
                self.queue.put(item)
            return not self.ended

    def cut(self) -> None:
        """Any thread: end now: its socket shut down wakes the thread blocked on it."""
        self.queue.put(None)
        sock = self.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass

    def run(self) -> None:
        """Thread (``push-send``)."""
        current, waited = None, 0.0
        try:
            while True:
                try:
                    item = self.queue.get(timeout=KEPT)
                except queue.Empty:
                    waited += KEPT
                    if current is None:
                        if self.pushes.retire(self):
                            return
                        continue
                    if waited < IDLE:
                        continue
                    item = (current, _ABORT, True)       # no bytes for too long
                if item is None:
                    if current is not None:
                        self._failed(current, ReplicaRefused("the peer stops"))
                    return
                push, buf, end = item
                waited = 0.0
                if push.failed:
                    continue                             # the rest of a copy that failed
                first, current = current is None, None if end else push
                try:
                    self._send(push, buf, end, first)
                except Exception as e:                   # reported to the reactor
                    current = None
                    self._failed(push, e)
        finally:
            self._close()
            self.pushes.gone(self)
            self._end(current)

    def _end(self, current) -> None:
        """Thread, ending: each copy still handed to it (*current*, queued; later: ``put``)
        fails: no answer would come, its C-STORE would wait (its association held)."""
        with self.lock:
            self.ended = True
        left = [] if current is None else [current]
        while not self.queue.empty():
            item = self.queue.get_nowait()      # (only this thread takes items)
            if item is not None:
                left.append(item[0])
        for push in dict.fromkeys(left):
            if not push.failed:
                push.failed = True
                self.pushes.reactor.callFromThread(
                    push.done, None, ReplicaRefused(f"push to {self.key[0]}: ended"))

    def _send(self, push, buf, end: bool, first: bool = False) -> None:
        if buf is _ABORT:
            raise ReplicaRefused("the data set was abandoned")
        if first and self.sock is not None and not quiet(self.sock):
            self._close()           # kept idle, closed by the holder since: a new one
        if self.sock is None:
            self.sock = self.pushes.connect(self.key, self)
        self.sock.settimeout(IDLE)
        self.sock.sendall(buf)
        push.sent(len(buf))
        if end:
            behind = push.pipelined and self._verdict(push)
            self.sock.settimeout(ANSWER_WAIT)
            reader = _Reader(self.sock, MAX_OPEN)
            answer = push.parse(json.loads(reader.payload(ANSWER, MAX_OPEN)))
            committed = self._committed(reader) if behind else None
            self.pushes.free(self)
            if push.in_thread is not None:   # told here first (``Forward``: may answer)
                try:
                    push.in_thread(answer, committed)
                except Exception:
                    log.failure("push to {peer}: its answer's hook failed", peer=self.key[0])
            self.pushes.reactor.callFromThread(push.done, answer, None, committed)

    def _verdict(self, push) -> bool:
        """After a ``pipelined`` copy's END: the writer's verdict (``ThreadPush.verdict``),
        waited for before the copy's answer is read; True if its ``COMMIT_LAST`` is sent
        (right behind the END). None in ``VERDICT`` seconds: none sent (the copy is
        committed the plain way, if at all; a verdict that comes later is skipped, here
        or by ``run``: its copy ``failed``, as the next copy's own comes behind it)."""
        deadline = time.monotonic() + VERDICT
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                push.failed = True              # (what is queued for it: dropped)
                return False
            if item is None:
                self.queue.put(None)                     # (``run`` ends on it)
                raise ReplicaRefused("the peer stops")
            if item[0] is push or not item[0].failed:
                break                          # (else a copy given up on: its verdict)
        if item[0] is not push:
            raise ReplicaRefused("a verdict of another copy")
        if item[1] is _NO_COMMIT:
            return False
        self.sock.sendall(item[1])
        return True

    def _committed(self, reader):
        """The holder's answer to a ``COMMIT_LAST`` (checked), or the error it is."""
        try:
            return _commits_answer(json.loads(reader.payload(ANSWER, MAX_OPEN)))
        except (ReplicaRefused, InvalidArgument) as e:
            return e
        except Exception as e:                 # its answer lost: the connection too
            self._close()
            return ReplicaRefused(f"the commit's answer from {self.key[0]} was lost: "
                                  f"{shown(str(e) or type(e).__name__, 200)}")

    def _failed(self, push, e) -> None:
        """The copy *push* failed (the connection is closed: what was sent of it is
        abandoned at the holder)."""
        push.failed = True
        self._close()
        if not isinstance(e, (ReplicaRefused, InvalidArgument)):
            e = ReplicaRefused(f"push to {self.key[0]}: "
                               f"{shown(str(e) or type(e).__name__, 200)}")
        self.pushes.free(self)
        self.pushes.reactor.callFromThread(push.done, None, e)

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _receipt(answer) -> dict:
    """The holder's ANSWER (hostile until checked): the receipt, as ``Replicate``
    answers it; raises ReplicaRefused/InvalidArgument for a refusal."""
    if not isinstance(answer, dict):
        raise ReplicaRefused("an answer of another shape from the push port")
    if "refused" in answer:
        why = shown(str(answer["refused"]), 300)
        raise (InvalidArgument if answer.get("invalid") is True else ReplicaRefused)(why)
    sha, size, given = answer.get("sha256"), answer.get("size"), answer.get("given") or ""
    flags = [answer.get("duplicate"), answer.get("conflict")]
    if not (isinstance(sha, str) and _SHA256.match(sha) and type(size) is int and
            size >= 0 and all(type(x) is bool for x in flags) and isinstance(given, str)
            and (not given or _SHA256.match(given))):
        raise ReplicaRefused("an answer of another shape from the push port")
    return {"duplicate": flags[0], "conflict": flags[1], "size": size, "sha256": sha,
            "given": given}


def _commits_answer(answer) -> dict:
    """The holder's ANSWER to a ``COMMIT`` (hostile until checked): {"seqs", "prevs"},
    a list each of a count or null per copy; raises as ``_receipt`` does."""
    if isinstance(answer, dict) and "refused" in answer:
        _receipt(answer)
    seqs = answer.get("seqs") if isinstance(answer, dict) else None
    prevs = answer.get("prevs") if isinstance(answer, dict) else None
    if not (isinstance(seqs, list) and isinstance(prevs, list) and len(seqs) == len(prevs)
            and all(x is None or type(x) is int and x >= 0 for x in seqs + prevs)):
        raise ReplicaRefused("an answer of another shape from the push port")
    return {"seqs": seqs, "prevs": prevs}


class _CommitJob:
    """A ``COMMIT`` handed to a sender (as a ``ThreadPush`` is): ``answer`` fires with
    the holder's answer."""

    failed = pipelined = False
    in_thread = None
    parse = staticmethod(_commits_answer)

    def __init__(self):
        self.answer = defer.Deferred()

    def sent(self, n: int) -> None:
        pass

    def done(self, answer, error, committed=None) -> None:
        """Reactor: the sender is through with it (once: the first call counts)."""
        if self.answer.called:
            return
        if error is None:
            self.answer.callback(answer)
        else:
            self.answer.errback(error)


class ThreadPush:
    """One holder's copy of a data set still arriving (reactor side: ``feed``,
    ``finish``, ``abort``, as ``forward.Push``), written by its sender's thread.
    ``answer`` fires with the holder's receipt once the copy is durable (pending) there,
    or fails (refused, connection lost, abandoned)."""

    parse = staticmethod(_receipt)              # the holder's ANSWER, checked
    in_thread = None         # called with the receipt by the sender's thread, first
    pipelined = False        # its END is followed by the writer's verdict (``verdict``)
    ended = decided = over = False   # finish() called; the verdict given; done
    committed = told = None  # the holder's answer to its COMMIT_LAST (or its error)

    def __init__(self, pushes, sender, archive, uid, head, meta_json, pause, resume):
        self.sender, self.reactor, self.uid = sender, pushes.reactor, uid
        self.pause, self.resume = pause, resume
        self.answer = defer.Deferred()
        self.lock = threading.Lock()
        self.queued = 0
        self.paused = self.closed = False
        self.failed = False                       # (set by the sender's thread)
        opening = json.dumps({"archive": archive, "uid": uid, "meta": meta_json}).encode()
        self.buffer = bytearray(_frame(OPEN, opening) + _frame(HEAD, head))
        self.start = len(self.buffer)
        self.buffer += bytes(FRAME.size)          # the first DATA frame's header, later

    def feed(self, piece) -> None:
        if self.closed:
            return
        self.buffer += piece
        if len(self.buffer) - self.start >= BOX:
            self._hand(False)

    def finish(self) -> None:
        if not self.closed:
            self._hand(True)
            self.closed = self.ended = True

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._put((self, _ABORT, True))
        else:
            self.verdict(None)

    def verdict(self, commit: str | None, told=None) -> bool:
        """Reactor, once, for a ``pipelined`` copy whose END is queued and that is not
        done: the writer's verdict on the whole data set: *commit*, the JSON list of
        [archive, uid, sha256] of other pending copies of that holder (a group commit
        riding along), then of this copy (the writer's sha256), sent as ``COMMIT_LAST``
        right behind END; None: not kept (the copy stays pending there until the writer
        discards it). True if taken: then *told(answer)* is called, in the reactor,
        with the holder's answer to it (or its error, or None) before ``answer`` fires."""
        if not self.pipelined or not self.ended or self.decided or self.over:
            return False
        self.decided, self.told = True, told
        self._put((self, _NO_COMMIT if commit is None else
                   _frame(COMMIT_LAST, commit.encode("utf-8")), True))
        return True

    def _hand(self, end: bool) -> None:
        """Reactor: the bytes gathered (a DATA frame, and END if *end*) to the sender."""
        buf, start = self.buffer, self.start
        n = len(buf) - start - FRAME.size
        if n:
            FRAME.pack_into(buf, start, DATA, n)
        else:
            del buf[start:]
        if end:
            buf += _frame(END)
        self.buffer = bytearray(FRAME.size)
        self.start = 0
        with self.lock:
            self.queued += len(buf)
            pause = self.queued >= HIGH and not self.paused
            self.paused = self.paused or pause
        if pause:
            self.pause()
        self._put((self, buf, end))

    def _put(self, item) -> None:
        """Reactor: *item* to the sender; if its thread has ended, this copy fails."""
        if not self.sender.put(item) and not self.failed:
            self.failed = True
            self.reactor.callFromThread(self.done, None, ReplicaRefused(
                f"push to {self.sender.key[0]}: its sender has ended"))

    def sent(self, n: int) -> None:
        """Sender's thread: *n* bytes are written."""
        with self.lock:
            self.queued -= n
            resume = self.paused and self.queued <= LOW
            self.paused = self.paused and not resume
        if resume:
            self.reactor.callFromThread(self.resume)

    def done(self, answer, error, committed=None) -> None:
        """Reactor: the sender is through with this copy (and its ``COMMIT_LAST``); the
        first call counts, and ``answer`` fires whatever *told* or ``resume`` raise."""
        if self.over:
            return
        self.closed, self.committed, self.over = True, committed, True
        told, self.told = self.told, None
        try:
            if told is not None:
                told(committed)
            with self.lock:
                resume, self.paused = self.paused, False
            if resume:
                self.resume()
        except Exception:
            log.failure("push of {uid}: after its answer", uid=self.uid)
        if error is None:
            self.answer.callback(answer)
        else:
            self.answer.errback(error)
