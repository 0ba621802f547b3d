"""The admin endpoint answers a request line or header line past twisted's 16 KB line
bound (a console search of 1 MB in its address, a 20 KB cookie) with 414 and one JSON
line that the client can read; before, the connection was closed with no answer (an
empty page in a browser; ``http.client.RemoteDisconnected``). A search just under the
bound is still answered, and the endpoint serves the next request. One real peer."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from pacsp2p.testing import Peer
from pacsp2p.testing.cluster import patience


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("admin-long"), name="adminlong") as p:
        yield p


def raw(peer, head: bytes) -> bytes:
    """Send *head* whole, then read the answer to its end."""
    with socket.create_connection(("127.0.0.1", peer.admin_port),
                                  timeout=patience(60)) as s:
        s.sendall(head)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("size", [16_500, 1_000_000])
def test_a_search_past_the_line_bound_is_414_and_readable(peer, size):
    try:
        urllib.request.urlopen(f"{peer.admin_url}/console/studies?name={'A' * size}",
                               timeout=patience(60))
        raise AssertionError("answered")
    except urllib.error.HTTPError as e:
        assert e.code == 414, e
        assert "over 16384 bytes" in json.loads(e.read())["error"]


def test_a_header_past_the_line_bound_is_414(peer):
    host = f"127.0.0.1:{peer.admin_port}".encode()
    out = raw(peer, b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nCookie: " +
              b"c" * 20_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 414 "), out[:200]


def test_a_search_under_the_bound_is_answered_and_the_endpoint_goes_on(peer):
    with urllib.request.urlopen(f"{peer.admin_url}/console/studies?name={'A' * 15_000}",
                                timeout=patience(60)) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{peer.admin_url}/health", timeout=patience(60)) as r:
        assert r.status == 200
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
