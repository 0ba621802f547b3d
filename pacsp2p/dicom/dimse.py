"""DIMSE command sets (PS3.7 section 9 and annex E), coded by hand.

A command set is group 0000 in implicit VR little endian. ``command()`` encodes one from
(element, value) pairs and prepends CommandGroupLength; ``command_elements()`` decodes one
into {element number: raw value}; small readers turn raw values into ints and strings.
The builders here cover what the native SCU and acceptor send: C-STORE-RQ and the
responses of C-ECHO, C-STORE, C-FIND, C-MOVE and C-GET.
"""

from __future__ import annotations

import functools
import struct

ELEMENT = struct.Struct("<HHI")   # implicit VR little endian: group, element, length
_US = struct.Struct("<H").pack
_UL = struct.Struct("<I").pack

# CommandField values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
NO_DATA_SET = 0x0101

# command elements (group 0000)
AFFECTED_SOP_CLASS = 0x0002
REQUESTED_SOP_CLASS = 0x0003
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000
REQUESTED_SOP_INSTANCE = 0x1001
EVENT_TYPE_ID = 0x1002
ACTION_TYPE_ID = 0x1008
REMAINING, COMPLETED, FAILED, WARNING = 0x1020, 0x1021, 0x1022, 0x1023
ORIGINATOR_AE, ORIGINATOR_MSG_ID = 0x1030, 0x1031


def _element(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return ELEMENT.pack(0, elem, len(value)) + value


def command(fields) -> bytes:
    """A command set from (element, value) pairs in increasing element order; a value is
    bytes (a UID or text, padded here), or an int (US)."""
    body = b"".join(_element(e, _US(v) if isinstance(v, int) else v) for e, v in fields)
    return ELEMENT.pack(0, 0, 4) + _UL(len(body)) + body


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str,
               originator_ae: str | None = None, originator_msg_id: int | None = None) -> bytes:
    """C-STORE-RQ command set (PS3.7 9.3.1.1): what ``command`` makes of its fields, from
    parts kept per SOP class and originator (one per sub-operation of a retrieval)."""
    body = b"".join((_store_head(sop_class), _MESSAGE_ID, _US(msg_id), _STORE_FIXED,
                     _element(AFFECTED_SOP_INSTANCE, sop_instance.encode("ascii")),
                     _store_tail(originator_ae, originator_msg_id or 0)
                     if originator_ae else b""))
    return _GROUP_LENGTH + _UL(len(body)) + body


_MESSAGE_ID = ELEMENT.pack(0, MESSAGE_ID, 2)
_STORE_FIXED = _element(PRIORITY, _US(0)) + _element(DATA_SET_TYPE, _US(0))
_GROUP_LENGTH = ELEMENT.pack(0, 0, 4)


@functools.lru_cache(maxsize=256)
def _store_head(sop_class: str) -> bytes:
    return _element(AFFECTED_SOP_CLASS, sop_class.encode("ascii")) + \
        _element(COMMAND_FIELD, _US(C_STORE_RQ))


@functools.lru_cache(maxsize=256)
def _store_tail(originator_ae: str, originator_msg_id: int) -> bytes:
    title = originator_ae.encode("ascii")[:16]
    return _element(ORIGINATOR_AE, title + b" " * (len(title) % 2)) + \
        _element(ORIGINATOR_MSG_ID, _US(originator_msg_id))


def response(field: int, responded_to: int, status: int, sop_class: bytes = b"",
             sop_instance: bytes = b"", data_set: bool = False, counts=None,
             comment: str = "") -> bytes:
    """A response command set; *counts* (remaining or None, completed, failed, warning)
    for C-GET/C-MOVE; *comment*: an Error Comment (LO, at most 64 characters)."""
    fields = []
    if sop_class:
        fields.append((AFFECTED_SOP_CLASS, sop_class))
    fields += [(COMMAND_FIELD, field), (RESPONDED_TO, responded_to),
               (DATA_SET_TYPE, 0 if data_set else NO_DATA_SET), (STATUS, status)]
    if comment:
        fields.append((ERROR_COMMENT, comment.encode("ascii", "replace")[:64]))
    if sop_instance:
        fields.append((AFFECTED_SOP_INSTANCE, sop_instance))
    if counts is not None:
        remaining, completed, failed, warning = counts
        if remaining is not None:
            fields.append((REMAINING, remaining))
        fields += [(COMPLETED, completed), (FAILED, failed), (WARNING, warning)]
    return command(fields)


def command_elements(data: bytes) -> dict[int, bytes]:
    """{element: value} of a command set (group 0000, implicit VR little endian)."""
    out, pos, end = {}, 0, len(data)
    while pos + 8 <= end:
        group, elem, length = ELEMENT.unpack_from(data, pos)
        pos += 8
        if group == 0:
            out[elem] = data[pos:pos + length]
        pos += length
    return out


def us(fields: dict, elem: int, default: int = 0) -> int:
    """An US value of a decoded command set."""
    raw = fields.get(elem)
    return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else default


TEXT_MAX = 256                  # characters of a UI/AE value kept by text()
_UNPRINTABLE = {c: "\ufffd" for c in (*range(0x20), 0x7f)}


def text(fields: dict, elem: int) -> str:
    """A UI/AE value of a decoded command set, padding removed. Never raises: what is not
    printable ASCII (a line feed, a NUL inside, any other byte) becomes U+FFFD, so the
    value stays as invalid as it came — validate it (``validate.check_uid``) — but can
    never forge a log line; at most ``TEXT_MAX`` characters (longer is invalid for UI
    and AE alike)."""
    raw = fields.get(elem, b"")[:TEXT_MAX + 64].rstrip(b"\0 ")
    return raw.decode("ascii", "replace").strip(" ").translate(_UNPRINTABLE)[:TEXT_MAX]
