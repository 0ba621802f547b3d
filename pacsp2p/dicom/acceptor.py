"""A Twisted-native DICOM association acceptor (PS3.8 upper layer, PS3.7 DIMSE messages).

Runs entirely in the reactor: no association threads. One ``Association`` protocol per TCP
connection:

- association establishment (PS3.8 9.3.2-9.3.4): the A-ASSOCIATE-RQ is decoded with
  pynetdicom's PDU classes, presentation contexts and SCP/SCU roles are negotiated with
  ``pynetdicom.presentation.negotiate_as_acceptor`` against one shared list of supported
  contexts, the A-ASSOCIATE-AC is encoded by pynetdicom. A calling AE title not in
  ``allowed_calling_aes`` gets A-ASSOCIATE-RJ (rejected-permanent, service user, calling
  AE title not recognized); more than ``max_associations`` at once get
  rejected-transient (service provider, local limit exceeded). Any called AE is accepted.
- ARTIM (no A-ASSOCIATE-RQ in time) and idle timeouts abort the connection; A-RELEASE and
  A-ABORT both ways; TCP_NODELAY on every accepted socket.
- P-DATA reassembly straight from the byte stream (PS3.8 9.3.5, annex E): a PDU is never
  buffered whole; command fragments are gathered (they are small), data set fragments go
  to the message's sink as they arrive — for a C-STORE a file written in a thread pool
  (``dicom.incoming``), for the other services a small in-memory buffer.
- Complete messages go to the DIMSE services of ``dicom.services``; requests are handled
  one at a time in arrival order (no asynchronous operations window is negotiated),
  C-CANCEL and the C-STORE-RSPs of C-GET sub-operations reach the request they belong to.
"""

from __future__ import annotations

from collections import deque

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification,
                                       MaximumLengthNotification,
                                       SCP_SCU_RoleSelectionNegotiation)
from pynetdicom.presentation import negotiate_as_acceptor
from twisted.internet import protocol
from twisted.logger import Logger

from pacsp2p.dicom import dimse
from pacsp2p.dicom.pdu import (A_ABORT, A_ASSOCIATE_RQ as RQ, A_RELEASE_RP, A_RELEASE_RQ,
                               IMPLEMENTATION_UID, IMPLEMENTATION_VERSION, P_DATA_TF,
                               PDU_HEAD, PDV_HEAD, RELEASE_RP, abort_pdu, frame)
from pacsp2p.flow import ReadHolds

log = Logger()

ARTIM = 30.0                 # seconds to wait for the A-ASSOCIATE-RQ
IDLE = 60.0                  # seconds without traffic (and no operation running)
MAX_ASSOC_PDU = 1 << 20      # largest association PDU (A-ASSOCIATE-RQ, ...) we read
MAX_IDENTIFIER = 16 << 20    # largest in-memory data set (identifiers)
SEND_FRAGMENT = 1 << 20      # PDV data bytes per PDU sent to a requestor without a limit
SEND_LIMIT = 4 << 20         # bytes per socket send (Twisted's default: 128 KB)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return b"\x03\x00\x00\x00\x00\x04\x00" + bytes((result, source, reason))


class MemorySink:
    """A small data set (identifier) gathered in memory."""

    def __init__(self):
        self.data = bytearray()

    def feed(self, piece) -> None:
        self.data += piece
        if len(self.data) > MAX_IDENTIFIER:
            raise ValueError(f"data set larger than {MAX_IDENTIFIER} bytes")


class DiscardSink:
    """Where the data set of a refused request goes: nowhere."""

    def feed(self, piece) -> None:
        """Drop *piece*."""


class Association(ReadHolds, protocol.Protocol):
    """One association as acceptor. ``services`` handles its DIMSE messages."""

    def __init__(self, factory):
        self.factory = factory
        self.reactor = factory.reactor
        self.state = "idle"            # idle -> established -> released | aborted
        self.calling_ae = self.called_ae = ""
        self.peer = ""
        self.accepted: dict = {}       # context id -> PresentationContext
        self.max_data = SEND_FRAGMENT  # PDV data bytes per PDU we send
        self.paused = False            # our transport's write buffer is full
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
        self._timer = None

    # -- connection ----------------------------------------------------------------------
    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.SEND_LIMIT = SEND_LIMIT
        self.transport.registerProducer(self, True)
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.factory.associations.add(self)
        self._arm(ARTIM, "no A-ASSOCIATE-RQ")

    def connectionLost(self, reason):
        self.factory.associations.discard(self)
        self._disarm()
        was = self.state
        self.state = "closed"
        if self._data is not None:
            _, sink, op = self._data
            self._data = None
            if op is not None:
                op.lost()
        for op in list(self._ops):
            op.lost()
        self._ops.clear()
        if was == "established":
            log.info("association from {ae}@{peer} lost: {why}", ae=self.calling_ae,
                     peer=self.peer, why=reason.getErrorMessage())
        self._wake()

    @property
    def open(self) -> bool:
        return self.state == "established"

    # producer interface: Twisted pauses us while the transport's write buffer is full
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._wake()

    def stopProducing(self):
        self.paused = True

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
        if self.state == "established":
            if self._timer is not None and self._timer.active():
                self._timer.reset(IDLE)
            else:
                self._arm(IDLE, "idle")

    def _timed_out(self, what, seconds):
        self._timer = None
        if self.state == "established" and self._ops:
            self._arm(IDLE, "idle")            # an operation is running: not idle
            return
        log.warn("association from {ae}@{peer}: {what} for {s} s: aborting",
                 ae=self.calling_ae or "?", peer=self.peer, what=what, s=seconds)
        self.abort()

    # -- sending --------------------------------------------------------------------------
    def send(self, context_id: int, command: bytes, data=None) -> None:
        """One DIMSE message: its command set and, if any, its data set (bytes)."""
        if self.state != "established":
            return
        parts = frame(context_id, command, self.max_data, command=True, last=True)
        if data is not None:
            parts += frame(context_id, data, self.max_data, command=False, last=True)
        self.transport.write(b"".join(parts))
        self._touch()

    def send_data(self, context_id: int, data, last: bool) -> None:
        """A data set fragment (a C-STORE sub-operation of C-GET)."""
        if self.state == "established":
            self.transport.write(b"".join(
                frame(context_id, data, self.max_data, command=False, last=last)))

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """A-ABORT and close."""
        if self.transport is not None and self.state not in ("closed", "aborted"):
            self.transport.write(abort_pdu(source, reason))
            self.state = "aborted"
            self.transport.loseConnection()

    def _protocol_error(self, why: str, reason: int = 2) -> None:
        log.warn("association from {ae}@{peer}: {why}: aborting", ae=self.calling_ae or "?",
                 peer=self.peer, why=why)
        self.abort(2, reason)

    # -- the byte stream ------------------------------------------------------------------
    def dataReceived(self, data: bytes):
        self._touch()
        mv = memoryview(data)
        pos, n = 0, len(data)
        try:
            while pos < n and self.state in ("idle", "established", "releasing"):
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
        except _Abort:
            return

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
            else:
                if length > MAX_ASSOC_PDU:
                    self._fail(f"PDU type {pdu_type:#04x} of {length} bytes", 6)
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
            self.transport.loseConnection()
            raise _Abort()
        elif pdu_type == A_ABORT:
            log.info("association from {ae}@{peer} aborted by the requestor",
                     ae=self.calling_ae or "?", peer=self.peer)
            self.state = "aborted"
            self.transport.loseConnection()
            raise _Abort()
        elif pdu_type == A_RELEASE_RP:
            self.transport.loseConnection()
            raise _Abort()
        else:
            self._fail(f"unexpected PDU type {pdu_type:#04x} in state {self.state}",
                       1 if pdu_type > 7 else 2)

    def _associate(self, pdu: bytes) -> None:
        self._disarm()
        f = self.factory
        try:
            rq = A_ASSOCIATE_RQ()
            rq.decode(pdu)
            prim = rq.to_primitive()
        except Exception as e:
            self._fail(f"undecodable A-ASSOCIATE-RQ: {e}", 6)
        self.calling_ae = str(prim.calling_ae_title).strip()
        self.called_ae = str(prim.called_ae_title).strip()
        if f.allowed_calling_aes and self.calling_ae not in f.allowed_calling_aes:
            log.warn("association from {ae}@{addr} rejected (calling AE not allowed)",
                     ae=self.calling_ae, addr=self.peer)
            self._reject(1, 1, 3)
        if len(f.associations) > f.max_associations:
            log.warn("association from {ae}@{addr} rejected: {n} associations already",
                     ae=self.calling_ae, addr=self.peer, n=len(f.associations) - 1)
            self._reject(2, 3, 2)
        roles, max_len = {}, 0
        for item in prim.user_information or []:
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
            elif isinstance(item, MaximumLengthNotification):
                max_len = item.maximum_length_received or 0
        result, ac_roles = negotiate_as_acceptor(
            prim.presentation_context_definition_list, f.supported, roles)
        self.accepted = {cx.context_id: cx for cx in result if cx.result == 0}
        if max_len:
            self.max_data = max(max_len - 6, 1)
        ac = A_ASSOCIATE()
        ac.application_context_name = "1.2.840.10008.3.1.1.1"
        ac.calling_ae_title = prim.calling_ae_title
        ac.called_ae_title = prim.called_ae_title
        ac.result, ac.result_source = 0, 1
        ac.presentation_context_definition_results_list = result
        ml = MaximumLengthNotification()
        ml.maximum_length_received = f.max_pdu
        ic = ImplementationClassUIDNotification()
        ic.implementation_class_uid = IMPLEMENTATION_UID.decode()
        iv = ImplementationVersionNameNotification()
        iv.implementation_version_name = IMPLEMENTATION_VERSION.decode()
        ac.user_information = [ml, ic, iv, *ac_roles]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        self.state = "established"
        self.transport.write(out.encode())
        self._arm(IDLE, "idle")

    def _reject(self, result: int, source: int, reason: int) -> None:
        self.state = "rejected"
        self.transport.write(reject_pdu(result, source, reason))
        self.transport.loseConnection()
        raise _Abort()

    # -- DIMSE messages ---------------------------------------------------------------------
    def _fragment(self, piece, end_of_pdv: bool) -> None:
        cid, control = self._pdv
        last = end_of_pdv and control & 2
        if control & 1:                                  # command
            if self._data is not None:
                self._fail("a command fragment inside a data set")
            if self._cmd_cx is not None and self._cmd_cx != cid:
                self._fail("command fragments on two presentation contexts")
            self._cmd_cx = cid
            self._cmd += piece
            if last:
                data, self._cmd = bytes(self._cmd), bytearray()
                self._cmd_cx = None
                self._command(cid, data)
            return
        if self._data is None or self._data[0] != cid:
            self._fail("a data set fragment without its command")
        _, sink, op = self._data
        try:
            sink.feed(piece)
        except ValueError as e:
            self._fail(str(e))
        if last:
            self._data = None
            if op is not None:
                op.data_complete(sink)
                self._enqueue(op)

    def _command(self, cid: int, data: bytes) -> None:
        cx = self.accepted.get(cid)
        if cx is None:
            self._fail(f"a message on presentation context {cid}, not accepted", 6)
        fields = dimse.command_elements(data)
        field = dimse.us(fields, dimse.COMMAND_FIELD)
        has_data = dimse.us(fields, dimse.DATA_SET_TYPE, dimse.NO_DATA_SET) != \
            dimse.NO_DATA_SET
        op = None
        if field == dimse.C_CANCEL_RQ:
            target = dimse.us(fields, dimse.RESPONDED_TO)
            for o in self._ops:
                if o.msg_id == target:
                    o.cancel()
        elif field == dimse.C_STORE_RSP:
            head = self._ops[0] if self._ops else None
            if head is None or not head.store_response(fields):
                self._fail("an unexpected C-STORE-RSP")
        else:
            try:
                op = self.factory.services.request(self, cx, field, fields, has_data)
            except LookupError as e:
                self._fail(str(e))
        if has_data:
            self._data = (cid, op.sink if op is not None else DiscardSink(), op)
        elif op is not None:
            op.data_complete(None)
            self._enqueue(op)

    def _enqueue(self, op) -> None:
        self._ops.append(op)
        if len(self._ops) == 1:
            op.start()

    def done(self, op) -> None:
        """*op* sent its final response: start the next request."""
        if self._ops and self._ops[0] is op:
            self._ops.popleft()
            if self._ops:
                self._ops[0].start()


class _Abort(Exception):
    """Stop reading: the association ended or is being aborted."""


class AcceptorFactory(protocol.Factory):
    """The listening side: shared settings of all associations."""

    noisy = False

    def __init__(self, reactor, services, supported, *, max_pdu: int = 0,
                 max_associations: int = 32, allowed_calling_aes=()):
        self.reactor = reactor
        self.services = services
        self.supported = supported
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.allowed_calling_aes = {a.strip() for a in allowed_calling_aes}
        self.associations: set = set()

    def buildProtocol(self, addr):
        p = Association(self)
        p.factory = self
        return p

