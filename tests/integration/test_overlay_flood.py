"""A flood of connections that never complete the TLS handshake on a real peer's overlay
port: anyone on the network can open them. Each one was a log line ("overlay link from
...: refused"), so the flood wrote the log as fast as it connected; now at most a burst
per window, then a count.
"""
from __future__ import annotations

import socket

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
