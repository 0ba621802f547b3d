"""The DICOM acceptor's limits, driven in-process: a ``Clock`` for the reactor, string
transports for sockets, a stand-in for the facade's services (issue 11: hostile input).

Each test plays what an attacker did against a real peer (silent sockets, endless command
fragments, oversized data sets, a 7-byte maximum PDU, a presentation context without an
abstract syntax, ...) and checks the acceptor's answer: an A-ASSOCIATE-AC/RJ, an A-ABORT
or a closed socket — never an exception out of ``dataReceived`` — and bounded log lines.
"""
from __future__ import annotations

import struct

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import Verification
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone

from pacsp2p.dicom import dimse
from pacsp2p.dicom.acceptor import PROGRESS, AcceptorFactory
from pacsp2p.dicom.messages import MAX_COMMAND, MAX_QUEUED, MemorySink
from pacsp2p.dicom.admission import FdBudget
from pacsp2p.dicom.pdu import APPLICATION_CONTEXT, PDV, RELEASE_RQ

ECHO = (1, Verification, [ExplicitVRLittleEndian])
CT = (3, CTImageStorage, [ExplicitVRLittleEndian])


# -- building requests ---------------------------------------------------------------------
def item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def context(cid: int, abstract: str | bytes | None, syntaxes) -> bytes:
    sub = b""
    if abstract is not None:
        sub += item(0x30, abstract if isinstance(abstract, bytes) else abstract.encode())
    sub += b"".join(item(0x40, ts if isinstance(ts, bytes) else ts.encode())
                    for ts in syntaxes)
    return item(0x20, bytes((cid, 0, 0, 0)) + sub)


def associate_rq(contexts=(ECHO,), max_pdu: int = 0, calling: bytes = b"RAWSCU",
                 called: bytes = b"PACSP2P", raw_contexts: bytes = b"") -> bytes:
    items = item(0x10, APPLICATION_CONTEXT) + b"".join(context(*c) for c in contexts)
    items += raw_contexts
    items += item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + items)
    return struct.pack(">BBI", 1, 0, len(body)) + body


def pdv(cid: int, data: bytes, command: bool, last: bool) -> bytes:
    control = (1 if command else 0) | (2 if last else 0)
    return PDV.pack(0x04, 0, len(data) + 6, len(data) + 2, cid, control) + data


def echo_rq(msg_id: int = 1) -> bytes:
    return dimse.command([(dimse.AFFECTED_SOP_CLASS, Verification.encode()),
                          (dimse.COMMAND_FIELD, dimse.C_ECHO_RQ), (dimse.MESSAGE_ID, msg_id),
                          (dimse.DATA_SET_TYPE, dimse.NO_DATA_SET)])


def find_rq(msg_id: int = 1) -> bytes:
    return dimse.command([(dimse.AFFECTED_SOP_CLASS, Verification.encode()),
                          (dimse.COMMAND_FIELD, dimse.C_FIND_RQ), (dimse.MESSAGE_ID, msg_id),
                          (dimse.DATA_SET_TYPE, 0)])


# -- a stand-in for the facade's services ------------------------------------------------------
class Op:
    def __init__(self, assoc, cx, fields, sink, answer=True):
        self.assoc, self.cid = assoc, cx.context_id
        self.msg_id = dimse.us(fields, dimse.MESSAGE_ID)
        self.sink, self.answer = sink, answer
        self.lost_called = self.completed = False
        self.received = 0

    def feed(self, piece):
        self.received += len(piece)

    def data_complete(self, sink):
        self.completed = True

    def start(self):
        if self.answer:
            self.assoc.send(self.cid, dimse.response(dimse.C_ECHO_RSP, self.msg_id, 0))
            self.assoc.done(self)

    def cancel(self):
        pass

    def store_response(self, fields):
        return False

    def lost(self):
        self.lost_called = True


class Services:
    def __init__(self):
        self.ops: list[Op] = []
        self.answer = True
        self.raises: Exception | None = None

    def request(self, assoc, cx, field, fields, has_data):
        if self.raises is not None:
            raise self.raises
        op = Op(assoc, cx, fields, None, self.answer)
        op.sink = MemorySink() if field == dimse.C_FIND_RQ else op
        self.ops.append(op)
        return op


def supported() -> list:
    ae = AE()
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian])
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.supported_contexts


# -- sockets ---------------------------------------------------------------------------------
class Socket(StringTransport):
    """A connected socket: what the acceptor wrote is ``value()``; closing it calls
    ``connectionLost`` on the next clock tick (unless *stuck*: the requestor reads
    nothing, so only an abort closes it)."""

    def __init__(self, clock, host, port, stuck=False):
        super().__init__(peerAddress=IPv4Address("TCP", host, port))
        self.clock, self.stuck, self.closed, self.aborted = clock, stuck, False, False

    def setTcpNoDelay(self, enabled):
        pass

    def loseConnection(self):
        self.disconnecting = True
        if not self.stuck:
            self._close()

    def abortConnection(self):
        self.aborted = True
        self._close()

    def _close(self):
        if not self.closed:
            self.closed = True
            self.clock.callLater(0, self.protocol.connectionLost,
                                 Failure(ConnectionDone("closed")))

    def pdus(self) -> list[tuple[int, bytes]]:
        out, data, pos = [], self.value(), 0
        while pos + 6 <= len(data):
            kind, _, length = struct.unpack_from(">BBI", data, pos)
            out.append((kind, data[pos:pos + 6 + length]))
            pos += 6 + length
        return out

    def kinds(self) -> list[int]:
        return [k for k, _ in self.pdus()]


class Harness:
    def __init__(self, **settings):
        self.clock = Clock()
        self.services = Services()
        settings.setdefault("fd_reserve", 0)
        self.factory = AcceptorFactory(self.clock, self.services, supported(), **settings)
        self.port = 40000

    def connect(self, host="127.0.0.1", stuck=False):
        """The new connection's (protocol, socket), or None if it was refused at once."""
        self.port += 1
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, self.port))
        if proto is None:
            return None
        sock = Socket(self.clock, host, self.port, stuck)
        sock.protocol = proto
        proto.makeConnection(sock)
        return proto, sock

    def associate(self, host="127.0.0.1", contexts=(ECHO, CT)):
        proto, sock = self.connect(host)
        proto.dataReceived(associate_rq(contexts))
        assert sock.kinds() == [2], sock.value()[:20]
        sock.clear()
        return proto, sock

    def tick(self, seconds=0.0):
        self.clock.advance(seconds)
        self.clock.advance(0)


@pytest.fixture
def logged():
    events: list = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events) -> list[str]:
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if e.get("log_namespace", "").startswith(
        "pacsp2p.dicom")]


# -- 1. bounded buffers ---------------------------------------------------------------------
def test_command_set_fragments_beyond_64_kib_abort(logged):
    """Before: command fragments were gathered without a limit (2 GB from one association)."""
    h = Harness()
    proto, sock = h.associate()
    piece = b"\0" * 4096
    for _ in range(MAX_COMMAND // len(piece) + 8):
        proto.dataReceived(pdv(1, piece, command=True, last=False))
        if sock.disconnecting:
            break
    assert sock.kinds() == [7]                       # A-ABORT
    assert len(proto._cmd) <= MAX_COMMAND
    assert any("command set larger than" in line for line in lines(logged))


def test_identifier_beyond_max_identifier_aborts():
    h = Harness(max_identifier=10_000)
    proto, sock = h.associate()
    proto.dataReceived(pdv(1, find_rq(), command=True, last=True))
    for _ in range(5):
        proto.dataReceived(pdv(1, b"\0" * 4000, command=False, last=False))
    assert sock.kinds() == [7]
    h.tick()
    assert h.services.ops[0].lost_called


def test_dataset_beyond_max_dataset_aborts_while_it_arrives():
    h = Harness(max_dataset=100_000)
    proto, sock = h.associate()
    store = dimse.c_store_rq(1, CTImageStorage, "1.2.3.4")
    proto.dataReceived(pdv(3, store, command=True, last=True))
    sent = 0
    while not sock.disconnecting and sent < 1_000_000:
        proto.dataReceived(pdv(3, b"\0" * 16384, command=False, last=False))
        sent += 16384
    assert sock.kinds() == [7]
    op = h.services.ops[0]
    assert op.received <= 100_000 and sent <= 100_000 + 16384
    h.tick()
    assert op.lost_called                           # its partial file is removed


def test_dataset_at_max_dataset_is_received():
    h = Harness(max_dataset=100_000)
    proto, sock = h.associate()
    proto.dataReceived(pdv(3, dimse.c_store_rq(1, CTImageStorage, "1.2.3.4"), True, True))
    proto.dataReceived(pdv(3, b"\0" * 50_000, False, False) + pdv(3, b"\0" * 50_000, False, True))
    assert sock.kinds() == [4]                       # the (stand-in) response
    assert h.services.ops[0].received == 100_000


def test_requests_waiting_are_bounded():
    h = Harness()
    h.services.answer = False                        # the first request never finishes
    proto, sock = h.associate()
    for i in range(MAX_QUEUED + 5):
        proto.dataReceived(pdv(1, echo_rq(i + 1), True, True))
    assert sock.kinds() == [7]
    assert len(h.services.ops) == MAX_QUEUED


# -- 2. connections ------------------------------------------------------------------------
def test_silent_sockets_do_not_count_as_associations():
    """Before: 33 silent sockets locked every modality out (max_associations counted
    TCP connections)."""
    h = Harness(max_associations=2)
    silent = [h.connect(f"10.0.0.{i}") for i in range(1, 41)]
    assert all(s is not None for s in silent)
    h.associate("10.0.1.1")
    h.associate("10.0.1.2")
    proto, sock = h.connect("10.0.1.3")
    proto.dataReceived(associate_rq())
    assert sock.value() == bytes.fromhex("03000000000400020302")   # rejected-transient


def test_pending_limit_closes_the_oldest_silent_socket(logged):
    h = Harness(max_pending=3)
    first = [h.connect(f"10.0.0.{i}") for i in range(3)]
    proto, sock = h.connect("10.0.0.9")
    assert first[0][1].aborted and not first[1][1].disconnecting
    assert len(h.factory.admission.pending) == 3
    proto.dataReceived(associate_rq())
    assert sock.kinds() == [2]
    assert any("to make room (pending limit)" in line for line in lines(logged))


def test_per_address_limit():
    h = Harness(max_per_address=2)
    a1, a2 = h.associate("10.0.0.1"), h.associate("10.0.0.1")
    proto, sock = h.connect("10.0.0.1")              # two associations already: taken,
    proto.dataReceived(associate_rq())               # and its request rejected-transient
    assert sock.value() == bytes.fromhex("03000000000400020302"), sock.value()
    assert h.connect("10.0.0.2") is not None         # another address is not
    a1[0].dataReceived(RELEASE_RQ)
    h.tick()
    pending = h.connect("10.0.0.1")
    assert pending is not None
    again = h.connect("10.0.0.1")                    # over the limit: its own oldest pending
    assert pending[1].aborted and again is not None  # connection makes room
    assert a2[1].disconnecting is False


def test_artim_closes_a_silent_socket_without_an_abort_pdu(logged):
    h = Harness(artim_timeout=5.0)
    _, sock = h.connect()
    h.tick(4.9)
    assert not sock.disconnecting
    h.tick(0.2)
    assert sock.disconnecting and sock.value() == b""
    assert h.factory.admission.pending == {}
    assert any("no A-ASSOCIATE-RQ for 5.0 s" in line for line in lines(logged))


def test_partial_associate_rq_does_not_reset_artim():
    h = Harness(artim_timeout=5.0)
    proto, sock = h.connect()
    rq = associate_rq()
    for i in range(len(rq) - 1):                     # one byte a second
        proto.dataReceived(rq[i:i + 1])
        h.tick(1.0)
        if sock.disconnecting:
            break
    assert sock.disconnecting and i < 10


def test_a_requestor_that_reads_nothing_is_dropped_after_artim():
    h = Harness(artim_timeout=5.0)
    proto, sock = h.connect(stuck=True)
    proto.dataReceived(b"\x09\x00\x00\x00\x00\x00")   # unknown PDU type: A-ABORT
    assert sock.kinds() == [7] and not sock.aborted
    h.tick(5.1)
    assert sock.aborted                               # closed all the same
    assert h.factory.admission.all() == []


def test_idle_timeout_is_configurable():
    h = Harness(idle_timeout=7.0)
    proto, sock = h.associate()
    h.tick(6.0)
    proto.dataReceived(pdv(1, echo_rq(), True, True))
    sock.clear()
    h.tick(6.5)
    assert not sock.disconnecting
    h.tick(1.0)
    assert sock.kinds() == [7]


def test_a_requestor_dripping_bytes_is_aborted_after_the_idle_timeout(logged):
    """A slowloris: a byte of a C-ECHO every 2 s. Before, each byte restarted the idle
    timeout, so the association (one of ``max_associations``) was held for ever."""
    h = Harness(idle_timeout=7.0)
    proto, sock = h.associate()
    msg = pdv(1, echo_rq(), True, True)
    for b in msg[:40]:
        proto.dataReceived(bytes([b]))
        h.tick(2.0)
        if sock.disconnecting:
            break
    assert sock.kinds() == [7] and h.clock.seconds() <= 8.0
    assert any("only 4 bytes received for 7.0 s" in line for line in lines(logged))


def test_a_slow_data_set_keeps_its_association():
    """A data set arriving at ``PROGRESS`` bytes per 5 s (13 KB/s) is not idle; nor is a
    requestor sending small messages, each answered, less than ``idle_timeout`` apart."""
    h = Harness(idle_timeout=7.0)
    proto, sock = h.associate()
    proto.dataReceived(pdv(3, dimse.c_store_rq(1, CTImageStorage, "1.2.3.4"), True, True))
    for _ in range(6):
        h.tick(5.0)
        proto.dataReceived(pdv(3, b"\0" * PROGRESS, False, False))
    proto.dataReceived(pdv(3, b"\0" * 10, False, True))
    assert sock.kinds() == [4] and not sock.disconnecting
    for i in range(6):
        h.tick(5.0)
        proto.dataReceived(pdv(1, echo_rq(2 + i), True, True))
    assert sock.kinds() == [4] * 7 and not sock.disconnecting


def test_fd_reserve_refuses_early():
    h = Harness()
    base = {"n": 95}

    def count():                                     # every connection holds a descriptor
        return base["n"] + len(h.factory.admission.all())
    h.factory.admission.fds = FdBudget(h.clock, reserve=10, count=count, limit=lambda: 100)
    assert h.connect("10.0.0.1") is None             # 95 + 1 > 100 - 10, and no pending
                                                     # connection to close: refused
    base["n"] = 50
    h.tick(2.0)
    conns = [h.connect(f"10.0.{i // 10}.{i % 10}") for i in range(45)]
    assert all(c is not None for c in conns)         # beyond 40 the oldest pending go
    assert [s.aborted for _, s in conns] == [True] * 5 + [False] * 40
    assert len(h.factory.admission.all()) == 40
    proto, sock = conns[-1]
    proto.dataReceived(associate_rq())               # and a real requestor gets in
    assert sock.kinds() == [2]


def test_fd_budget_counts_at_most_once_a_second_far_from_the_limit():
    clock, calls = Clock(), []

    def count():
        calls.append(1)
        return 100
    fds = FdBudget(clock, reserve=64, count=count, limit=lambda: 10_000)
    for _ in range(500):
        assert fds.room()
    assert len(calls) == 1
    clock.advance(1.0)
    fds.room()
    assert len(calls) == 2


# -- 3. negotiation --------------------------------------------------------------------------
def accepted(sock) -> dict[int, int]:
    (kind, pdu), = sock.pdus()
    assert kind == 2, pdu[:10]
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu)
    return {cx.context_id: cx.result for cx in ac.presentation_context}


def test_context_without_abstract_syntax_is_rejected_not_raised(logged):
    """Before: negotiate_as_acceptor raised in the reactor, connection dropped."""
    h = Harness()
    proto, sock = h.connect()
    proto.dataReceived(associate_rq([ECHO, (5, None, [ExplicitVRLittleEndian]),
                                     (7, CTImageStorage, [])]))
    assert accepted(sock) == {1: 0, 5: 3, 7: 4}
    assert not any("internal error" in line for line in lines(logged))


@pytest.mark.parametrize("contexts", [[], [(1, "1.2.3.4", [ExplicitVRLittleEndian])],
                                      [(1, Verification, ["1.2.3.4"])]])
def test_no_presentation_context_accepted_is_a_reject(contexts, logged):
    """None proposed, only an unknown SOP class, only an unknown transfer syntax: before,
    an A-ASSOCIATE-AC with no usable context, held until the idle timeout."""
    h = Harness()
    proto, sock = h.connect()
    proto.dataReceived(associate_rq(contexts))
    assert sock.kinds() == [3]
    assert sock.value()[7:10] == b"\x01\x01\x01"      # permanent, service user, no reason
    assert h.factory.admission.established == set()
    assert any("no presentation context accepted" in line for line in lines(logged))


@pytest.mark.parametrize("bad", [
    context(5, "1.2.3\u00e9".encode("utf-8"), [ExplicitVRLittleEndian]),  # non-ASCII UID
    context(5, b"1." * 40, [ExplicitVRLittleEndian]),                    # longer than 64
    context(5, b"../../etc/passwd", [ExplicitVRLittleEndian]),           # not a UID
    context(1, Verification, [ExplicitVRLittleEndian]),                  # ID 1 again
    item(0x20, b"\x05\x00\x00\x00" + b"\x30\x00\x00\x40"),               # overruns its item
])
def test_malformed_associate_rq_gets_an_abort(bad, logged):
    h = Harness()
    proto, sock = h.connect()
    proto.dataReceived(associate_rq([ECHO], raw_contexts=bad))
    assert sock.kinds() == [7]
    assert sock.value()[8:] == b"\x02\x06"            # provider, invalid parameter value
    assert all(len(line) < 400 for line in lines(logged))


def test_too_many_contexts_abort():
    h = Harness()
    proto, sock = h.connect()
    many = [(i, Verification, [ExplicitVRLittleEndian]) for i in range(1, 130)]
    proto.dataReceived(associate_rq(many))
    assert sock.kinds() == [7]


@pytest.mark.parametrize("calling, called, reason", [
    (b"\xff\xfe", b"PACSP2P", 3), (b"A\\B", b"PACSP2P", 3), (b"RAW", b" " * 16, 7)])
def test_invalid_ae_titles_are_rejected(calling, called, reason):
    h = Harness()
    proto, sock = h.connect()
    proto.dataReceived(associate_rq(calling=calling, called=called))
    assert sock.value() == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01" + bytes((reason,))


@pytest.mark.parametrize("max_pdu, ok", [(7, False), (4095, False), (0, True), (4096, True)])
def test_requestor_maximum_pdu_below_4096_is_rejected(max_pdu, ok, logged):
    """Before: a 7-byte maximum PDU made the peer send 13x the bytes."""
    h = Harness()
    proto, sock = h.connect()
    proto.dataReceived(associate_rq(max_pdu=max_pdu))
    if ok:
        assert sock.kinds() == [2]
    else:
        assert sock.value() == bytes.fromhex("03000000000400010201")
        assert any(f"maximum PDU length {max_pdu} below 4096" in line
                   for line in lines(logged))


def test_minimum_requestor_pdu_is_configurable():
    h = Harness(min_peer_pdu=0)
    proto, sock = h.connect()
    proto.dataReceived(associate_rq(max_pdu=7))
    assert sock.kinds() == [2]


def test_an_exception_in_a_service_is_an_abort_not_an_unhandled_error(logged):
    h = Harness()
    proto, sock = h.associate()
    h.services.raises = RuntimeError("boom \u00e9" * 1000)
    proto.dataReceived(pdv(1, echo_rq(), True, True))    # must not raise
    assert sock.kinds() == [7]
    [line] = [x for x in lines(logged) if "internal error" in x]
    assert "RuntimeError" in line and len(line) < 400


# -- 4. hostile values never raise in the wire code ------------------------------------------
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("uid", ["1.2.3\u00e9", "\u4e2d\u6587", "1." * 40000, "../../x"])
def test_file_meta_of_any_uid_is_written(uid):
    """Before: a non-ASCII Affected SOP Instance UID raised UnicodeEncodeError in
    file_meta (in the reactor: connection dropped without an A-ABORT)."""
    from io import BytesIO

    from pydicom.filereader import _read_file_meta_info

    from pacsp2p.dicom.incoming import file_meta
    head = file_meta(CTImageStorage, uid, ExplicitVRLittleEndian, "AE\u00e9" * 10)
    stream = BytesIO(head)
    stream.seek(132)
    meta = _read_file_meta_info(stream)
    assert len(meta.MediaStorageSOPInstanceUID) <= 64
    assert meta.MediaStorageSOPInstanceUID.isascii()


@pytest.mark.parametrize("raw, text", [
    ("1.2.\u00e9".encode("latin-1") + b"\0", "1.2.\ufffd"),     # not ASCII
    (b"1.2\nFORGED 1.2", "1.2\ufffdFORGED 1.2"),                  # a log line forged
    (b"1.2.3\n", "1.2.3\ufffd"),                                  # stays invalid
    (b"1.2\x003.4\0", "1.2\ufffd3.4"),
    (b" STORESCU ", "STORESCU"),                                   # padding removed
    (b"1." * 40000, "1." * 128),                                   # bounded
])
def test_command_text_never_raises_nor_forges_a_line(raw, text):
    from pacsp2p.validate import is_uid
    value = dimse.text({dimse.AFFECTED_SOP_INSTANCE: raw}, dimse.AFFECTED_SOP_INSTANCE)
    assert value == text
    assert "\n" not in value and len(value) <= dimse.TEXT_MAX
    assert not is_uid(value) or raw.isdigit()


# -- 7. bounded logging -----------------------------------------------------------------------
def test_a_flood_of_refused_connections_writes_a_bounded_log(logged):
    h = Harness(max_per_address=1, max_pending=1)
    h.associate("10.9.9.9")
    for _ in range(1000):                            # the address full of associations:
        assert h.connect("10.9.9.9") is not None     # each takes the last one's place
    h.tick(11.0)
    room = [x for x in lines(logged) if "10.9.9.9" in x or "more" in x]
    assert 1 <= len(room) <= 11 and any("989 more" in x for x in room), room


def test_an_empty_associate_rq_is_aborted_at_once():
    h = Harness()
    proto, sock = h.connect()
    proto.dataReceived(b"\x01\x00\x00\x00\x00\x00")
    assert sock.kinds() == [7]


class Pieces(Op):
    """A sink that keeps every piece it is given (as the file writer's queue does)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sink, self.pieces = self, []

    def feed(self, piece):
        self.pieces.append(bytes(piece))


def test_tiny_data_fragments_are_gathered_before_the_sink():
    """One-byte PDVs: 7 bytes of the requestor's must not become one queued object each
    (~200 bytes) in the file writer's queue."""
    h = Harness()
    proto, _ = h.associate()

    def request(assoc, cx, field, fields, has_data):
        h.services.ops.append(Pieces(assoc, cx, fields, None))
        return h.services.ops[-1]
    h.services.request = request
    proto.dataReceived(pdv(3, dimse.c_store_rq(1, CTImageStorage, "1.2.3.4"), True, True))
    payload = bytes(range(256)) * 512                 # 128 KiB: 108 KiB one byte a PDV,
    tiny, big = payload[:-20000], payload[-20000:]    # then two large fragments
    proto.dataReceived(b"".join(pdv(3, tiny[i:i + 1], False, False)
                                for i in range(len(tiny))))
    proto.dataReceived(pdv(3, big[:10000], False, False) + pdv(3, big[10000:], False, True))
    op = h.services.ops[0]
    assert op.completed
    assert b"".join(op.pieces) == payload
    assert len(op.pieces) <= len(payload) // (64 << 10) + 3
