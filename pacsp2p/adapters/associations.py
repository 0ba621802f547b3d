"""Pooled pynetdicom associations with one archive, for the ``dimse`` adapter, and the
bounds on what such an archive may send.

Blocking: used from the adapter's thread pool only. A few idle associations are kept
per kind (echo, find, store of one SOP class and syntax, ...) and reused; one found
dead is replaced once.

What an archive sends is hostile input. pynetdicom reads a whole PDU of any length the
header claims, and keeps a DIMSE message's data set in memory until its last fragment;
its socket has no timeout once connected (a PDU that stops half way holds the thread,
and ``abort()`` waits for it, for ever). So every association's socket is read through
``Bounds`` (PS3.8 §9.3.5 P-DATA-TF, Annex E: each PDV's message control header says
command or data set, and last fragment or not): a PDU longer than the maximum we
declared (plus slack), a command set over ``MAX_COMMAND``, a data set over the
operation's ``data`` bound (``MAX_IDENTIFIER`` for a C-FIND identifier, the archive's
``max_dataset`` for a C-GET), or more than the operation's ``total`` bytes cut the
connection (the operation fails with ``why``); a socket read waits at most ``timeout``
seconds and a PDU must come at ``MIN_RATE`` bytes a second once ``timeout`` has passed.
A C-STORE data set (C-GET) is received into a file under the adapter's ``incoming``
directory as it arrives (pynetdicom's ``STORE_RECV_CHUNKED_DATASET``), never in memory.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
import time
from collections import defaultdict

from pynetdicom import AE, _config, dimse_messages, evt

from pacsp2p.dicom.requestor import guard

IDLE_PER_KIND = 4
DEFAULT_PDU = 4 << 20        # the maximum PDU we declare when ``max_pdu`` is 0 (no limit)
PDU_SLACK = 4096             # an archive's PDU may pass the declared maximum by this much
MAX_COMMAND = 64 << 10       # bytes of one command set
MAX_IDENTIFIER = 64 << 10    # bytes of one C-FIND identifier (a row)
MIN_RATE = 64 << 10          # bytes a second a PDU must average once ``timeout`` has passed
READ = 1 << 16


class DimseError(Exception):
    """The archive refused or failed a DIMSE operation."""


class Refused(Exception):
    """The archive answered what we refuse (past a bound): the association is aborted
    and the operation not tried again on another. Not a DimseError: the archive is
    there, this answer alone is refused (a retrieval fails this instance, not the
    source)."""


class Bounds:
    """What one association may receive; set per operation (``data``, ``total``) by its
    caller. ``why`` says why the connection was cut ("" if it was not)."""

    def __init__(self, pdu: int, timeout: float):
        self.pdu, self.timeout = pdu, timeout
        self.data = MAX_IDENTIFIER     # bytes of one message's data set
        self.total: int | None = None  # bytes left for the operation (None: no bound)
        self.why = ""
        self._body = None              # (type, length) of the PDU whose header was read
        self._command = self._dataset = 0

    def operation(self, data: int, total: int | None) -> None:
        self.data, self.total, self.why = data, total, ""

    def recv(self, sock, nr_bytes: int) -> bytearray:
        """pynetdicom's ``AssociationSocket.recv`` within bounds: a short answer (the
        connection is closed) when a bound is passed."""
        body, self._body = self._body, None
        if body is not None and body[1] != nr_bytes:
            body = None                  # pynetdicom did not read that PDU's body
        if body is not None:
            why = self._over(body[0], nr_bytes)
            if why:
                return self._cut(sock, why)
        data = bytearray(nr_bytes)
        view, got = memoryview(data), 0
        t0 = time.monotonic()
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], min(nr_bytes - got, READ))
                if not n:
                    return data[:got]
                got += n
                late = time.monotonic() - t0 - self.timeout
                if late > 0 and got < late * MIN_RATE:
                    return self._cut(sock, f"too slow ({got} bytes in "
                                           f"{late + self.timeout:.0f} s)")
        except OSError as e:
            if isinstance(e, (socket.timeout, TimeoutError)):
                return self._cut(sock, f"nothing received for {self.timeout:g} s")
            raise
        if body is None and nr_bytes == 6:          # a PDU's header: its body comes next
            self._body = struct.unpack(">BxL", data)
        elif body is not None and body[0] == 4:
            why = self._pdvs(data)
            if why:
                return self._cut(sock, why)
        return data

    def _over(self, pdu_type: int, length: int) -> str:
        if length > self.pdu + PDU_SLACK:
            return f"a PDU of {length} bytes (at most {self.pdu} declared)"
        if self.total is not None:
            self.total -= length + 6
            if self.total < 0:
                return "more bytes than the operation may receive"
        return ""

    def _pdvs(self, pdu: bytearray) -> str:
        """Count the command and data set bytes of the PDVs of one P-DATA-TF PDU."""
        pos, end = 0, len(pdu)
        while pos + 6 <= end:
            (length,) = struct.unpack_from(">L", pdu, pos)
            control = pdu[pos + 5]
            size = max(length - 2, 0)
            if control & 1:                      # a command set fragment
                self._command += size
                if self._command > MAX_COMMAND:
                    return f"a command set over {MAX_COMMAND} bytes"
                if control & 2:                  # its last: a new message begins
                    self._command = self._dataset = 0
            else:
                self._dataset += size
                if self._dataset > self.data:
                    return f"a data set over {self.data} bytes"
                if control & 2:
                    self._dataset = 0
            pos += 4 + length
        return ""

    def _cut(self, sock, why: str) -> bytearray:
        self.why = self.why or why
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return bytearray()


def _spool_file(*args, **kw):
    """pynetdicom's temporary file for a received C-STORE data set: in the spool
    directory of the association whose reader thread asks (``Associations``), else
    where pynetdicom would put it."""
    where = getattr(threading.current_thread(), "pacsp2p_spool", None)
    if where is not None and kw.get("dir") is None:
        kw["dir"] = where
    return tempfile.NamedTemporaryFile(*args, **kw)


_spooling: list = []     # one entry per started archive; the first holds pynetdicom's own


def spool_received() -> None:
    """C-STORE data sets received by this process's pynetdicom associations (the C-GETs
    of ``dimse`` archives; the facade does not use pynetdicom) go to a file as they come,
    while any archive that asked is running (``spool_released`` when it stops: these
    are pynetdicom's process-wide settings, which another user of pynetdicom in the
    same process — a test's SCP — must get back)."""
    _spooling.append((_config.STORE_RECV_CHUNKED_DATASET, dimse_messages.NamedTemporaryFile))
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spool_file


def spool_released() -> None:
    """An archive that called ``spool_received`` stopped: the last one puts pynetdicom's
    settings back as they were."""
    if _spooling:
        chunked, temporary = _spooling.pop()
        if not _spooling:
            _config.STORE_RECV_CHUNKED_DATASET = chunked
            dimse_messages.NamedTemporaryFile = temporary


def drop_partial(assoc) -> None:
    """Remove the file of a C-STORE data set that stopped half way on *assoc*."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    f = getattr(message, "_data_set_file", None)
    if f is not None:
        try:
            f.close()
            os.unlink(f.name)
        except OSError:
            pass


def _opened(event, bounds: Bounds, spool) -> None:
    """On our new connection, in its reader thread: TCP_NODELAY (a DIMSE request is two
    PDUs, command and identifier, and with Nagle's algorithm the second waits for the
    archive's delayed ACK: ~40 ms per message, a crawl of dcmqrscp ran 4x slower), a read
    timeout, reads within *bounds*, received data sets spooled under *spool*."""
    assoc = event.assoc
    assoc.pacsp2p_bounds = bounds
    threading.current_thread().pacsp2p_spool = spool
    holder = assoc.dul.socket
    sock = getattr(holder, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    sock.settimeout(bounds.timeout)
    holder.recv = lambda n: bounds.recv(holder.socket, n)


class Associations:
    """Associations from *calling_ae* to *ae_title* at *host*:*port*; received data sets
    are spooled under *spool* (a directory)."""

    def __init__(self, calling_ae: str, ae_title: str, host: str, port: int,
                 timeout: float, max_pdu: int, spool=None):
        self.calling_ae, self.ae_title, self.host, self.port = calling_ae, ae_title, host, port
        self.timeout, self.max_pdu = timeout, max_pdu or DEFAULT_PDU
        self.spool = None if spool is None else str(spool)
        self._idle: dict = defaultdict(list)   # kind -> idle associations
        self._lock = threading.Lock()

    def _ae(self) -> AE:
        ae = AE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        ae.maximum_pdu_size = self.max_pdu
        return ae

    def associate(self, contexts, roles=(), handlers=()):
        """A new association proposing *contexts* (DimseError if not established); its
        ``pacsp2p_bounds`` (``Bounds``) are set per operation."""
        where = f"{self.ae_title}@{self.host}:{self.port}"
        bounds = Bounds(self.max_pdu, self.timeout)
        try:
            assoc = self._ae().associate(
                self.host, self.port, contexts=contexts, ae_title=self.ae_title,
                ext_neg=list(roles) or None,
                evt_handlers=[(evt.EVT_CONN_OPEN, _opened, [bounds, self.spool]),
                              *handlers])
        except Exception as e:
            raise DimseError(f"association with {where} failed: {e}") from e
        if not assoc.is_established:
            why = ("rejected" if assoc.is_rejected else "aborted (no presentation context "
                   "accepted?)" if assoc.is_aborted else "no answer")
            raise DimseError(f"association with {where} failed: {bounds.why or why}")
        assoc.pacsp2p_bounds = bounds
        guard(assoc)            # pynetdicom's reactor thread must not take our responses
        return assoc

    def _borrow(self, kind, make):
        with self._lock:
            idle = self._idle.get(kind)
            while idle:
                assoc = idle.pop()
                if assoc.is_established:
                    return assoc, True
        return make(), False

    def _give_back(self, kind, assoc):
        if not assoc.is_established:
            return
        with self._lock:
            if len(self._idle[kind]) < IDLE_PER_KIND:
                self._idle[kind].append(assoc)
                return
        assoc.release()

    def run(self, kind, make, fn):
        """fn(assoc) on a pooled association of *kind* (*make*() makes one); once more on
        a fresh one if a reused one turns out dead."""
        assoc, reused = self._borrow(kind, make)
        assoc.pacsp2p_bounds.operation(MAX_IDENTIFIER, None)
        try:
            result = fn(assoc)
        except Exception as e:
            if assoc.is_established:
                assoc.abort()
            if not reused or isinstance(e, Refused):
                raise
            assoc = make()
            try:
                result = fn(assoc)
            except Exception:
                if assoc.is_established:
                    assoc.abort()
                raise
        self._give_back(kind, assoc)
        return result

    def close(self) -> None:
        """Release every idle association."""
        with self._lock:
            idle = [a for lst in self._idle.values() for a in lst]
            self._idle.clear()
        for assoc in idle:
            try:
                assoc.release()
            except Exception:
                pass
