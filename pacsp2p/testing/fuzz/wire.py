"""PDUs, DIMSE command sets and data sets written byte by byte from the standards (PS3.8
9.3, PS3.7 6.3.1, PS3.5 7.1.3), so that they can say what no toolkit says on purpose."""

from __future__ import annotations

import random
import struct
from typing import Sequence



def read_pdu(sock, limit: int = 1 << 20) -> tuple[int, bytes]:
    """(PDU type, the PDU's body after its 6-byte header) read from the blocking socket
    *sock*; ConnectionError if it closes first, ValueError for a PDU over *limit* bytes."""
    def exact(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return bytes(out)
    head = exact(6)
    n = struct.unpack(">I", head[2:6])[0]
    if n > limit:
        raise ValueError(f"a PDU of {n} bytes")
    return head[0], exact(n)


# -- UIDs ----------------------------------------------------------------------------------
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
FIND_STUDY = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE_STUDY = "1.2.840.10008.5.1.4.1.2.2.2"
GET_STUDY = "1.2.840.10008.5.1.4.1.2.2.3"
FIND_PATIENT = "1.2.840.10008.5.1.4.1.2.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"

# the contexts of a well-formed association (all implicit VR little endian)
CX_ECHO, CX_CT, CX_FIND, CX_MOVE, CX_GET, CX_PFIND, CX_MR = 1, 3, 5, 7, 9, 11, 13
CONTEXTS = [(CX_ECHO, VERIFICATION, [IMPLICIT]), (CX_CT, CT, [IMPLICIT]),
            (CX_FIND, FIND_STUDY, [IMPLICIT]), (CX_MOVE, MOVE_STUDY, [IMPLICIT]),
            (CX_GET, GET_STUDY, [IMPLICIT]), (CX_PFIND, FIND_PATIENT, [IMPLICIT]),
            (CX_MR, MR, [IMPLICIT])]

# DIMSE
C_STORE_RQ, C_STORE_RSP, C_GET_RQ, C_FIND_RQ = 0x0001, 0x8001, 0x0010, 0x0020
C_MOVE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0021, 0x0030, 0x0FFF
NO_DATA = 0x0101
PENDING = (0xFF00, 0xFF01)

# put after a line feed into AE titles, UIDs, destinations and identifiers: a log line
# that starts with it was forged by an input
INJECTED = b"FUZZ-INJECTED"

RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


# -- encoders (PS3.8 9.3, PS3.7 6.3.1, PS3.5 7.1.3) ---------------------------------------

def item(item_type: int, payload: bytes, length: int | None = None) -> bytes:
    """A variable item (type, reserved, 2-byte length); *length* may lie."""
    n = len(payload) if length is None else length
    return struct.pack(">BBH", item_type, 0, n & 0xFFFF) + payload


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU (type, reserved, 4-byte length); *length* may lie."""
    n = len(body) if length is None else length
    return struct.pack(">BBI", pdu_type & 0xFF, 0, n & 0xFFFFFFFF) + body


def ae16(title) -> bytes:
    """An AE title field: 16 bytes, space padded; any bytes allowed."""
    raw = title.encode("latin-1") if isinstance(title, str) else bytes(title)
    return raw[:16].ljust(16, b" ")


def context_item(cid: int, abstract, syntaxes: Sequence, item_type: int = 0x20) -> bytes:
    """A presentation context item; *abstract* None leaves out the abstract syntax."""
    sub = b"" if abstract is None else item(0x30, _b(abstract))
    sub += b"".join(item(0x40, _b(ts)) for ts in syntaxes)
    return item(item_type, bytes((cid & 0xFF, 0, 0, 0)) + sub)


def role_item(uid: str, scu: int = 0, scp: int = 1) -> bytes:
    raw = _b(uid)
    return item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu, scp)))


def user_info(max_pdu: int | None = 0, extra: bytes = b"") -> bytes:
    sub = b"" if max_pdu is None else item(0x51, struct.pack(">I", max_pdu & 0xFFFFFFFF))
    sub += item(0x52, b"1.2.826.0.1.3680043.10.1406.99") + item(0x55, b"PACSP2P_FUZZ")
    return item(0x50, sub + extra)


def associate_rq(called="PACSP2P", calling="FUZZSCU", contexts=None, *, max_pdu=0,
                 roles: Sequence[str] = (), items: bytes | None = None,
                 version: int = 1, length: int | None = None) -> bytes:
    """A-ASSOCIATE-RQ. *items* replaces all variable items (application context,
    presentation contexts, user information) when given."""
    if items is None:
        cxs = CONTEXTS if contexts is None else contexts
        items = item(0x10, APP_CONTEXT.encode()) + b"".join(
            context_item(cid, a, ts) for cid, a, ts in cxs) + user_info(
            max_pdu, b"".join(role_item(r) for r in roles))
    body = struct.pack(">HH", version, 0) + ae16(called) + ae16(calling) + bytes(32) + items
    return pdu(0x01, body, length)


def pdv(cid: int, data: bytes, command: bool, last: bool, length: int | None = None,
        control: int | None = None) -> bytes:
    ctl = ((1 if command else 0) | (2 if last else 0)) if control is None else control
    n = len(data) + 2 if length is None else length
    return struct.pack(">IBB", n & 0xFFFFFFFF, cid & 0xFF, ctl & 0xFF) + data


def p_data(*pdvs: bytes, length: int | None = None) -> bytes:
    return pdu(0x04, b"".join(pdvs), length)


def fragments(cid: int, data: bytes, size: int, command: bool, last: bool = True) -> bytes:
    """*data* as P-DATA-TF PDUs of at most *size* data bytes each (one PDV each)."""
    size = max(1, size)
    out, pos = [], 0
    while True:
        end = min(pos + size, len(data))
        out.append(p_data(pdv(cid, data[pos:end], command, last and end == len(data))))
        pos = end
        if pos >= len(data):
            return b"".join(out)


def element(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    """An implicit VR little endian element; *length* may lie (0xFFFFFFFF: undefined)."""
    n = len(value) if length is None else length
    return struct.pack("<HHI", group, elem, n & 0xFFFFFFFF) + value


def _pad(value: bytes, pad: bytes = b"\0") -> bytes:
    return value + pad if len(value) % 2 else value


def _b(value) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def command_set(fields: Sequence[tuple[int, object]], group_length: int | None = None) -> bytes:
    """A command set (group 0000) from (element, value): int is US, str/bytes padded."""
    body = b""
    for elem, value in fields:
        raw = struct.pack("<H", value & 0xFFFF) if isinstance(value, int) else _pad(_b(value))
        body += element(0, elem, raw)
    n = len(body) if group_length is None else group_length
    return element(0, 0, struct.pack("<I", n & 0xFFFFFFFF)) + body


def c_echo(msg_id: int, sop_class=VERIFICATION) -> bytes:
    return command_set([(0x0002, sop_class), (0x0100, C_ECHO_RQ), (0x0110, msg_id),
                        (0x0800, NO_DATA)])


def c_store(msg_id: int, sop_class, sop_instance) -> bytes:
    return command_set([(0x0002, sop_class), (0x0100, C_STORE_RQ), (0x0110, msg_id),
                        (0x0700, 0), (0x0800, 0), (0x1000, sop_instance)])


def c_find(msg_id: int, sop_class=FIND_STUDY, field_: int = C_FIND_RQ,
           dest=None, data_set_type: int = 0) -> bytes:
    fields = [(0x0002, sop_class), (0x0100, field_), (0x0110, msg_id)]
    if dest is not None:
        fields.append((0x0600, _pad(_b(dest), b" ")))
    fields += [(0x0700, 0), (0x0800, data_set_type)]
    return command_set(fields)


def c_store_rsp(msg_id: int, sop_class, sop_instance, status: int = 0) -> bytes:
    return command_set([(0x0002, sop_class), (0x0100, C_STORE_RSP), (0x0120, msg_id),
                        (0x0800, NO_DATA), (0x0900, status), (0x1000, sop_instance)])


def message(cid: int, command: bytes, data: bytes | None = None, size: int = 16384) -> bytes:
    """A whole DIMSE message: the command set, then its data set, fragmented."""
    out = fragments(cid, command, size, True)
    if data is not None:
        out += fragments(cid, data, size, False)
    return out


TEXT_VR_PAD = {0x00080016: b"\0", 0x00080018: b"\0", 0x0020000D: b"\0", 0x0020000E: b"\0",
               0x00080052: b" "}


def data_set(elements: dict[int, bytes]) -> bytes:
    """Implicit VR little endian data set from {tag: raw value} (sorted, padded)."""
    out = []
    for tag in sorted(elements):
        value = _b(elements[tag])
        out.append(element(tag >> 16, tag & 0xFFFF,
                           _pad(value, TEXT_VR_PAD.get(tag, b"\0" if _is_uid(tag) else b" "))))
    return b"".join(out)


def _is_uid(tag: int) -> bool:
    return tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00200052)


def instance(sop_instance, sop_class=CT, study="1.2.3", series="1.2.3.4",
             patient_id=b"FUZZ001", extra: dict | None = None) -> bytes:
    """A tiny 'image' data set (no pixel data) with the attributes a catalog reads."""
    els = {0x00080016: _b(sop_class), 0x00080018: _b(sop_instance),
           0x00080020: b"20240115", 0x00080060: b"CT", 0x00100010: b"FUZZ^PATIENT",
           0x00100020: _b(patient_id), 0x0020000D: _b(study), 0x0020000E: _b(series),
           0x00200013: b"1"}
    els.update(extra or {})
    return data_set(els)


def fresh_uid(rng: random.Random) -> str:
    """A valid UID nobody else uses (2.25 + a random integer, PS3.5 B.2)."""
    return f"2.25.{rng.getrandbits(96) + 1}"
