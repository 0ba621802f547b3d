"""A final DIMSE response goes to the kernel at once (``Association.send(now=True)``,
``pdu.write_now``), not at the reactor's next turn: a storage SCU waits for each
C-STORE-RSP before it sends the next request (issue 15 item 5). Pending responses (a
C-FIND's matches) still go through the transport's buffer; what is queued before a final
response stays before it."""
from __future__ import annotations

import socket
import struct
from types import SimpleNamespace

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from pacsp2p.dicom import dimse
from pacsp2p.dicom.acceptor import AcceptorFactory
from pacsp2p.dicom.pdu import APPLICATION_CONTEXT
from pacsp2p.facade.operation import Operation


class Reactor(Clock):
    """What a ``tcp.Connection`` asks of its reactor, and nothing runs: a byte that
    reaches the other socket was sent at once, not at a reactor turn."""

    def __init__(self):
        super().__init__()
        self.writers, self.readers = set(), set()

    def addWriter(self, w):
        self.writers.add(w)

    def removeWriter(self, w):
        self.writers.discard(w)

    def addReader(self, r):
        self.readers.add(r)

    def removeReader(self, r):
        self.readers.discard(r)


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _associate_rq() -> bytes:
    cx = _item(0x20, bytes((1, 0, 0, 0)) + _item(0x30, Verification.encode())
               + _item(0x40, ExplicitVRLittleEndian.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 0)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + b"PACSP2P".ljust(16) + b"RAWSCU".ljust(16)
            + bytes(32) + _item(0x10, APPLICATION_CONTEXT) + cx + user)
    return struct.pack(">BBI", 1, 0, len(body)) + body


class Services:
    def request(self, assoc, cx, field, fields, has_data):
        raise AssertionError("no request is sent in these tests")


@pytest.fixture
def wired():
    """An established association whose transport is a real TCP connection object over
    a socket pair; (association, the requestor's socket, the reactor)."""
    ae = AE()
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian])
    reactor = Reactor()
    factory = AcceptorFactory(reactor, Services(), ae.supported_contexts, fd_reserve=0)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    conn = tcp.Connection(ours, proto, reactor)
    conn.getPeer = lambda: IPv4Address("TCP", "127.0.0.1", 40001)
    conn.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 104)
    conn.setTcpNoDelay = lambda enabled: None
    conn.connected = 1                              # as tcp.Server sets it
    proto.makeConnection(conn)
    proto.dataReceived(_associate_rq())
    assert proto.state == "established"
    conn.doWrite()                                  # the A-ASSOCIATE-AC
    assert theirs.recv(65536)[:1] == b"\x02"
    yield proto, theirs, reactor
    ours.close()
    theirs.close()


def _rsp(status: int) -> bytes:
    return dimse.response(dimse.C_ECHO_RSP, 1, status)


def test_a_final_response_reaches_the_socket_before_any_reactor_turn(wired):
    assoc, theirs, reactor = wired
    assoc.send(1, _rsp(0x0000), now=True)
    got = theirs.recv(65536)
    assert got[:1] == b"\x04" and got.endswith(_rsp(0x0000))
    assert not reactor.writers                      # nothing left for the reactor


def test_without_now_it_waits_for_the_reactor(wired):
    assoc, theirs, reactor = wired
    assoc.send(1, _rsp(0xFF00))
    with pytest.raises(BlockingIOError):
        theirs.recv(65536)
    assert reactor.writers                          # queued for the next turn


def test_what_is_queued_before_a_final_response_stays_before_it(wired):
    assoc, theirs, reactor = wired
    assoc.send(1, _rsp(0xFF00))                     # a Pending response, queued
    assoc.send(1, _rsp(0x0000), now=True)           # then the final one
    got = theirs.recv(65536)                        # both sent now, in order
    assert got.index(_rsp(0xFF00)) < got.index(_rsp(0x0000))
    assert got.endswith(_rsp(0x0000))


def test_an_operation_sends_its_final_response_now_and_its_pending_ones_queued():
    sent = []
    assoc = SimpleNamespace(send=lambda cid, cmd, data=None, now=False:
                            sent.append((dimse.us(dimse.command_elements(cmd),
                                                  dimse.STATUS), now)),
                            done=lambda op: None)
    svc = SimpleNamespace(reactor=Clock(), observer=None)
    cx = SimpleNamespace(context_id=1, transfer_syntax=["1.2.840.10008.1.2"])
    op = Operation(svc, assoc, cx, {dimse.MESSAGE_ID: (7).to_bytes(2, "little")})
    op.RSP = dimse.C_FIND_RSP
    op.respond(0xFF00)
    op.finish(0x0000)
    assert sent == [(0xFF00, False), (0x0000, True)]
