"""A push port's JSON from a hostile writer nested deeper than the decoder recurses
(``[[[[...`` in a ``COMMIT``, or in an ``OPEN``) is refused like any other bad list or
opening, and the connection goes on: ``json.loads`` raises RecursionError, not a
ValueError, which the parsers did not catch (the thread's catch-all closed the
connection and logged a warning "serving a connection failed" instead). Real sockets,
real mutual TLS, a real ``ReplicaService`` and ``Catalog`` (``test_push_commits``)."""
from __future__ import annotations

import hashlib
import json

from pacsp2p.overlay.commands import InvalidArgument, check_commits
from pacsp2p.transfer import pushport
from pacsp2p.transfer.pushport import COMMIT, DATA, END, HEAD, OPEN, _frame
from test_push_commits import _in_thread, holder  # noqa: F401 (a fixture)
from test_push_port import UID, answer, certs, connect, meta_json, push  # noqa: F401

DEEP = "[" * 50_000                     # < MAX_OPEN: read whole, then parsed


def test_a_deeply_nested_list_is_an_invalid_argument():
    try:
        check_commits(DEEP)
    except InvalidArgument:
        return
    raise AssertionError("not refused as an invalid argument")


def test_a_deeply_nested_commit_is_refused_and_the_connection_goes_on(certs, holder):  # noqa: F811
    reactor, svc, server = holder
    sock = connect(certs, server.port)
    sock.sendall(_frame(COMMIT, DEEP.encode()))
    got = reactor.wait(_in_thread(reactor, answer, sock))
    assert got["invalid"] is True
    assert reactor.wait(_in_thread(reactor, push, sock, b"ok"))["sha256"] == \
        hashlib.sha256(b"ok").hexdigest()


def test_a_deeply_nested_opening_is_refused_and_the_connection_goes_on(certs, holder):  # noqa: F811
    reactor, svc, server = holder
    sock = connect(certs, server.port)
    for opening in (DEEP.encode(),
                    json.dumps({"archive": "local", "uid": UID, "meta": DEEP}).encode()):
        sock.sendall(_frame(OPEN, opening) + _frame(HEAD, b"HEAD") + _frame(DATA, b"x") +
                     _frame(END))
        got = reactor.wait(_in_thread(reactor, answer, sock))
        assert "refused" in got and "sha256" not in got
    assert reactor.wait(_in_thread(reactor, push, sock, b"ok"))["sha256"] == \
        hashlib.sha256(b"ok").hexdigest()
    assert pushport.MAX_OPEN > len(DEEP)
