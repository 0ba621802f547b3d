"""Slow clients at a real peer's admin endpoint (/health, /metrics, `pacsp2p status`).

Every connection slot held by a client that drips a header line now and then (each byte
reset the idle timeout: the slots were held for ever and /health never answered), one
address taking every slot, and silent sockets of the address the CLI comes from.
"""
from __future__ import annotations

import http.client
import socket
import time

from pacsp2p.admin.endpoint import MAX_CONNECTIONS, MAX_PER_ADDRESS
from pacsp2p.admin.gate import REQUEST_TIMEOUT
from pacsp2p.testing.cluster import wait_until

DRIP = 20.0                      # seconds between two header lines of a slow client


def health(peer, source: str = "127.0.0.1") -> int | str:
    """The status of GET /health from the address *source*, or why there is none."""
    conn = http.client.HTTPConnection("127.0.0.1", peer.admin_port, timeout=20,
                                      source_address=(source, 0))
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        return repr(e)
    finally:
        conn.close()


def slow_client(peer, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", peer.admin_port), timeout=30,
                                 source_address=(source, 0))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return s


def closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_clients_dripping_headers_lose_their_slots(peer):
    """Every slot held by a client dripping a header line: a client that sends its
    request at once takes the oldest one's slot (before 2026-12-07: refused until the
    first dripping ones were cut, REQUEST_TIMEOUT later), and every dripping one is cut
    REQUEST_TIMEOUT after its first bytes, drip as it may."""
    sources = [f"127.0.0.{2 + i // MAX_PER_ADDRESS}" for i in range(MAX_CONNECTIONS)]
    slow = [slow_client(peer, src) for src in sources]
    try:
        time.sleep(1)
        assert health(peer) == 200            # every slot was taken: the oldest gave way
        assert closed_by_peer(slow[0])
        started, line = time.monotonic(), 0

        def dripped_then_cut():
            nonlocal line
            if time.monotonic() - started > DRIP * (line + 1):
                line += 1
                for s in slow:
                    try:
                        s.sendall(b"X-Drip-%d: y\r\n" % line)
                    except OSError:
                        pass
            return all(closed_by_peer(s) for s in slow)
        wait_until(dripped_then_cut, REQUEST_TIMEOUT + 120, interval=1.0,
                   what="every dripping client cut")
        assert line >= 2                      # the drip went on past one idle timeout
    finally:
        for s in slow:
            s.close()
    assert "not whole after" in peer.log_path.read_text()


def test_one_address_cannot_take_every_slot(peer):
    """One address beyond its MAX_PER_ADDRESS: its newest connection takes the slot of
    its oldest silent one; the other addresses are not touched."""
    mine = [slow_client(peer, "127.0.0.2") for _ in range(MAX_PER_ADDRESS)]
    try:
        one_more = slow_client(peer, "127.0.0.2")
        wait_until(lambda: closed_by_peer(mine[0]), 30)
        assert not closed_by_peer(one_more)
        assert not any(closed_by_peer(s) for s in mine[1:])
        assert health(peer) == 200            # from 127.0.0.1
        one_more.close()
    finally:
        for s in mine:
            s.close()
    wait_until(lambda: health(peer, "127.0.0.2") == 200, 30)   # its slots came back


def test_silent_sockets_of_one_address_do_not_keep_its_requests_out(peer):
    """MAX_PER_ADDRESS sockets opened from 127.0.0.1 and never written to (any user of
    the machine can): /health from 127.0.0.1, as ``pacsp2p status`` asks it, is
    answered at once, every time, while they are reopened (before 2026-12-07: refused
    with a reset for as long as they were held, IDLE_TIMEOUT each)."""
    held = [socket.create_connection(("127.0.0.1", peer.admin_port), timeout=30)
            for _ in range(MAX_PER_ADDRESS)]
    try:
        time.sleep(1)
        for _ in range(5):
            assert health(peer) == 200
            held = [s for s in held if not closed_by_peer(s)]
            held += [socket.create_connection(("127.0.0.1", peer.admin_port), timeout=30)
                     for _ in range(MAX_PER_ADDRESS - len(held))]
    finally:
        for s in held:
            s.close()
