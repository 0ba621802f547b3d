"""A flood of connections that never complete the TLS handshake on a real peer's overlay
port: anyone on the network can open them. Each one was a log line ("overlay link from
...: refused"), so the flood wrote the log as fast as it connected; now at most a burst
per window, then a count.
"""
from __future__ import annotations

import socket
import ssl

import pytest

from pacsp2p.overlay import tls
from pacsp2p.testing import echo, free_port
from pacsp2p.testing.cluster import wait_until

FLOOD = 300


def test_refused_overlay_links_write_a_bounded_log(make_peer, tmp_path):
    tls.init_ca(tmp_path / "ca")
    tls.issue(tmp_path / "ca", "lonely", out=tmp_path / "tls")
    port = free_port()
    peer = make_peer(name="lonely", config={"overlay": {
        "port": port, "bulk_port": free_port(), "bind": "127.0.0.1",
        "advertise": "127.0.0.1", "seeds": [], "tls_dir": str(tmp_path / "tls")}})
    for _ in range(FLOOD):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"\x16\x03\x01\x00\x05hello")     # a broken ClientHello, then gone
        s.close()
    wait_until(lambda: "more overlay link refused events" in peer.log_path.read_text(),
               60, what="the count of the refusals not logged")
    lines = [line for line in peer.log_path.read_text().splitlines()
             if "overlay link from 127.0.0.1" in line]
    assert 1 <= len(lines) < FLOOD // 5, len(lines)
    assert echo(peer.port, peer.ae_title)


def _handshake(port: int, tls_dir, name: str, source: str) -> str:
    """A TLS handshake to *port* from the address *source* with the certificate of
    *name* (signed by the cluster's CA): "ok" or why it failed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(tls_dir / "ca.crt"))
    ctx.load_cert_chain(str(tls_dir / f"{name}.crt"), str(tls_dir / f"{name}.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30,
                                      source_address=(source, 0)) as raw:
            with ctx.wrap_socket(raw) as s:
                s.do_handshake()
        return "ok"
    except (OSError, ssl.SSLError) as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize("which", ["overlay", "bulk"])
def test_silent_connections_cannot_lock_peers_out(make_peer, tmp_path, which):
    """Anyone can hold the port's pending-handshake slots with sockets that say
    nothing: 64 from one address held every slot and a real peer's link was refused
    until they timed out. Now one address holds at most 16, and the oldest silent one
    makes room for a new connection."""
    tls.init_ca(tmp_path / "ca")
    tls.issue(tmp_path / "ca", "lonely", out=tmp_path / "tls")
    tls.issue(tmp_path / "ca", "friend", out=tmp_path / "tls")
    ports = {"overlay": free_port(), "bulk": free_port()}
    peer = make_peer(name="lonely", config={"overlay": {
        "port": ports["overlay"], "bulk_port": ports["bulk"], "bind": "127.0.0.1",
        "advertise": "127.0.0.1", "seeds": [], "tls_dir": str(tmp_path / "tls"),
        "handshake_timeout": 300}})
    port = ports[which]
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30)
              for _ in range(tls.MAX_PENDING)]
    try:
        # a real peer on another address, and even one on the same address, gets in
        assert _handshake(port, tmp_path / "tls", "friend", "127.0.0.2") == "ok"
        assert _handshake(port, tmp_path / "tls", "friend", "127.0.0.1") == "ok"
        closed: set = set()

        def evicted() -> int:
            for s in silent:
                if s in closed:
                    continue
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        closed.add(s)
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed.add(s)
            return len(closed)
        wait_until(lambda: evicted() >= tls.MAX_PENDING - tls.MAX_PENDING_PER_ADDRESS + 1,
                   120, what="the oldest silent connections closed to make room")
        assert evicted() <= tls.MAX_PENDING - tls.MAX_PENDING_PER_ADDRESS + 2
    finally:
        for s in silent:
            s.close()
    assert echo(peer.port, peer.ae_title)
