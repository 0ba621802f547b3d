"""The bulk channel's TCP transports move bytes in large pieces (issue 15.1, relay CT):
a holder's accepted connection hands the kernel up to ``bulk.SEND_LIMIT`` bytes per write
event (Twisted's 128 KB took a 512 KB image 4-5 reactor turns), an asker's connection
reads ``fetching.READ_SIZE`` bytes per read event (Twisted's 64 KB: 8 or more).

Real sockets and the real wrapper chains (the guarded TLS factory of ``tls.listen`` over
``bulk.site``; Twisted's TLS client over the client's HTTP protocol); Twisted's memory
reactor only stands in for the event loop, which these checks never run."""
from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory

from pacsp2p.overlay import bulk, fetching, tls


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bulk-send-limit")
    tls.init_ca(directory)
    tls.issue(directory, "a")
    tls.issue(directory, "b")
    return directory


def accepted(factory, reactor):
    """The protocol *factory* built for one real connection accepted on 127.0.0.1."""
    port = tcp.Port(0, factory, interface="127.0.0.1", reactor=reactor)
    port.startListening()
    try:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=60):
            port.doRead()                           # accept it (builds the protocol)
            (proto,) = list(factory.protocols)
            return proto
    finally:
        port.socket.close()


def test_a_holder_connection_sends_a_large_image_in_one_piece(tls_dir):
    reactor = MemoryReactorClock()
    guard = tls.HandshakeGuard(reactor, "bulk port")
    site = bulk.site(None, {}, None, reactor)
    proto = accepted(tls._GuardedTLSFactory(tls.Credentials(tls_dir, "a").options(), site,
                                            guard), reactor)
    channel = proto.wrappedProtocol.wrappedProtocol     # TLS -> handshake guard -> HTTP
    assert isinstance(channel, bulk._Channel)
    assert bulk.tcp_of(channel.transport) is proto.transport
    assert isinstance(proto.transport, tcp.Server)
    assert proto.transport.SEND_LIMIT == bulk.SEND_LIMIT > tcp.Server.SEND_LIMIT
    proto.transport.abortConnection()


def test_an_asker_connection_reads_large_pieces(tls_dir):
    reactor = MemoryReactorClock()
    policy = fetching._PeerPolicy(tls.Credentials(tls_dir, "b"), "a")
    factory = TLSMemoryBIOFactory(policy.creatorForNetloc(b"a", 1), True,
                                  fetching._QuietFactory(None, None))
    proto = accepted(factory, reactor)
    assert isinstance(proto.wrappedProtocol, fetching._NoDelayClient)
    assert bulk.tcp_of(proto.wrappedProtocol.transport) is proto.transport
    assert proto.transport.bufferSize == fetching.READ_SIZE > tcp.Server.bufferSize
    proto.transport.abortConnection()
