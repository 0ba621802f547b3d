"""Association negotiation at a real peer from raw A-ASSOCIATE-RQs (PS3.8 9.3.2-9.3.4,
PS3.7 D.3.3; twelfth hostile-input session).

Fixed this session: a protocol version without bit 0 (version 1) and an application
context name other than DICOM's (or none) were accepted (A-ASSOCIATE-AC naming DICOM's);
now A-ASSOCIATE-RJ (1, 2, 2) "protocol version not supported" and (1, 1, 2) "application
context name not supported", as DCMTK's SCPs answer; an item or sub-item of a type
PS3.8 does not define (0x7F in the user information, 0x99 at the top level or in a
presentation context) made pynetdicom's decoder fail and the association was aborted:
now it is skipped, as DCMTK's storescp does (A-ASSOCIATE-AC). The rest was found sound and is
kept here: more than 128 contexts, a context ID twice, an abstract syntax of 65
characters, an implementation class UID that is not one: A-ABORT (invalid parameter
value); a trailing NUL on a UID accepted; role selection for SOP classes not proposed
left out of the AC; a user identity item of 60 KB and an asynchronous operations window
of 65535/65535 ignored (no 0x59, no 0x53 answered: PS3.7 D.3.3.3, D.3.3.7); a maximum
length of 1-11 refused (1, 2, 1), 0 accepted. The peer answers a C-ECHO after each and
logs no traceback.
"""
from __future__ import annotations

import socket
import struct
import time

import pytest

from pacsp2p.testing import LOOPBACK, Peer, echo
from pacsp2p.testing.fuzz import wire as w

ECHO_ONLY = [(1, w.VERIFICATION, [w.IMPLICIT])]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("assoc"), name="assoc") as p:
        yield p


def _items(body: bytes, pos: int):
    while pos + 4 <= len(body):
        t, n = body[pos], struct.unpack_from(">H", body, pos + 2)[0]
        yield t, body[pos + 4:pos + 4 + n]
        pos += 4 + n


def answer(peer, rq: bytes, seconds: float = 30.0) -> tuple:
    """The peer's answer to the A-ASSOCIATE-RQ *rq*: ("AC", {context id: result},
    [user information sub-item types], app context), ("RJ", result, source, reason) or
    ("ABORT", source, reason); an AC is released."""
    with socket.create_connection((LOOPBACK, peer.port), timeout=seconds) as s:
        s.sendall(rq)
        buf, end = b"", time.monotonic() + seconds
        while time.monotonic() < end:
            if len(buf) >= 6 and len(buf) >= 6 + struct.unpack_from(">I", buf, 2)[0]:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        kind, body = buf[0], buf[6:6 + struct.unpack_from(">I", buf, 2)[0]]
        if kind == 3:
            return ("RJ", body[1], body[2], body[3])
        if kind == 7:
            return ("ABORT", body[2], body[3])
        assert kind == 2, buf[:20]
        results, sub, app = {}, [], None
        for t, v in _items(body, 68):
            if t == 0x21:
                results[v[0]] = v[2]
            elif t == 0x50:
                sub = [st for st, _ in _items(v, 0)]
            elif t == 0x10:
                app = v.decode()
        s.sendall(w.RELEASE_RQ)
        assert s.recv(10)[:1] == b"\x06"
        return ("AC", results, sub, app)


def rq(peer, **kw) -> bytes:
    kw.setdefault("contexts", ECHO_ONLY)
    return w.associate_rq(called=peer.ae_title, **kw)


def raw_rq(peer, app: bytes | None = w.APP_CONTEXT.encode(), user_extra: bytes = b"",
           user: bytes | None = None) -> bytes:
    items = (b"" if app is None else w.item(0x10, app)) + w.context_item(
        1, w.VERIFICATION, [w.IMPLICIT]) + (w.user_info(0, user_extra) if user is None
                                            else w.item(0x50, user))
    return w.associate_rq(called=peer.ae_title, items=items)


def sound_after(peer):
    assert echo(peer.port, peer.ae_title)
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log


@pytest.mark.parametrize("version", [0, 2, 0xFFFE])
def test_a_protocol_version_without_version_1_is_rejected(peer, version):
    assert answer(peer, rq(peer, version=version)) == ("RJ", 1, 2, 2)
    assert answer(peer, rq(peer, version=version | 1))[0] == "AC"
    sound_after(peer)


@pytest.mark.parametrize("app", [b"1.2.3.4", b"1.2.840.10008.3.1.1.2", None])
def test_an_application_context_not_dicoms_is_rejected(peer, app):
    assert answer(peer, raw_rq(peer, app)) == ("RJ", 1, 1, 2)
    assert answer(peer, raw_rq(peer, w.APP_CONTEXT.encode() + b"\0"))[0] == "AC"
    sound_after(peer)


def test_odd_context_lists_are_aborted_or_answered_per_context(peer):
    many = [(2 * i + 1, w.VERIFICATION, [w.IMPLICIT]) for i in range(128)]
    assert answer(peer, rq(peer, contexts=many))[0] == "AC"
    assert answer(peer, rq(peer, contexts=many + [(1, w.CT, [w.IMPLICIT])])) == ("ABORT", 2, 6)
    twice = [(1, w.VERIFICATION, [w.IMPLICIT]), (1, w.CT, [w.IMPLICIT])]
    assert answer(peer, rq(peer, contexts=twice)) == ("ABORT", 2, 6)
    long_uid = "1." + "2" * 63
    assert answer(peer, rq(peer, contexts=ECHO_ONLY + [(3, long_uid, [w.IMPLICIT])])) == (
        "ABORT", 2, 6)
    unknown = "1." + "2" * 62
    nul = [(1, w.VERIFICATION + "\0", [w.IMPLICIT]), (3, w.CT, [w.IMPLICIT + "\0"]),
           (5, unknown, [w.IMPLICIT])]
    assert answer(peer, rq(peer, contexts=nul))[1] == {1: 0, 3: 0, 5: 3}
    sound_after(peer)


def test_user_information_items_nobody_negotiated_are_not_answered(peer):
    kind, results, sub, app = answer(peer, rq(peer, roles=[w.CT, w.MR]))
    assert (kind, results, app) == ("AC", {1: 0}, w.APP_CONTEXT)
    assert 0x54 not in sub                     # no role for a class not proposed
    kind, results, sub, _ = answer(peer, rq(peer, contexts=ECHO_ONLY + [
        (3, w.CT, [w.IMPLICIT])], roles=[w.CT]))
    assert results == {1: 0, 3: 0} and sub.count(0x54) == 1
    big = b"u" * 30000
    identity = w.item(0x58, bytes((2, 1)) + struct.pack(">H", len(big)) + big +
                      struct.pack(">H", len(big)) + big)
    window = w.item(0x53, struct.pack(">HH", 65535, 65535))
    for extra in (identity, window):
        kind, results, sub, _ = answer(peer, raw_rq(peer, user_extra=extra))
        assert (kind, results) == ("AC", {1: 0})
        assert 0x59 not in sub and 0x53 not in sub
    sound_after(peer)


@pytest.mark.parametrize("max_pdu", [1, 11, 4095])
def test_a_maximum_length_below_what_is_served_is_rejected(peer, max_pdu):
    assert answer(peer, rq(peer, max_pdu=max_pdu)) == ("RJ", 1, 2, 1)
    assert answer(peer, rq(peer, max_pdu=0))[0] == "AC"
    sound_after(peer)


def test_an_implementation_class_uid_that_is_not_one_is_aborted(peer):
    user = w.item(0x51, struct.pack(">I", 0)) + w.item(0x52, b"not a uid!")
    assert answer(peer, raw_rq(peer, user=user)) == ("ABORT", 2, 6)
    assert answer(peer, raw_rq(peer, user=w.item(0x51, struct.pack(">I", 0))))[0] == "AC"
    sound_after(peer)


@pytest.mark.parametrize("where", ["user information", "top level", "presentation context"])
def test_an_item_of_an_unknown_type_is_skipped(peer, where):
    unknown = w.item(0x7F if where == "user information" else 0x99, b"z" * 100)
    app = w.item(0x10, w.APP_CONTEXT.encode())
    echo_cx = w.context_item(1, w.VERIFICATION, [w.IMPLICIT])
    ct_cx = w.context_item(3, w.CT, [w.IMPLICIT])
    if where == "user information":
        items = app + echo_cx + ct_cx + w.user_info(0, unknown + w.role_item(w.CT))
    elif where == "top level":
        items = app + unknown + echo_cx + ct_cx + w.user_info(0, w.role_item(w.CT))
    else:
        ct_cx = w.item(0x20, bytes((3, 0, 0, 0)) + w.item(0x30, w.CT.encode()) + unknown +
                       w.item(0x40, w.IMPLICIT.encode()))
        items = app + echo_cx + ct_cx + w.user_info(0, w.role_item(w.CT))
    kind, results, sub, _ = answer(peer, w.associate_rq(called=peer.ae_title, items=items))
    assert (kind, results) == ("AC", {1: 0, 3: 0})
    assert sub.count(0x54) == 1                      # the role item after it still read
    sound_after(peer)
