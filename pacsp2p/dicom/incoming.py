"""A received C-STORE data set, streamed into ``data_dir/incoming`` as a Part-10 file.

The acceptor hands each data set fragment (a memoryview of the bytes Twisted read: not
copied) to ``Incoming.feed`` in the reactor. Fragments are written by a thread pool, never
in the reactor: one job at a time per file, each job writing everything queued since the
previous one (a small instance is one job: open, File Meta Information, data set, close).
While more than ``HIGH`` bytes wait to be written the association's transport is paused
(it stops reading the socket) and resumed once they drain below ``LOW``.

Creating a file is the slow part of a small instance (~0.45 ms on this machine's ext4,
against ~0.01 ms to open an existing one and write 10 KB): ``Spares`` keeps a few empty
files made ahead in ``incoming`` by a thread of its own, so a C-STORE opens one that
exists. The empty spares left at exit are removed with the other leftovers at start.
The facade's spares have no name (``unnamed``: open descriptors): a data set is written
and fsynced through it and named only where it is kept, or in ``incoming`` (``name``)
when a reader or another session needs a path.

The File Meta Information (PS3.10 7.1) is written first, as pynetdicom does: version,
Media Storage SOP Class/Instance UID and Transfer Syntax UID of the request's context,
our Implementation Class UID/Version Name and the sender's AE title.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from pathlib import Path

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p import threads, unnamed
from pacsp2p.dicom.pdu import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION

HIGH = 8 << 20            # queued bytes that pause the transport
LOW = 2 << 20             # ... and resume it
COALESCE = 256 << 10      # bytes gathered before a write job (unless the data set ended)

log = Logger()

def receive_pool(reactor):
    """The thread pool that writes received data sets (one per reactor)."""
    return threads.pool(reactor, "dicom-recv", 2, 4, lane=True)


def _short(elem: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def _ascii(value: str, limit: int) -> bytes:
    """*value* as at most *limit* ASCII bytes; anything else becomes '?' (the wire layer
    never raises on what a requestor sent: the facade validates UIDs and refuses)."""
    return value.encode("ascii", "replace")[:limit]


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str,
              source_ae: str = "") -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (explicit VR little endian).
    Values that are not ASCII, or too long for their VR, are written with '?' for the
    odd characters and cut to length (UI: 64, AE: 16)."""
    body = [struct.pack("<HH2sHI", 2, 1, b"OB", 0, 2) + b"\0\1",
            _short(0x0002, b"UI", _ascii(sop_class, 64), b"\0"),
            _short(0x0003, b"UI", _ascii(sop_instance, 64), b"\0"),
            _short(0x0010, b"UI", _ascii(transfer_syntax, 64), b"\0"),
            _short(0x0012, b"UI", IMPLEMENTATION_UID, b"\0"),
            _short(0x0013, b"SH", IMPLEMENTATION_VERSION, b" ")]
    if source_ae:
        body.append(_short(0x0016, b"AE", _ascii(source_ae, 16), b" "))
    body = b"".join(body)
    return (bytes(128) + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body)


def _make_spares(directory: Path, n: int, nameless: bool = False) -> list:
    """Thread: *n* new empty files in *directory*, [(path, None)]; *nameless*: with no
    name where the file system can (``unnamed``), [(the path to name it, descriptor)]."""
    out = []
    for _ in range(n):
        path = directory / f"{uuid.uuid4().hex}.dcm"
        fd = unnamed.make(directory) if nameless else None
        if fd is None:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        out.append((path, fd))
    return out


def _close_all(spares) -> None:
    for _, fd in spares:
        if fd is not None:
            os.close(fd)


class Spares:
    """Empty files made ahead (reactor side: ``take()`` a path, or ``take_file()`` with
    *nameless*; refilled in a thread)."""

    def __init__(self, directory: Path, reactor, keep: int = 16, nameless: bool = False):
        self.directory, self.reactor, self.keep = Path(directory), reactor, keep
        self.nameless = nameless
        self.ready: list[tuple[Path, int | None]] = []
        self._filling = False
        self.pool = ThreadPool(1, 1, "dicom-spares")
        self.pool.start()
        self.stopped = False

    def take(self) -> Path:
        """A named spare's path (or a new name: ``_write`` then makes the file)."""
        assert not self.nameless, "take_file() takes a spare with no name"
        return self.take_file()[0]

    def take_file(self) -> tuple[Path, int | None]:
        """(its path, the descriptor of the spare if it has no name yet, else None): the
        caller owns the descriptor (``Incoming`` closes it)."""
        spare = self.ready.pop() if self.ready else \
            (self.directory / f"{uuid.uuid4().hex}.dcm", None)
        self._refill()
        return spare

    def _refill(self) -> None:
        if self._filling or self.stopped or len(self.ready) >= self.keep // 2:
            return
        self._filling = True
        d = deferToThreadPool(self.reactor, self.pool, _make_spares, self.directory,
                              self.keep - len(self.ready), self.nameless)
        d.addCallbacks(self._made, self._failed)

    def _made(self, spares):
        self._filling = False
        if self.stopped:
            _close_all(spares)
            return
        self.ready.extend(spares)

    def _failed(self, failure):
        self._filling = False          # a full disk: C-STOREs create their own files

    def stop(self) -> None:
        self.stopped = True
        self.pool.stop()
        spares, self.ready = self.ready, []
        _close_all(spares)


class _Spare:
    """The descriptor of a spare with no name, closed if it is dropped unused (the file
    object is made in the writing thread: its making calls fstat, which lets go of the
    GIL — in the reactor, a wait for whichever thread holds it)."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def take(self) -> int:
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.take())

    def __del__(self):
        self.close()


class _File:
    """What the writing thread owns: the path, the open file, the data set's hash; the
    bytes of a file written in one job (``content``, while ``after`` runs); *fd*: a file
    with no name yet (``unnamed``), written instead of a file at *path*."""

    def __init__(self, path: Path, head: bytes, fd: int | None = None):
        self.path, self.head, self.f = path, head, None
        self.spare = None if fd is None else _Spare(fd)
        self.unnamed = False
        self.sha256, self.data_size = hashlib.sha256(), 0
        self.content = None


def _write(state: _File, chunks: list, last: bool, after):
    """Thread pool: write *chunks* (opening the file and writing its head first) and hash
    them; on the *last* job return ``after(path, sha256 hex, data set size)`` (or the
    path) and close the file: while ``after`` runs the file is complete on disk and still
    open (``Incoming.written``: its descriptor, and its bytes if one job wrote it)."""
    whole = state.f is None and last
    if state.f is None:
        if state.spare is not None:             # no name yet
            state.f = open(state.spare.take(), "wb")
            state.spare, state.unnamed = None, True
        else:
            try:        # a spare: no O_CREAT, which would lock the directory
                fd = os.open(state.path, os.O_WRONLY | os.O_TRUNC)
            except FileNotFoundError:
                fd = os.open(state.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            state.f = open(fd, "wb")
        state.f.write(state.head)
    state.f.writelines(chunks)
    for chunk in chunks:
        state.sha256.update(chunk)
        state.data_size += len(chunk)
    if last:
        state.f.flush()
        try:
            if after is None:
                if state.unnamed:
                    unnamed.link(state.f.fileno(), state.path)
                    state.unnamed = False
                return state.path
            if whole:
                state.content = b"".join([state.head, *chunks])
            return after(state.path, state.sha256.hexdigest(), state.data_size)
        finally:
            state.content = None
            f, state.f = state.f, None
            f.close()
    return None


class _Quiet:
    """Thread-safe: log the first of a kind of error, then at most one line per
    ``every`` seconds counting those not logged (a full disk fails every C-STORE)."""

    def __init__(self, every: float = 60.0):
        self.every, self.lock = every, threading.Lock()
        self.last, self.missed = -every, 0

    def __call__(self, fmt: str, **kw) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < self.every:
                self.missed += 1
                return
            missed, self.missed, self.last = self.missed, 0, now
        log.error(fmt + (" ({missed} more since the last report)" if missed else ""),
                  missed=missed, **kw)


_discard_failed = _Quiet()


def _discard(state: _File) -> None:
    """Thread pool: close and remove a partial file; never raises (a full disk makes
    the close fail: the bytes it still had to write are dropped anyway)."""
    try:
        if state.spare is not None:             # a spare with no name, never written
            spare, state.spare = state.spare, None
            spare.close()
        if state.f is not None:
            f, state.f = state.f, None
            try:
                f.close()
            except OSError as e:
                _discard_failed("closing a partial received file failed: {err}",
                                err=e.strerror or e)
    finally:
        try:
            state.path.unlink(missing_ok=True)
        except OSError as e:
            _discard_failed("removing a partial received file failed: {err}",
                            err=e.strerror or e)


class Incoming:
    """One data set being received into *path* (reactor side). ``feed()`` fragments,
    then ``finish()`` (Deferred[after(path)]) or ``discard()``; *pause*/*resume* throttle
    the sender; *coalesce*: bytes gathered before a write job (fewer, larger jobs: fewer
    thread hops per data set)."""

    def __init__(self, path: Path, pool, reactor, head: bytes, pause, resume,
                 coalesce: int = COALESCE, fd: int | None = None):
        self.state = _File(path, head, fd)
        self.pool, self.reactor = pool, reactor
        self.pause, self.resume = pause, resume
        self.coalesce = min(coalesce, LOW)
        self.path = self.state.path
        self._queued: list = []
        self._queued_bytes = 0
        self._busy = False
        self._paused = False
        self._ending = None          # (Deferred, after) once the data set is complete
        self.error: BaseException | None = None
        self.discarded = False

    def feed(self, piece) -> None:
        if self.error is not None or self.discarded:
            return
        self._queued.append(piece)
        self._queued_bytes += len(piece)
        if self._queued_bytes >= HIGH and not self._paused:
            self._paused = True
            self.pause()
        if not self._busy and self._queued_bytes >= self.coalesce:
            self._flush()

    def finish(self, after=None) -> defer.Deferred:
        """Deferred[after(path, sha256, data_size) run in the pool after the file is
        closed]; errback with the write error (the file is then removed)."""
        d = defer.Deferred()
        self._ending = (d, after)
        if self.error is not None:
            self._failed()
        elif not self._busy:
            self._flush()
        return d

    def written(self):
        """The writing thread, inside ``finish``'s *after*: (the descriptor of the file,
        open until *after* returns; its bytes, or None if more than one job wrote it)."""
        return self.state.f.fileno(), self.state.content

    @property
    def readable(self) -> str | Path:
        """The writing thread, inside ``finish``'s *after*: a path that opens the file."""
        return unnamed.source(self.state.f.fileno()) if self.state.unnamed else self.path

    @property
    def unnamed(self) -> bool:
        """The writing thread, inside ``finish``'s *after*: the file has no name yet."""
        return self.state.unnamed

    def name(self) -> None:
        """The writing thread, inside ``finish``'s *after*: give the file with no name its
        path (read, or kept, by its name from now on). Raises OSError."""
        if self.state.unnamed:
            unnamed.link(self.state.f.fileno(), self.path)
            self.state.unnamed = False

    def discard(self) -> None:
        """Forget the data set: close and remove the partial file (in the pool)."""
        if self.discarded:
            return
        self.discarded = True
        self._queued = []
        self._unpause()
        if not self._busy:
            self.pool.callInThread(_discard, self.state)

    # -- internals (reactor thread) ----------------------------------------------------
    def _unpause(self):
        if self._paused:
            self._paused = False
            self.resume()

    def _flush(self):
        chunks, self._queued, size = self._queued, [], self._queued_bytes
        self._queued_bytes = 0
        last = self._ending is not None
        after = self._ending[1] if last else None
        self._busy = True
        d = deferToThreadPool(self.reactor, self.pool, _write, self.state, chunks, last, after)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(last, size))

    def _written(self, result, last, size):
        self._busy = False
        if self.discarded:
            self.pool.callInThread(_discard, self.state)
            return
        if self._paused and self._queued_bytes < LOW:
            self._unpause()
        if last:
            self._ending[0].callback(result)
        elif self._ending is not None or self._queued_bytes >= self.coalesce:
            self._flush()

    def _write_failed(self, failure):
        self._busy = False
        self.error = failure.value
        self._queued = []
        self._unpause()
        self.pool.callInThread(_discard, self.state)
        if self._ending is not None:
            self._failed()

    def _failed(self):
        d = self._ending[0]
        if not d.called:
            d.errback(self.error)


def _unlink(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


def remove(pool, path: Path) -> None:
    """Remove a received file once it is stored (in the pool)."""
    pool.callInThread(_unlink, path)


def spool(f, directory: Path) -> Path:
    """Thread: the open file *f*, from its start, copied to a new temporary file in
    *directory*, both closed; its path (the caller removes it)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if f.seekable():
            f.seek(0)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".dcm", delete=False) as out:
            shutil.copyfileobj(f, out, 1 << 20)
    finally:
        f.close()
    return Path(out.name)
