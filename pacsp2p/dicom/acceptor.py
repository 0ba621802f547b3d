"""A Twisted-native DICOM association acceptor (PS3.8 upper layer, PS3.7 DIMSE messages).

Runs entirely in the reactor: no association threads. One ``Association`` protocol per TCP
connection:

- admission (``dicom.admission``): a connection is *pending* until its A-ASSOCIATE-RQ is
  accepted; pending connections have a cap of their own (``max_pending``), every address
  one (``max_per_address``), and no connection is taken within ``fd_reserve`` file
  descriptors of the process limit — over a limit the oldest pending connection makes
  room. The ARTIM timer (PS3.8 9.1.5, ``artim_timeout``) closes a connection that sends no
  A-ASSOCIATE-RQ, and one that does not close after our A-ABORT, A-ASSOCIATE-RJ or
  A-RELEASE-RP.
- association establishment (``dicom.negotiation``): the raw A-ASSOCIATE-RQ is checked
  (AE titles, UIDs, context IDs, the requestor's maximum PDU: at least ``min_peer_pdu``
  unless 0), decoded with pynetdicom's PDU classes, its presentation contexts negotiated
  against one shared list of supported contexts. A calling AE title not in
  ``allowed_calling_aes`` gets A-ASSOCIATE-RJ (rejected-permanent, service user, calling
  AE title not recognized); past ``max_associations`` associations (``max_per_address``
  of one host) rejected-transient (service provider, local limit exceeded). Then the
  ``policy`` the listener was given (the facade's: called AE title, known modalities and
  their addresses), if any, decides: it returns what the association may do (kept as
  ``grant``, opaque here) or raises ``negotiation.Refused`` (A-ASSOCIATE-RJ). A request
  of which no presentation context is accepted (none proposed, or only SOP classes we do
  not serve) gets A-ASSOCIATE-RJ (rejected-permanent, service user, no reason) as DCMTK's
  SCPs do, not an association that can do nothing and holds a slot.
- TLS (``dicom.tls``): the same protocol serves a TLS port; ``tls`` says whether this
  connection came through it, ``peer_certificate`` names the client certificate. A
  handshake that fails (no client certificate, one from another CA, an old protocol
  version) closes the connection with one rate-limited log line; ARTIM covers it too.
- an idle timeout (``idle_timeout``) aborts an association with no operation running
  that sent no response and received fewer than ``PROGRESS`` bytes for that long (a
  requestor dripping a byte now and then holds no association slot for ever: a
  slowloris), or whose requestor has not read what we sent for that long;
  A-RELEASE and A-ABORT both ways; TCP_NODELAY on every accepted socket.
- P-DATA reassembly straight from the byte stream (PS3.8 9.3.5, annex E): a PDU is never
  buffered whole; command fragments are gathered (at most ``MAX_COMMAND`` bytes), data
  set fragments go to the message's sink as they arrive — for a C-STORE a file written
  in a thread pool (``dicom.incoming``, at most ``max_dataset`` bytes), for the other
  services a small in-memory buffer (``max_identifier``); fragments of a few bytes are
  gathered first (a sink never queues an object per handful of bytes). At most
  ``MAX_QUEUED`` requests wait on one association.
- An ``observer`` (the facade's audit trail, metrics), if given, is told of each association
  ``established``, ``rejected`` (why) and ``ended`` (released, aborted, lost, timed out).
- Complete messages go to the DIMSE services (``services.request``); requests are handled
  one at a time in arrival order (no asynchronous operations window is negotiated),
  C-CANCEL and the C-STORE-RSPs of C-GET sub-operations reach the request they belong to.

Whatever arrives, the answer is an A-ASSOCIATE-RJ, an A-ABORT or a DIMSE status, never an
unhandled exception; log lines are one per event, values the requestor chose are shown
bounded (``validate.shown``), and each kind of event is rate-limited (``LogLimit``).
"""

from __future__ import annotations

import threading
import traceback
from collections import deque

from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.logger import LogLevel, Logger
from twisted.protocols.policies import ProtocolWrapper
from zope.interface import implementer

from pacsp2p.dicom import negotiation
from pacsp2p.dicom.admission import Admission, FdBudget, LogLimit
from pacsp2p.dicom.messages import MAX_IDENTIFIER, Messages
from pacsp2p.dicom.negotiation import MIN_PEER_PDU, reject_pdu
from pacsp2p.dicom.pdu import (A_ABORT, A_ASSOCIATE_RQ as RQ, A_RELEASE_RP, A_RELEASE_RQ,
                               P_DATA_TF, PDU_HEAD, PDV_HEAD, RELEASE_RP, abort_pdu, frame,
                               own_socket, send_from_thread, send_now, write_now)
from pacsp2p.dicom.tls import handshake_error, peer_name, verify_result
from pacsp2p.flow import ReadHolds
from pacsp2p.validate import shown

log = Logger()

ARTIM = 30.0                 # seconds to wait for the A-ASSOCIATE-RQ (or for a close)
IDLE = 60.0                  # seconds without traffic (and no operation running)
MAX_ASSOC_PDU = 1 << 20      # largest association PDU (A-ASSOCIATE-RQ) we read
MAX_DATASET = 4 << 30        # largest C-STORE data set
MAX_PENDING = 64             # connections without an association yet
MAX_PER_ADDRESS = 16         # connections (pending or not) from one address
FD_RESERVE = 64              # file descriptors kept free for everything else
SEND_FRAGMENT = 1 << 20      # PDV data bytes per PDU sent to a requestor without a limit
SEND_LIMIT = 4 << 20         # bytes per socket send (Twisted's default: 128 KB)
PROGRESS = 64 << 10          # bytes received that restart the idle timeout
LATE = 5.0                   # seconds a timer fired past its time: we were stalled


def _socket(transport):
    """The TCP transport under any TLS layer of *transport*."""
    while isinstance(transport, ProtocolWrapper) and transport.transport is not None:
        transport = transport.transport
    return transport


@implementer(IHandshakeListener)
class Association(ReadHolds, Messages, protocol.Protocol):
    """One association as acceptor. ``services`` handles its DIMSE messages."""

    def __init__(self, factory, host: str = "?"):
        self.factory = factory
        self.reactor = factory.reactor
        self.host = host
        self.state = "idle"            # idle -> established -> released | aborted | ...
        self.calling_ae = self.called_ae = ""
        self.peer = host
        self.tls = False               # came through the TLS port
        self.handshake_done = False
        self.grant = None              # what the policy returned for this association
        self.established_at = None     # reactor time of the A-ASSOCIATE-AC
        self.ended_by = ""             # why it ended, in words (for the observer)
        self.accepted: dict = {}       # context id -> PresentationContext
        self.max_data = SEND_FRAGMENT  # PDV data bytes per PDU we send
        self.paused = False            # our transport's write buffer is full
        self._corked: list | None = None   # what is sent while corked (``cork``)
        self._resume_waiters: list = []
        self._ops: deque = deque()     # requests in arrival order; the first one runs
        # stream parser
        self._acc = bytearray()
        self._need, self._step = 6, "pdu"
        self._pdu_type = 0
        self._pdu_left = 0
        self._pdv_left = 0
        self._pdv = (0, 0)
        self._cmd = bytearray()
        self._cmd_cx = None
        self._data = None              # (context id, sink, op) of the data set expected
        self._data_size = self._data_limit = 0
        self._small = bytearray()      # small data fragments gathered (``_feed``)
        self._timer = None
        self._closer = None            # ARTIM after we asked the transport to close
        self._heard = 0                # bytes received since the idle timeout restarted
        self._own, self._own_lock = None, threading.Lock()   # ``send_from_thread``'s

    # -- connection ----------------------------------------------------------------------
    def connectionMade(self):
        self.tls = ISSLTransport.providedBy(self.transport)
        self.transport.setTcpNoDelay(True)
        _socket(self.transport).SEND_LIMIT = SEND_LIMIT
        self.transport.registerProducer(self, True)
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', self.host)}:{getattr(peer, 'port', '?')}"
        self._arm(self.factory.artim_timeout, "no A-ASSOCIATE-RQ")

    def connectionLost(self, reason):
        with self._own_lock:
            own, self._own = self._own, None
        if own is not None:
            own.close()
        self.factory.admission.forget(self)
        self._disarm()
        if self._closer is not None and self._closer.active():
            self._closer.cancel()
        was = self.state
        self.state = "closed"
        if self.tls and not self.handshake_done and was == "idle":
            raw = reason.getErrorMessage()
            self._log("tls refused", LogLevel.warn,
                      "TLS connection from {peer} closed before its handshake completed: "
                      "{why}", why=handshake_error(raw, verify_result(self.transport))
                      or shown(raw))
        if self._data is not None:
            op, self._data = self._data[2], None
            if op is not None:
                op.lost()
        for op in list(self._ops):
            op.lost()
        self._ops.clear()
        if was == "established":
            self._log("association lost", LogLevel.info,
                      "association from {ae}@{peer} lost: {why}",
                      why=shown(reason.getErrorMessage()))
        if self.established_at is not None:
            how = was if was in ("released", "aborted") else "lost"
            self._observe("ended", how, self.ended_by or (
                shown(reason.getErrorMessage()) if how == "lost" else how))
        self._wake()

    @property
    def open(self) -> bool:
        return self.state == "established"

    def handshakeCompleted(self):
        self.handshake_done = True

    @property
    def peer_certificate(self) -> str | None:
        """The common name of the verified TLS client certificate, or None."""
        return peer_name(self.transport) if self.tls and self.handshake_done else None

    def _observe(self, event: str, *args) -> None:
        """Tell the factory's observer, if any; never at the cost of the association."""
        observer = self.factory.observer
        if observer is not None:
            try:
                getattr(observer, event)(self, *args)
            except Exception:
                log.failure("association observer failed on {event}", event=event)

    def _log(self, kind: str, level, fmt: str, **kw) -> None:
        """One log line (rate-limited per *kind*) about this association."""
        self.factory.log_limit(kind, level, fmt, ae=self.calling_ae or "?", peer=self.peer,
                               **kw)

    # producer interface: Twisted pauses us while the transport's write buffer is full;
    # what the requestor sends waits meanwhile (one sending C-ECHOs and reading none of
    # the responses grew our memory by them)
    def pauseProducing(self):
        if not self.paused:
            self.pause_reading()
        self.paused = True

    def resumeProducing(self):
        if self.paused:
            self.resume_reading()
        self.paused = False
        self._touch()
        self._wake()

    def stopProducing(self):
        self.pauseProducing()

    def _wake(self):
        waiters, self._resume_waiters = self._resume_waiters, []
        for fn in waiters:
            fn()

    def when_writable(self, fn) -> None:
        """Call *fn* once the transport takes more data (at once if it does now)."""
        if not self.paused or self.state != "established":
            fn()
        else:
            self._resume_waiters.append(fn)

    def reading_allowed(self) -> bool:
        return self.state != "closed"

    # -- timers ---------------------------------------------------------------------------
    def _arm(self, seconds, what):
        self._disarm()
        self._timer = self.reactor.callLater(seconds, self._timed_out, what, seconds)

    def _disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _touch(self):
        self._heard = 0
        if self.state == "established":
            if self._timer is not None and self._timer.active():
                self._timer.reset(self.factory.idle_timeout)
            else:
                self._arm(self.factory.idle_timeout, "idle")

    def _timed_out(self, what, seconds):
        now = self.reactor.seconds()
        due, self._timer = (self._timer.getTime() if self._timer else now), None
        if self.state == "established" and (now - due > LATE or not self.paused and
                                            (self._ops or self.reading_held())):
            self._arm(seconds, what)    # our operation or write is running, or this
            return                      # process stood still: read what waits first
        if self.state == "established" and self.paused:
            what = "nothing read by the requestor"
        elif self.state == "established" and self._heard:
            what = f"only {self._heard} bytes received"
        self._log("timeout", LogLevel.warn,
                  "association from {ae}@{peer}: {what} for {s} s: closing",
                  what=what, s=seconds)
        self.ended_by = f"timed out: {what} for {seconds:g} s"
        if self.state == "idle":               # ARTIM (PS3.8 9.1.5): just close
            self.state = "timed out"
            self._close()
        else:
            self.abort()

    def _close(self) -> None:
        """Close the transport; if the requestor does not let it close (it reads nothing),
        drop it after ARTIM."""
        self._disarm()
        self.transport.loseConnection()
        if self._closer is None:
            self._closer = self.reactor.callLater(self.factory.artim_timeout,
                                                  self.transport.abortConnection)

    def evict(self, limit: str) -> None:
        """Close this pending connection at once to make room for a new one."""
        self.factory.admission.forget(self)
        self.state = "evicted"
        self._disarm()
        self._log("evicted", LogLevel.warn,
                  "connection from {peer} closed before its A-ASSOCIATE-RQ to make room "
                  "({limit})", limit=limit)
        if self.transport is not None:
            self.transport.abortConnection()

    # -- sending --------------------------------------------------------------------------
    def send(self, context_id: int, command: bytes, data=None, now: bool = False) -> None:
        """One DIMSE message: its command set and, if any, its data set (bytes). *now*
        (a final response: the requestor waits for it): to the kernel at once when
        nothing is queued before it (``pdu.write_now``), not at the reactor's next turn."""
        if self.state != "established":
            return
        parts = frame(context_id, command, self.max_data, command=True, last=True)
        if data is not None:
            parts += frame(context_id, data, self.max_data, command=False, last=True)
        if now and self._corked is None:
            write_now(self.transport, parts)
        else:
            self._out(parts)
        self._touch()

    def send_from_thread(self, context_id: int, command: bytes) -> bool:
        """A final response without a data set, from a thread that is not the reactor's
        (the one that made a C-STORE's copy durable: the requestor hears without waiting
        for a hop to the reactor): ``pdu.send_from_thread``; False, nothing sent, where it
        is not safe (TLS, corked, something queued), on a duplicate of the socket
        (``pdu.own_socket``). The reactor then calls ``sent``."""
        parts = frame(context_id, command, self.max_data, command=True, last=True)
        with self._own_lock:           # (connectionLost closes it under this lock)
            if self._own is None or self.state != "established" or self._corked is not None:
                return False
            return send_from_thread(self.transport, self._own, parts, self.reactor)

    def sent(self) -> None:
        """Reactor: a response ``send_from_thread`` sent (the idle timeout restarts)."""
        self._touch()

    def send_data(self, context_id: int, data, last: bool) -> None:
        """A data set fragment (a C-STORE sub-operation of C-GET)."""
        if self.state == "established":
            self._out(frame(context_id, data, self.max_data, command=False, last=last))

    def _out(self, parts: list) -> None:
        if self._corked is not None:
            self._corked += parts
        else:
            self.transport.write(b"".join(parts))

    def cork(self) -> None:
        """Hold what is sent (in order) until ``uncork``: then it goes to the kernel at
        once, in one gathering write (a C-GET's Pending response and its next C-STORE)."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        parts, self._corked = self._corked, None
        if parts and self.state == "established":
            write_now(self.transport, parts)

    def flush(self) -> None:
        """What was sent so far goes to the kernel now, not at the reactor's next turn
        (while corked: at the uncork)."""
        if self.state == "established" and self._corked is None:
            send_now(self.transport)

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """A-ABORT and close."""
        if self.transport is not None and self.state not in (
                "closed", "aborted", "evicted", "released", "rejected", "timed out"):
            self.transport.write(abort_pdu(source, reason))
            self.state = "aborted"
            self._close()

    def _protocol_error(self, why: str, reason: int = 2, source: int = 2) -> None:
        self._log("protocol error", LogLevel.warn,
                  "association from {ae}@{peer}: {why}: aborting", why=why)
        self.ended_by = self.ended_by or f"aborted: {why}"
        self.abort(source, reason)

    # -- the byte stream ------------------------------------------------------------------
    def dataReceived(self, data: bytes):
        try:
            self._heard += len(data)
            if self._heard >= PROGRESS:
                self._touch()
            self._stream(data)
        except _Abort:
            return
        except Exception as e:                 # a bug: one line, A-ABORT, never unhandled
            where = traceback.extract_tb(e.__traceback__)[-1]
            self._protocol_error(f"internal error {type(e).__name__}: {shown(str(e))} "
                                 f"at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}",
                                 reason=0)

    def _stream(self, data: bytes):
        mv = memoryview(data)
        pos, n = 0, len(data)
        while pos < n and self.state in ("idle", "established"):
            if self._pdv_left:
                take = min(self._pdv_left, n - pos)
                self._pdv_left -= take
                end_of_pdv = self._pdv_left == 0
                if end_of_pdv:
                    self._need, self._step = 6, ("pdv" if self._pdu_left else "pdu")
                self._fragment(mv[pos:pos + take], end_of_pdv)
                pos += take
                continue
            need = self._need
            if not self._acc and n - pos >= need:
                chunk = mv[pos:pos + need]
                pos += need
            else:
                take = min(need - len(self._acc), n - pos)
                self._acc += mv[pos:pos + take]
                pos += take
                if len(self._acc) < need:
                    return
                chunk, self._acc = self._acc, bytearray()
            self._parsed(chunk)

    def _parsed(self, chunk) -> None:
        step = self._step
        if step == "pdu":
            pdu_type, _, length = PDU_HEAD.unpack_from(chunk, 0)
            if pdu_type == P_DATA_TF:
                if self.state != "established":
                    self._fail(f"P-DATA-TF in state {self.state}")
                if length < 6:
                    self._fail("P-DATA-TF without a PDV", 6)
                self._pdu_left = length
                self._need, self._step = 6, "pdv"
                return
            if pdu_type == RQ:
                if self.state != "idle":
                    self._fail(f"A-ASSOCIATE-RQ in state {self.state}")
                if length > MAX_ASSOC_PDU:
                    self._fail(f"A-ASSOCIATE-RQ of {length} bytes", 6)
            elif pdu_type in (A_RELEASE_RQ, A_RELEASE_RP, A_ABORT):
                if length != 4:
                    self._fail(f"PDU type {pdu_type:#04x} of {length} bytes", 6)
            else:
                self._fail(f"unexpected PDU type {pdu_type:#04x} in state {self.state}",
                           1 if pdu_type > 7 or pdu_type == 0 else 2)
            self._pdu_type = pdu_type
            self._head = bytes(chunk)
            if length == 0:
                self._pdu(pdu_type, self._head)
            else:
                self._need, self._step = length, "body"
        elif step == "body":
            self._need, self._step = 6, "pdu"
            self._pdu(self._pdu_type, self._head + bytes(chunk))
        else:                                           # a PDV item header
            item_len, cid, control = PDV_HEAD.unpack_from(chunk, 0)
            if item_len < 2 or item_len + 4 > self._pdu_left:
                self._fail("PDV item length outside its PDU", 6)
            self._pdu_left -= 4 + item_len
            self._pdv = (cid, control)
            self._pdv_left = item_len - 2
            if self._pdv_left == 0:
                self._need, self._step = 6, ("pdv" if self._pdu_left else "pdu")
                self._fragment(b"", True)

    def _fail(self, why: str, reason: int = 2):
        self._protocol_error(why, reason)
        raise _Abort()

    def _over_limit(self, why: str):
        """A local limit: A-ABORT (service user) and stop reading."""
        self._log("limit", LogLevel.warn, "association from {ae}@{peer}: {why}: aborting",
                  why=why)
        self.ended_by = f"aborted: {why}"
        self.abort(0, 0)
        raise _Abort()

    # -- association PDUs -----------------------------------------------------------------
    def _pdu(self, pdu_type: int, pdu: bytes) -> None:
        if pdu_type == RQ and self.state == "idle":
            self._associate(pdu)
        elif pdu_type == A_RELEASE_RQ and self.state == "established":
            self._disarm()
            self.state = "released"
            for op in list(self._ops):
                op.lost()
            self._ops.clear()
            self.transport.write(RELEASE_RP)
            self._close()
            raise _Abort()
        elif pdu_type == A_ABORT:
            if self.state == "established":
                self._log("aborted by requestor", LogLevel.info,
                          "association from {ae}@{peer} aborted by the requestor")
                self.ended_by = "aborted by the requestor"
            self.state = "aborted"
            self._close()
            raise _Abort()
        elif pdu_type == A_RELEASE_RP:
            self.state = "released"
            self._close()
            raise _Abort()
        else:
            self._fail(f"unexpected PDU type {pdu_type:#04x} in state {self.state}")

    def _associate(self, pdu: bytes) -> None:
        self._disarm()
        f = self.factory
        try:
            req = negotiation.check_request(pdu, f.min_peer_pdu)
        except negotiation.Refused as r:
            self._reject(r.result, r.source, r.reason, str(r))
        except negotiation.Malformed as e:
            self._fail(f"A-ASSOCIATE-RQ: {e}", 6)
        self.calling_ae, self.called_ae = req.calling_ae, req.called_ae
        if f.allowed_calling_aes and self.calling_ae not in f.allowed_calling_aes:
            self._reject(1, 1, 3, "calling AE not allowed")
        if why := f.admission.full(self.host, f.max_associations):    # or from its host
            self._reject(2, 3, 2, why)
        if f.policy is not None:
            try:
                self.grant = f.policy(self)
            except negotiation.Refused as r:
                self._reject(r.result, r.source, r.reason, str(r))
        try:
            prim = negotiation.decode(pdu)
            results, ac_roles = negotiation.negotiate(prim, f.supported, f.choose)
            ac = negotiation.accept_pdu(prim, results, ac_roles, f.max_pdu)
        except negotiation.Malformed as e:
            self._fail(f"A-ASSOCIATE-RQ: {e}", 6)
        except Exception as e:
            self._fail(f"cannot negotiate ({type(e).__name__}: {shown(str(e))})", 0)
        self.accepted = {cx.context_id: cx for cx in results if cx.result == 0}
        if not self.accepted:          # nothing it could ask: no slot held for it (DCMTK)
            self._reject(1, 1, 1, f"no presentation context accepted of {len(results)}")
        if req.max_pdu:
            self.max_data = max(req.max_pdu - 6, 1)
        self.state = "established"
        self._own = own_socket(self.transport)
        self.established_at = self.reactor.seconds()
        f.admission.establish(self)
        self.transport.write(ac)
        self._observe("established")
        self._arm(f.idle_timeout, "idle")
        self._heard = 0

    def _reject(self, result: int, source: int, reason: int, why: str) -> None:
        self._log("rejected", LogLevel.warn,
                  "association from {ae}@{peer} rejected: {why}", why=why)
        self._observe("rejected", why, result, source, reason)
        self.state = "rejected"
        self.transport.write(reject_pdu(result, source, reason))
        self._close()
        raise _Abort()


class _Abort(Exception):
    """Stop reading: the association ended or is being aborted."""


class AcceptorFactory(protocol.Factory):
    """The listening side: shared settings of all associations, and the admission of
    new connections (``dicom.admission``). Every limit has a default; the facade passes
    its ``[facade]`` settings and its association ``policy``. One factory may serve a
    plain and a TLS port (``dicom.tls.TLSFactory``) with one set of limits."""

    noisy = False

    def __init__(self, reactor, services, supported, *, max_pdu: int = 0,
                 max_associations: int = 32, allowed_calling_aes=(),
                 max_pending: int = MAX_PENDING, max_per_address: int = MAX_PER_ADDRESS,
                 artim_timeout: float = ARTIM, idle_timeout: float = IDLE,
                 max_dataset: int = MAX_DATASET, max_identifier: int = MAX_IDENTIFIER,
                 fd_reserve: int = FD_RESERVE, min_peer_pdu: int = MIN_PEER_PDU,
                 policy=None, observer=None, choose=None):
        self.reactor = reactor
        self.choose = choose          # a context's syntax (``negotiation.negotiate``)
        self.policy = policy          # callable(association) -> grant, or raises Refused
        self.observer = observer      # established/rejected/ended(association, ...)
        self.services = services
        self.supported = supported
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.allowed_calling_aes = {a.strip() for a in allowed_calling_aes}
        self.artim_timeout, self.idle_timeout = artim_timeout, idle_timeout
        self.max_dataset, self.max_identifier = max_dataset, max_identifier
        self.min_peer_pdu = min_peer_pdu
        self.log_limit = LogLimit(reactor)
        self.admission = Admission(FdBudget(reactor, fd_reserve), max_pending,
                                   max_per_address)

    @property
    def associations(self) -> list:
        """Every open connection, pending or established (to abort them at stop)."""
        return self.admission.all()

    def buildProtocol(self, addr):
        host = str(getattr(addr, "host", "?"))
        room, victim, limit = self.admission.admit(host)
        if victim is not None:
            victim.evict(limit)
        if not room:
            self.log_limit("refused", LogLevel.warn,
                           "connection from {host} refused at once ({limit})",
                           host=host, limit=limit)
            return None
        p = Association(self, host)
        self.admission.add(p)
        return p
