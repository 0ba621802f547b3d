"""DICOM upper layer PDUs (PS3.8 section 9.3) shared by the native SCU and acceptor.

Encodes the small PDUs pacsp2p sends itself (A-ASSOCIATE-RQ, A-RELEASE-RQ/RP, A-ABORT)
and frames P-DATA-TF PDUs (one PDV each) around command and data set bytes. The
A-ASSOCIATE-AC/RJ PDUs an acceptor sends, and every association PDU received, are
coded with pynetdicom's PDU classes (``pynetdicom.pdu``).
"""

from __future__ import annotations

import struct

from twisted.internet import tcp

from pacsp2p import __version__

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.1406.1"
IMPLEMENTATION_VERSION = f"PACSP2P_{__version__}"[:16].encode("ascii")

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

PDV = struct.Struct(">BBIIBB")   # PDU type, reserved, PDU length, PDV length, context, control
PDU_HEAD = struct.Struct(">BBI")
PDV_HEAD = struct.Struct(">IBB")  # PDV item length, presentation context ID, control header

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _ae(title: str) -> bytes:
    return title.encode("ascii")[:16].ljust(16)


def associate_rq(called_ae: str, calling_ae: str, contexts) -> bytes:
    """A-ASSOCIATE-RQ for *contexts* [(context id, abstract syntax, [transfer syntaxes])];
    our maximum PDU length is 0 (unlimited)."""
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode("ascii")) + b"".join(
            _item(0x40, ts.encode("ascii")) for ts in syntaxes)
        items.append(_item(0x20, bytes((cid, 0, 0, 0)) + sub))
    items.append(_item(0x50, _item(0x51, struct.pack(">I", 0))
                       + _item(0x52, IMPLEMENTATION_UID) + _item(0x55, IMPLEMENTATION_VERSION)))
    body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32) + b"".join(items)
    return PDU_HEAD.pack(0x01, 0, len(body)) + body


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """A-ABORT: source 0 = service user, 2 = service provider (then *reason* counts:
    0 not specified, 1 unrecognized PDU, 2 unexpected PDU, 4 unrecognized PDU parameter,
    5 unexpected PDU parameter, 6 invalid PDU parameter value)."""
    return b"\x07\x00\x00\x00\x00\x04\x00\x00" + bytes((source, reason))


def frame(context_id: int, data, max_data: int, command: bool, last: bool) -> list:
    """P-DATA-TF PDUs (one PDV each, at most *max_data* bytes of *data*) as buffers."""
    mv, n, pos, parts = memoryview(data), len(data), 0, []
    kind = 1 if command else 0
    while True:
        end = min(pos + max_data, n)
        size = end - pos
        control = kind | (2 if last and end == n else 0)
        parts.append(PDV.pack(0x04, 0, size + 6, size + 2, context_id, control))
        parts.append(mv[pos:end])
        pos = end
        if pos >= n:
            return parts


def _socket_transport(transport):
    """The TCP transport under *transport* (under the TLS layer: ProtocolWrapper)."""
    while getattr(transport, "transport", None) is not None \
            and not hasattr(transport, "doWrite"):
        transport = transport.transport
    return transport


def send_now(transport) -> None:
    """Hand what *transport* holds to the kernel now instead of at the reactor's next
    turn (a DIMSE request that answers a response goes out before the bookkeeping the
    response sets off, so the other side works while we do). Only for a plain TCP
    transport (under TLS: its socket); anything else is left to the reactor."""
    transport = _socket_transport(transport)
    if not getattr(transport, "_tempDataLen", 0) or not getattr(transport, "connected", 0) \
            or getattr(transport, "disconnecting", True):
        return
    transport.doWrite()         # an error is seen again, and handled, by the reactor


def write_now(transport, parts: list) -> None:
    """``transport.write`` of the buffers *parts* (``frame``'s PDUs), then ``send_now``;
    on a plain TCP transport with nothing queued they go straight to its socket in one
    gathering ``sendmsg`` (no join into one copy, no copy into Twisted's buffer, no epoll
    change to wait for writability and back); what the kernel does not take, and any
    error, is left to the transport as a write would."""
    # (a TLS transport wraps this one, and proxies its attributes: never its socket)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True) \
            or not transport.connected or transport.disconnecting \
            or transport._tempDataLen or transport.dataBuffer or transport.producerPaused \
            or len(parts) > _IOV_MAX:
        transport.write(b"".join(parts))
        send_now(transport)
        return
    try:
        sent = transport.socket.sendmsg(parts)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        sent = 0                # the transport meets the error again and closes
    total = sum(len(p) for p in parts)
    if sent < total:
        transport.write(b"".join(parts)[sent:])


_IOV_MAX = 512                  # buffers per sendmsg (Linux allows 1024)


def own_socket(transport):
    """A duplicate of the socket of a plain TCP *transport* (None for anything else),
    for ``send_from_thread``: its descriptor is ours, so no other file or connection can
    take its number while we hold it, whenever the reactor closes the transport's own.
    Made and closed in the reactor (made once established, closed on connection lost)."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True):
        return None
    try:
        return transport.socket.dup()
    except OSError:                     # no descriptor left: answered from the reactor
        return None


def send_from_thread(transport, sock, parts: list, reactor) -> bool:
    """From a thread that is not the reactor's: the buffers *parts* straight to *sock*
    (``own_socket`` of a plain TCP *transport*, held open by the caller meanwhile) if
    the transport is connected and holds nothing queued (what is queued must go first;
    Twisted's buffers are the reactor's). True: sent (what the kernel did not take is
    handed to the reactor, ahead of anything it sends later); False: nothing was sent,
    the caller sends from the reactor. The checks and the ``sendmsg`` are not atomic:
    this is safe only while the reactor sends nothing else on this connection
    meanwhile — the caller must know it (an acceptor runs one operation at a time, and
    its final response is what the requestor waits for: only an A-ABORT or
    A-RELEASE-RP, which end the association, can go out beside it: before, after, or
    amid it). A connection the reactor closed meanwhile refuses the send (shut down, or
    reset), and the descriptor is never another's: *sock* is ours."""
    if not transport.connected or transport.disconnecting \
            or transport._tempDataLen or transport.dataBuffer or transport.producerPaused \
            or len(parts) > _IOV_MAX:
        return False
    try:
        sent = sock.sendmsg(parts)
    except OSError:                     # would block, or an error the reactor meets too
        return False
    total = sum(len(p) for p in parts)
    if sent < total:
        reactor.callFromThread(transport.write, b"".join(parts)[sent:])
    return True
