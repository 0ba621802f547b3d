"""Association negotiation as acceptor (PS3.8 9.3.2-9.3.4, 7.1), safe on hostile input.

``check_request`` walks the raw A-ASSOCIATE-RQ before pynetdicom decodes it and refuses
what pynetdicom would choke on, log at length or answer badly: AE titles outside the AE
repertoire (-> A-ASSOCIATE-RJ, AE title not recognized), UIDs that are not 1-64 digits
and dots, more than ``MAX_CONTEXTS`` presentation contexts, a context ID proposed twice,
items that overrun their parent (-> ``Malformed``: the acceptor answers A-ABORT), a
Maximum Length Received below the minimum we serve (-> A-ASSOCIATE-RJ; 0 is "no limit"
by PS3.8 D.1 and stays accepted), a protocol version without bit 0 (version 1: ->
A-ASSOCIATE-RJ, protocol version not supported) and an application context other than
DICOM's, or none (-> A-ASSOCIATE-RJ, application context name not supported; PS3.8
9.3.4, 7.1.1.2, as DCMTK's SCPs answer).

``negotiate`` then answers every proposed presentation context: one without an abstract
syntax gets result 3 (abstract syntax not supported), one without a transfer syntax
result 4, the rest go to ``pynetdicom.presentation.negotiate_as_acceptor`` (which takes
the first of the acceptor's syntaxes that the requestor proposed); a *choose* callable
may then pick another of the proposed syntaxes (``contexts.storage_choice``: a
compressed one kept as sent).
``accept_pdu`` encodes the A-ASSOCIATE-AC. (pynetdicom's own log lines, e.g. about a
UID with a leading zero, go to its NullHandler: pacsp2p does not route the stdlib
``logging`` of libraries into its log; the checks above keep pydicom from raising
Python warnings, which Twisted would log, with values the requestor chose.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification,
                                       MaximumLengthNotification,
                                       SCP_SCU_RoleSelectionNegotiation)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from pacsp2p.dicom.pdu import IMPLEMENTATION_UID, IMPLEMENTATION_VERSION

MAX_CONTEXTS = 128            # PS3.8 9.3.2.2: odd context IDs 1-255
MIN_PEER_PDU = 4096           # smallest Maximum Length Received we serve (0 = no limit)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
_PLACEHOLDER_TS = "1.2.840.10008.1.2"   # transfer syntax of a rejected context: not read

# result/source/reason of A-ASSOCIATE-RJ (PS3.8 9.3.4)
PERMANENT, TRANSIENT = 1, 2
USER, ACSE, PRESENTATION = 1, 2, 3
NO_REASON, CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 1, 3, 7
APPLICATION_CONTEXT_NOT_SUPPORTED = PROTOCOL_VERSION_NOT_SUPPORTED = 2  # sources 1, 2
LOCAL_LIMIT_EXCEEDED = 2

_UID_ITEMS = {0x10: "application context", 0x30: "abstract syntax",
              0x40: "transfer syntax", 0x52: "implementation class UID"}
_UID_BYTES = frozenset(b"0123456789.")
_AE_BYTES = frozenset(range(0x20, 0x7f)) - {0x5c}


class Malformed(ValueError):
    """An A-ASSOCIATE-RQ that cannot be answered: abort (A-ABORT, invalid parameter)."""


class Refused(Exception):
    """An A-ASSOCIATE-RQ to answer with A-ASSOCIATE-RJ (*result*, *source*, *reason*)."""

    def __init__(self, why: str, result: int, source: int, reason: int):
        super().__init__(why)
        self.result, self.source, self.reason = result, source, reason


@dataclass
class Request:
    """What ``check_request`` read from the raw A-ASSOCIATE-RQ."""

    called_ae: str
    calling_ae: str
    max_pdu: int = 0
    context_ids: list = field(default_factory=list)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return b"\x03\x00\x00\x00\x00\x04\x00" + bytes((result, source, reason))


def _items(data, start: int, end: int):
    """(type, value start, value end) of the items in data[start:end] (2-byte lengths)."""
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise Malformed("an item header cut short")
        item_type, length = data[pos], struct.unpack_from(">H", data, pos + 2)[0]
        if pos + 4 + length > end:
            raise Malformed(f"item {item_type:#04x} runs past its parent")
        yield item_type, pos + 4, pos + 4 + length
        pos += 4 + length


def _uid(data, start: int, end: int, what: str) -> None:
    value = bytes(data[start:end]).rstrip(b"\0 ")
    if not 0 < len(value) <= 64 or not _UID_BYTES.issuperset(value):
        raise Malformed(f"{what} is not a UID of 1-64 digits and dots")


def _ae(raw: bytes, what: str, reason: int) -> str:
    if not _AE_BYTES.issuperset(raw) or not raw.strip():
        raise Refused(f"{what} is not a valid AE title", PERMANENT, USER, reason)
    return raw.decode("ascii").strip()


def _sub_uid(data, start: int, end: int, what: str) -> int:
    """A UID prefixed by its 2-byte length inside a user information sub-item; the
    position after it."""
    if start + 2 > end:
        raise Malformed(f"{what} cut short")
    n = struct.unpack_from(">H", data, start)[0]
    if start + 2 + n > end:
        raise Malformed(f"{what} runs past its item")
    _uid(data, start + 2, start + 2 + n, what)
    return start + 2 + n


def _user_information(data, start: int, end: int, req: Request) -> None:
    for sub, s, e in _items(data, start, end):
        if sub == 0x51:
            if e - s != 4:
                raise Malformed("maximum length item of the wrong size")
            req.max_pdu = struct.unpack_from(">I", data, s)[0]
        elif sub == 0x52:
            _uid(data, s, e, _UID_ITEMS[0x52])
        elif sub == 0x54:
            _sub_uid(data, s, e, "role selection SOP class")
        elif sub == 0x56:
            _sub_uid(data, s, e, "extended negotiation SOP class")
        elif sub == 0x57:
            pos = _sub_uid(data, s, e, "common extended negotiation SOP class")
            pos = _sub_uid(data, pos, e, "service class")
            if pos + 2 > e:
                raise Malformed("related general SOP classes cut short")
            n = struct.unpack_from(">H", data, pos)[0]
            pos += 2
            if pos + n > e:
                raise Malformed("related general SOP classes run past their item")
            stop = pos + n
            while pos < stop:
                pos = _sub_uid(data, pos, stop, "related general SOP class")


def check_request(pdu: bytes, min_peer_pdu: int = MIN_PEER_PDU) -> Request:
    """Read and check the raw A-ASSOCIATE-RQ *pdu* (header included); raises Malformed
    or Refused (see the module docstring)."""
    if len(pdu) < 74:
        raise Malformed("A-ASSOCIATE-RQ shorter than its fixed fields")
    version = struct.unpack_from(">H", pdu, 6)[0]
    if not version & 1:
        raise Refused(f"protocol version {version:#06x} without version 1", PERMANENT,
                      ACSE, PROTOCOL_VERSION_NOT_SUPPORTED)
    req = Request(_ae(pdu[10:26], "called AE title", CALLED_AE_NOT_RECOGNIZED),
                  _ae(pdu[26:42], "calling AE title", CALLING_AE_NOT_RECOGNIZED))
    seen, application = set(), None
    for item_type, s, e in _items(pdu, 74, len(pdu)):
        if item_type == 0x10:
            _uid(pdu, s, e, _UID_ITEMS[0x10])
            application = bytes(pdu[s:e]).rstrip(b"\0 ").decode("ascii")
        elif item_type == 0x20:
            if e - s < 4:
                raise Malformed("presentation context item cut short")
            cid = pdu[s]
            if cid in seen:
                raise Malformed(f"presentation context {cid} proposed twice")
            seen.add(cid)
            if len(seen) > MAX_CONTEXTS:
                raise Malformed(f"more than {MAX_CONTEXTS} presentation contexts")
            for sub, ss, se in _items(pdu, s + 4, e):
                if sub in (0x30, 0x40):
                    _uid(pdu, ss, se, _UID_ITEMS[sub])
        elif item_type == 0x50:
            _user_information(pdu, s, e, req)
    req.context_ids = sorted(seen)
    if application != APPLICATION_CONTEXT:
        raise Refused(f"application context {application or 'missing'}: not DICOM's",
                      PERMANENT, USER, APPLICATION_CONTEXT_NOT_SUPPORTED)
    if req.max_pdu and req.max_pdu < min_peer_pdu:
        raise Refused(f"maximum PDU length {req.max_pdu} below {min_peer_pdu}",
                      PERMANENT, ACSE, NO_REASON)
    return req


_SUB_ITEMS = {0x20: frozenset({0x30, 0x40}), 0x21: frozenset({0x40}),
              0x50: frozenset(range(0x51, 0x5A))}
_ITEMS = frozenset({0x10, *_SUB_ITEMS})


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def known_items(pdu: bytes) -> bytes:
    """The checked A-ASSOCIATE-RQ *pdu* without its items and sub-items of types PS3.8
    does not define (pynetdicom raises KeyError on them): skipped, as DCMTK does."""
    out = bytearray(pdu[6:74])
    for item_type, s, e in _items(pdu, 74, len(pdu)):
        if item_type not in _ITEMS:
            continue
        keep = _SUB_ITEMS.get(item_type)
        if keep is None:
            body = bytes(pdu[s:e])
        else:
            head = s if item_type == 0x50 else min(s + 4, e)   # context ID, reserved
            body = bytes(pdu[s:head]) + b"".join(
                _item(sub, bytes(pdu[ss:se])) for sub, ss, se in _items(pdu, head, e)
                if sub in keep)
        out += _item(item_type, body)
    return bytes(pdu[:2]) + struct.pack(">I", len(out)) + bytes(out)


def decode(pdu: bytes) -> A_ASSOCIATE:
    """The A-ASSOCIATE primitive of a checked A-ASSOCIATE-RQ (raises Malformed); items
    of unknown types are skipped (``known_items``)."""
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(known_items(pdu))
        return rq.to_primitive()
    except Exception as e:
        raise Malformed(f"undecodable A-ASSOCIATE-RQ ({type(e).__name__})") from None


def _rejected(cid: int, result: int) -> PresentationContext:
    cx = PresentationContext()
    cx.context_id = cid
    cx.transfer_syntax = [_PLACEHOLDER_TS]
    cx.result = result
    return cx


def negotiate(prim: A_ASSOCIATE, supported, choose=None) -> tuple[list, list]:
    """(presentation context results, SCP/SCU role items) for the request *prim*;
    *choose(abstract syntax, proposed syntaxes, as_scu)* may name the syntax of an
    accepted context instead (one of those proposed), None keeping pynetdicom's."""
    roles = {}
    for item in prim.user_information or []:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
    usable, refused = [], []
    for cx in prim.presentation_context_definition_list or []:
        if not cx.abstract_syntax:
            refused.append(_rejected(cx.context_id, 3))
        elif not cx.transfer_syntax:
            refused.append(_rejected(cx.context_id, 4))
        else:
            usable.append(cx)
    results, ac_roles = negotiate_as_acceptor(usable, supported, roles)
    proposed = {cx.context_id: cx.transfer_syntax for cx in usable}
    for cx in results:
        if cx.result != 0:                      # what we send back is not significant
            cx.transfer_syntax = [_PLACEHOLDER_TS]
        elif choose is not None:
            offered = proposed.get(cx.context_id, ())
            ts = choose(cx.abstract_syntax, offered, bool(cx.as_scu))
            if ts is not None and ts in offered:
                cx.transfer_syntax = [ts]
    return sorted(results + refused, key=lambda cx: cx.context_id), ac_roles


def accept_pdu(prim: A_ASSOCIATE, results: list, ac_roles: list, max_pdu: int) -> bytes:
    """The encoded A-ASSOCIATE-AC."""
    ac = A_ASSOCIATE()
    ac.application_context_name = APPLICATION_CONTEXT
    ac.calling_ae_title = prim.calling_ae_title
    ac.called_ae_title = prim.called_ae_title
    ac.result, ac.result_source = 0, 1
    ac.presentation_context_definition_results_list = results
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = IMPLEMENTATION_UID.decode()
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = IMPLEMENTATION_VERSION.decode()
    ac.user_information = [ml, ic, iv, *ac_roles]
    out = A_ASSOCIATE_AC()
    out.from_primitive(ac)
    return out.encode()
