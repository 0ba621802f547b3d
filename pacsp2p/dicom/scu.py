"""A Twisted-native DICOM Storage SCU: one association to a C-STORE SCP, run in the reactor.

Why not pynetdicom here: pynetdicom sends a C-STORE from its own threads, decodes and
re-encodes the data set, and busy-waits between PDUs. This SCU sends a stored instance's
data set bytes as they are on disk: the file is read in chunks in a thread pool (never in
the reactor), each chunk is framed into P-DATA-TF PDUs of the acceptor's maximum length and
written with one ``transport.write``. The protocol is a streaming producer for its
transport, so a slow acceptor pauses the reading and memory stays bounded (one chunk per
queued C-STORE plus the transport's buffer).

    scu = yield associate(reactor, host, port, called_ae="STORESCP", calling_ae="PACSP2P",
                          contexts=[(sop_class_uid, [transfer_syntax_uid, ...]), ...])
    status = yield scu.store(sop_class, sop_instance_uid, transfer_syntax, fileobj)
    yield scu.release()

``store`` may be called again before the previous C-STORE answered: requests are queued
and sent one at a time (one outstanding operation, as negotiated by default), and the next
instance's first chunk is read while the previous one is still on the wire.

Association PDUs are decoded with pynetdicom's PDU classes; the few PDUs we send
(A-ASSOCIATE-RQ, A-RELEASE-RQ/RP, A-ABORT, P-DATA-TF) are built by ``dicom.pdu`` (PS3.8
9.3), command sets by ``dicom.dimse`` (PS3.7).
Failures are Deferred errors: ``ConnectFailed``, ``AssociationRejected``,
``AssociationAborted`` (also a lost connection, or a TLS handshake the acceptor refused),
``DimseTimeout``. With ``tls`` (``dicom.tls.client_options``) the association runs over
DICOM TLS (PS3.15 annex B, BCP 195).
"""

from __future__ import annotations

import io
import struct
from collections import deque

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from twisted.internet import defer, protocol
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.protocols.policies import ProtocolWrapper
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from pacsp2p import threads
from pacsp2p.dicom.dimse import C_STORE_RSP, c_store_rq, command_elements  # noqa: F401
from pacsp2p.dicom.pdu import (PDU_HEAD, RELEASE_RP, RELEASE_RQ, abort_pdu,  # noqa: F401
                               associate_rq, frame, write_now)

log = Logger()

CHUNK = 1 << 20                  # bytes read from a file per thread hop
SEND_LIMIT = 4 << 20             # bytes per socket send (Twisted's default: 128 KB)
_PDU_HEAD = PDU_HEAD


class SCUError(Exception):
    """Base of the errors this SCU reports."""


class ConnectFailed(SCUError):
    """No TCP connection to the acceptor."""


class AssociationRejected(SCUError):
    """The acceptor answered A-ASSOCIATE-RJ."""

    def __init__(self, result: str, source: str, reason: str):
        super().__init__(f"association rejected ({result}) by {source}: {reason}")
        self.result, self.source, self.reason = result, source, reason


class AssociationAborted(SCUError):
    """The association ended before an operation finished (A-ABORT or connection lost)."""


class DimseTimeout(SCUError):
    """No answer (A-ASSOCIATE-AC, C-STORE-RSP or A-RELEASE-RP) in time: the association
    was aborted."""


class NotAccepted(SCUError):
    """No accepted presentation context for this SOP class and transfer syntax."""


# -- the shared reading pool -------------------------------------------------------------

def file_pool(reactor):
    """The thread pool that reads instance files for sending (one per reactor)."""
    return threads.pool(reactor, "dicom-send", 1, 4)


# -- reading (thread pool) --------------------------------------------------------------------

def _remaining(f) -> int:
    """Bytes from *f*'s position to its end (seeking: right for buffered files too)."""
    pos = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(pos)
    return end - pos


def _read(f, want: int | None) -> tuple[bytes, int]:
    """(chunk, bytes left after it) of *f*; *want* None: the first chunk. Closes *f* at
    the end. A file shorter than its size is an error."""
    try:
        left = _remaining(f) if want is None else want
        data = f.read(min(CHUNK, left))
        if len(data) != min(CHUNK, left):
            raise OSError(f"file ended early: {len(data)} of {min(CHUNK, left)} bytes")
        left -= len(data)
    except BaseException:
        f.close()
        raise
    if left == 0:
        f.close()
    return data, left


def _close(f) -> None:
    f.close()


# -- the protocol -------------------------------------------------------------------------------

class _Store:
    """One queued C-STORE: its command, its file, the chunk read ahead, its result."""

    def __init__(self, msg_id, cid, command, f, label):
        self.msg_id, self.cid, self.command, self.f, self.label = msg_id, cid, command, f, label
        self.result = defer.Deferred()
        self.chunk = None           # (bytes, left) read and not yet sent
        self.reading = False
        self.started = False        # command sent
        self.sent_all = False
        self.done = False


class StorageSCU(protocol.Protocol):
    """One association as requestor (see the module docstring). Use ``associate()``."""

    def __init__(self, reactor, pool, called_ae, calling_ae, contexts, acse_timeout,
                 dimse_timeout):
        self.reactor, self.pool = reactor, pool
        self.called_ae, self.calling_ae = called_ae, calling_ae
        self.proposed = [(2 * i + 1, a, list(t)) for i, (a, t) in enumerate(contexts)]
        self.acse_timeout, self.dimse_timeout = acse_timeout, dimse_timeout
        self.accepted: dict[tuple[str, str], int] = {}   # (abstract, ts) -> context id
        self.max_data = CHUNK                            # PDV data bytes per PDU
        self.established = defer.Deferred(self._give_up)
        self._buf = bytearray()
        self._cmd = bytearray()
        self._queue: deque[_Store] = deque()
        self._paused = False
        self._msg_id = 0
        self._timer = None
        self._awaited = None
        self._release = None
        self._error: Exception | None = None
        self.state = "connecting"

    # -- public ---------------------------------------------------------------------------
    def context_for(self, sop_class: str, transfer_syntax: str) -> int | None:
        return self.accepted.get((sop_class, transfer_syntax))

    def syntaxes_for(self, sop_class: str) -> list[str]:
        """Transfer syntaxes accepted for *sop_class*, in the order they were proposed."""
        return [ts for (a, ts) in self.accepted if a == sop_class]

    def store(self, sop_class: str, sop_instance_uid: str, transfer_syntax: str, f,
              originator_ae: str | None = None, originator_msg_id: int | None = None):
        """Deferred[C-STORE-RSP status] for the data set read from *f* (positioned at the
        data set's first byte, encoded in *transfer_syntax*; or the data set's bytes
        themselves, read already: bytes or a memoryview, not changed meanwhile). The SCU
        closes *f*."""
        if isinstance(f, (bytes, bytearray, memoryview)):
            data, f = f, None
        else:
            data = None
        if self.state != "established":
            self._close_file(f)
            return defer.fail(self._error or AssociationAborted(
                f"association to {self.called_ae} is {self.state}"))
        cid = self.context_for(sop_class, transfer_syntax)
        if cid is None:
            self._close_file(f)
            return defer.fail(NotAccepted(
                f"{self.called_ae} accepted no context for {sop_class} in {transfer_syntax}"))
        self._msg_id = self._msg_id % 0xFFFF + 1
        op = _Store(self._msg_id, cid, c_store_rq(self._msg_id, sop_class, sop_instance_uid,
                                                  originator_ae, originator_msg_id),
                    f, sop_instance_uid)
        self._queue.append(op)
        if data is not None:
            op.chunk = (data, 0)
        else:
            self._read_next(op, None)
        if len(self._queue) == 1:
            self._pump()
        return op.result

    def drop_queued(self) -> int:
        """Fail (with ``defer.CancelledError``) the C-STOREs not yet begun; their count."""
        dropped = [op for op in self._queue if not op.started]
        for op in dropped:
            self._queue.remove(op)
            self._finish(op, error=defer.CancelledError("not sent"))
        return len(dropped)

    def release(self):
        """Deferred[None]: A-RELEASE once the queued C-STOREs are answered."""
        if self.state != "established":
            return defer.succeed(None)
        self._release = defer.Deferred()
        if not self._queue:
            self._send_release()
        return self._release

    def _give_up(self, _established) -> None:
        """``established.cancel()`` (also cancelling ``associate()``'s Deferred while it
        waits for the A-ASSOCIATE response): A-ABORT, the connection closed."""
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and self.state not in ("closed", "aborted"):
            self.transport.write(abort_pdu())
            self._fail(AssociationAborted(f"association to {self.called_ae} aborted by us"),
                       "aborted")

    # -- connection -------------------------------------------------------------------------
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        # Twisted hands the kernel at most SEND_LIMIT (128 KB) per reactor iteration; a
        # data set is sent in fewer iterations (fewer chances for other threads to hold
        # the GIL between them) with a larger slice. Memory use is unchanged.
        sock = self.transport
        while isinstance(sock, ProtocolWrapper) and sock.transport is not None:
            sock = sock.transport               # under the TLS layer
        sock.SEND_LIMIT = SEND_LIMIT
        self.transport.registerProducer(self, True)
        self.state = "requested"
        self.transport.write(associate_rq(self.called_ae, self.calling_ae, self.proposed))
        self._arm(self.acse_timeout, "no A-ASSOCIATE response")

    def connectionLost(self, reason):
        self._disarm(hard=True)
        if self.state == "released":
            self.state = "closed"
            if self._release is not None and not self._release.called:
                self._release.callback(None)
            return
        self._fail(self._error or AssociationAborted(
            f"connection to {self.called_ae} lost: {reason.getErrorMessage()}"), "closed")

    def _hang_up(self) -> None:
        """Close the connection. Under TLS, our close_notify goes out but we do not wait
        for the acceptor's: DCMTK waits for the TCP close after A-RELEASE-RP instead of
        answering it, and each would wait for the other."""
        self.transport.loseConnection()
        sock = self.transport
        while isinstance(sock, ProtocolWrapper) and sock.transport is not None:
            sock = sock.transport
        if sock is not self.transport:
            sock.loseConnection()

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._pump()

    def stopProducing(self):
        self._paused = True

    # -- timers -------------------------------------------------------------------------------
    def _arm(self, seconds, what, label=""):
        """Abort unless disarmed within *seconds*: ``what`` (with *label*) is awaited.
        One timer, moved on from operation to operation (not a new one each time)."""
        if not seconds:
            return self._disarm(hard=True)
        self._awaited = (what, label, seconds)
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.reactor.callLater(seconds, self._timed_out)

    def _disarm(self, hard=False):
        """Nothing awaited now; *hard*: the timer itself is cancelled (else it is left to
        run out, or to be moved on by the next ``_arm``)."""
        self._awaited = None
        if hard:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self):
        self._timer = None
        if self._awaited is None:
            return
        what, label, seconds = self._awaited
        what = what.format(label)
        log.warn("association to {ae}: {what} within {s} s: aborting", ae=self.called_ae,
                 what=what, s=seconds)
        if self.transport is not None:
            self.transport.write(abort_pdu())
        self._fail(DimseTimeout(f"{self.called_ae}: {what} within {seconds} s"), "aborted")

    # -- failure ---------------------------------------------------------------------------------
    def _fail(self, error: Exception, state: str) -> None:
        if self.state in ("closed", "aborted"):
            return
        self.state = state
        self._error = error
        self._disarm(hard=True)
        if not self.established.called:
            self.established.errback(error)
        while self._queue:
            self._finish(self._queue.popleft(), error=error)
        if self._release is not None and not self._release.called:
            self._release.errback(error)
        if self.transport is not None:
            self._hang_up()

    def _finish(self, op: _Store, status=None, error=None) -> None:
        if op.done:
            return
        op.done = True
        if not op.sent_all and op.f is not None and not op.reading:
            self._close_file(op.f)          # a chunk read closes the file itself
        op.chunk = None
        if error is not None:
            op.result.errback(error)
        else:
            op.result.callback(status)

    def _close_file(self, f):
        if f is not None:
            self.pool.callInThread(_close, f)

    # -- sending -------------------------------------------------------------------------------
    def _read_next(self, op: _Store, left):
        op.reading = True
        d = deferToThreadPool(self.reactor, self.pool, _read, op.f, left)
        d.addCallbacks(self._chunk_read, self._read_failed, callbackArgs=(op,),
                       errbackArgs=(op,))

    def _chunk_read(self, chunk, op: _Store):
        op.reading = False
        if op.done:
            if chunk[1]:
                self._close_file(op.f)
            return
        op.chunk = chunk
        if self._queue and self._queue[0] is op:
            self._pump()

    def _read_failed(self, failure, op: _Store):
        op.reading = False
        if op.done:
            return
        log.error("cannot read {uid} for sending: {err}", uid=op.label,
                  err=failure.getErrorMessage())
        if op.started:      # part of the data set is on the wire: only an abort ends it
            self.abort()
        else:
            self._queue.remove(op)
            self._finish(op, error=failure.value)
            self._pump()

    def _pump(self):
        """Send what the head of the queue has ready, unless the transport is full."""
        if self.state != "established":
            return
        if not self._queue:
            if self._release is not None:
                self._send_release()
            return
        op = self._queue[0]
        out = []
        if not op.started:
            op.started = True
            out += frame(op.cid, op.command, self.max_data, command=True, last=True)
            self._arm(self.dimse_timeout, "C-STORE of {} made no progress", op.label)
        while op.chunk is not None and not op.sent_all and not self._paused:
            data, left = op.chunk
            op.chunk = None
            out += frame(op.cid, data, self.max_data, command=False, last=left == 0)
            if left:
                self._read_next(op, left)       # read ahead while this chunk drains
                if self._timer is not None:
                    self._timer.reset(self.dimse_timeout)
            else:
                op.sent_all = True
                self._arm(self.dimse_timeout, "no C-STORE-RSP for {}", op.label)
        if out:
            write_now(self.transport, out)

    def _send_release(self):
        self.state = "releasing"
        self.transport.write(RELEASE_RQ)
        self._arm(self.acse_timeout, "no A-RELEASE-RP")

    # -- receiving ---------------------------------------------------------------------------------
    def dataReceived(self, data: bytes):
        buf = self._buf
        buf += data
        while len(buf) >= 6:
            pdu_type, _, length = _PDU_HEAD.unpack_from(buf, 0)
            if len(buf) < 6 + length:
                return
            pdu = bytes(buf[:6 + length])
            del buf[:6 + length]
            self._pdu(pdu_type, pdu)
            if self.state in ("closed", "aborted"):
                return

    def _pdu(self, pdu_type: int, pdu: bytes):
        if pdu_type == 0x04 and self.state in ("established", "releasing"):
            self._p_data(pdu)
        elif pdu_type == 0x02 and self.state == "requested":
            self._accepted(pdu)
        elif pdu_type == 0x03 and self.state == "requested":
            rj = A_ASSOCIATE_RJ()
            rj.decode(pdu)
            self._fail(AssociationRejected(rj.result_str, rj.source_str, rj.reason_str),
                       "closed")
        elif pdu_type == 0x06 and self.state == "releasing":
            self._disarm()
            self.state = "released"
            self._hang_up()
        elif pdu_type == 0x05:
            self.transport.write(RELEASE_RP)
            self.state = "released"
            self._hang_up()
        elif pdu_type == 0x07:
            ab = A_ABORT_RQ()
            ab.decode(pdu)
            self._fail(AssociationAborted(
                f"{self.called_ae} aborted the association "
                f"(source {ab.source}, reason {ab.reason_diagnostic})"), "aborted")
        else:
            log.warn("unexpected PDU type {t} from {ae} in state {s}: aborting",
                     t=pdu_type, ae=self.called_ae, s=self.state)
            self.transport.write(abort_pdu(2, 2))
            self._fail(AssociationAborted(f"unexpected PDU type {pdu_type} from "
                                          f"{self.called_ae}"), "aborted")

    def _accepted(self, pdu: bytes):
        self._disarm()
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu)
        proposed = {cid: (a, ts) for cid, a, ts in self.proposed}
        for item in ac.presentation_context:
            if item.result == 0 and item.context_id in proposed and item.transfer_syntax:
                abstract, offered = proposed[item.context_id]
                ts = str(item.transfer_syntax)
                if ts in offered:
                    self.accepted.setdefault((abstract, ts), item.context_id)
        info = ac.user_information
        max_len = getattr(info, "maximum_length", None) if info is not None else None
        if max_len:
            self.max_data = max(max_len - 6, 1)
        self.state = "established"
        self.established.callback(self)

    def _p_data(self, pdu: bytes):
        pos, end = 6, len(pdu)
        while pos + 6 <= end:
            (length,) = struct.unpack_from(">I", pdu, pos)
            control = pdu[pos + 5]
            if control & 1:
                self._cmd += pdu[pos + 6:pos + 4 + length]
                if control & 2:
                    command, self._cmd = bytes(self._cmd), bytearray()
                    self._command(command)
            pos += 4 + length

    def _command(self, data: bytes):
        el = command_elements(data)
        field = struct.unpack("<H", el.get(0x0100, b"\0\0")[:2])[0]
        answered = struct.unpack("<H", el.get(0x0120, b"\0\0")[:2])[0]
        if field != C_STORE_RSP or not self._queue or self._queue[0].msg_id != answered \
                or not self._queue[0].sent_all:
            log.warn("unexpected DIMSE message {f:#06x} (answers {m}) from {ae}: aborting",
                     f=field, m=answered, ae=self.called_ae)
            self.abort()
            return
        self._disarm()
        status = struct.unpack("<H", el.get(0x0900, b"\0\0")[:2])[0]
        op = self._queue.popleft()
        self._pump()                    # the next data set goes out before any callback
        self._finish(op, status=status)


class _Factory(protocol.Factory):
    noisy = False                 # no 'Starting factory' line a C-MOVE or copy sent

    def __init__(self, make):
        self.make = make

    def buildProtocol(self, addr):
        return self.make()


@defer.inlineCallbacks
def associate(reactor, host: str, port: int, *, called_ae: str, calling_ae: str, contexts,
              connect_timeout: float = 10, acse_timeout: float = 30,
              dimse_timeout: float = 120, pool: ThreadPool | None = None, tls=None):
    """Deferred[StorageSCU]: an established association proposing *contexts*
    [(abstract syntax, [transfer syntaxes])] (at most 128); over TLS with the client
    options *tls* (``dicom.tls.client_options``)."""
    pool = pool or file_pool(reactor)
    if tls is not None:
        endpoint = SSL4ClientEndpoint(reactor, host, port, tls, timeout=connect_timeout)
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=connect_timeout)
    factory = _Factory(lambda: StorageSCU(reactor, pool, called_ae, calling_ae, contexts,
                                          acse_timeout, dimse_timeout))
    try:
        scu = yield endpoint.connect(factory)
    except Exception as e:
        raise ConnectFailed(f"cannot connect to {called_ae}@{host}:{port}: {e}") from e
    result = yield scu.established
    return result
