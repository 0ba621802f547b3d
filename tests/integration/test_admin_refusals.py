"""Refused admin write actions write a bounded log (thirteenth hostile-input session).

A write action refused by the gate's rules (``auth.Guard.check_write``: no login, a
form without its token, another site's Origin) wrote one warning line each, with no
limit: a client on the machine posting ``/scrub`` (or the console's ``/retrieve``) in a
loop wrote a line a request (300 refused POSTs: 300 lines, 40 KB). Every other kind of
refusal writes at most 10 lines per 10 seconds, then one counting the rest
(``dicom.admission.LogLimit``), as docs/security.md says; so do these now.

A login form's ``next`` (where to go once logged in) holding a line break, a NUL or
characters outside ASCII went into the redirect's ``Location`` header as they came
(UTF-8 bytes; CR LF folded into a space by Twisted): now such a ``next`` leads to the
console's overview, as one outside the console did already.
"""
from __future__ import annotations

import http.client
from urllib.parse import quote

import pytest

from pacsp2p.admin.auth import hash_password
from pacsp2p.testing import Peer
from pacsp2p.testing.cluster import wait_until

POSTS = 300


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("refusals"), name="refusals",
              config={"admin": {"users": {"alice": hash_password("password1")}}}) as p:
        yield p


def refused_lines(peer) -> list[str]:
    return [line for line in peer.log_path.read_text(errors="replace").splitlines()
            if "refused from" in line]


def test_a_flood_of_refused_write_actions_writes_a_bounded_log(peer):
    before = len(refused_lines(peer))
    conn = http.client.HTTPConnection("127.0.0.1", peer.admin_port, timeout=60)
    codes = []
    try:
        for i in range(POSTS):
            if i % 2:
                conn.request("POST", "/scrub", body=b"{}",
                             headers={"Content-Type": "application/json"})
            else:
                conn.request("POST", "/console/retrieve", body=b"study=1.2.3&destination=X",
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
            response = conn.getresponse()
            response.read()
            codes.append(response.status)
    finally:
        conn.close()
    assert set(codes) == {401}
    lines = refused_lines(peer)[before:]
    assert 1 <= len(lines) <= 30, f"{len(lines)} lines for {POSTS} refused requests"
    wait_until(lambda: "more admin refusal events" in peer.log_path.read_text(
        errors="replace"), 60, what="the line counting the refusals not logged")


@pytest.mark.parametrize("target", ["/console/\u2028x", "/console/\x00x",
                                    "/console/\r\nSet-Cookie: a=1", "/console/\x1b[2J"])
def test_a_login_next_that_is_not_printable_ascii_leads_to_the_overview(peer, target):
    body = f"user=alice&password=password1&next={quote(target, safe='')}".encode()
    conn = http.client.HTTPConnection("127.0.0.1", peer.admin_port, timeout=60)
    try:
        conn.request("POST", "/console/login", body=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    assert response.status == 303
    assert response.getheader("Location") == "/console/"
