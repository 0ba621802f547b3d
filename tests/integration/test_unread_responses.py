"""A requestor that sends requests and never reads the responses is held back, not
buffered for (fifteenth hostile-input session).

The facade answered each request as it came and wrote the response to a transport whose
buffer grew without bound while the requestor read nothing: C-ECHO-RQs sent in a loop
(each answered at once, so the 16 queued requests were never reached) grew a lone peer
by what it could not send: 50 MB of requests in 90 s, RSS 102 -> 189 MB, the idle
timeout never reached (the requests kept coming). Now an association whose transport
is full stops being read until it drains: the requestor's sends block, the peer's
memory stays, and the idle timeout ends the association (nothing read for that long).

A real lone peer, a raw-socket requestor (``pacsp2p.testing.fuzz.wire``).
"""
from __future__ import annotations

import socket
import time

import pytest

from pacsp2p.testing import Peer
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.dcmtk import dcmtk_env, dcmtk_path
from pacsp2p.testing.fuzz import wire as w
from pacsp2p.testing.ports import LOOPBACK
from pacsp2p.testing.fuzz.watch import Growth

import subprocess

IDLE = 5.0


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("unread"), name="unread",
              config={"facade": {"idle_timeout": IDLE}}) as p:
        yield p


def test_echoes_whose_responses_are_never_read_hold_the_requestor_back(peer):
    rss = Growth(peer.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(patience(60))
    sock.connect((LOOPBACK, peer.port))
    sent, held, t0 = 0, False, time.monotonic()
    try:
        sock.sendall(w.associate_rq(called=peer.ae_title))
        assert w.read_pdu(sock)[0] == 0x02                  # A-ASSOCIATE-AC; then nothing read
        sock.settimeout(10)
        i = 0
        while time.monotonic() - t0 < 60 and sent < 400 << 20:
            batch = b"".join(w.message(w.CX_ECHO, w.c_echo((i + k) % 65535 + 1))
                             for k in range(1000))
            i += 1000
            sock.sendall(batch)
            sent += len(batch)
    except OSError:                      # blocked for 10 s (the peer reads no more), or
        held = True                      # the association ended (the idle timeout)
    finally:
        sock.close()
    grown = rss.mb()
    print(f"\n{sent / 1e6:.1f} MB of C-ECHO-RQs in {time.monotonic() - t0:.0f} s, "
          f"held back: {held}, RSS +{grown:.0f} MB")
    assert held, f"the peer read {sent / 1e6:.0f} MB of requests whose answers nobody read"
    assert grown < 32, f"RSS +{grown:.0f} MB"
    # the peer goes on: another requestor's C-ECHO is answered
    echo = subprocess.run([str(dcmtk_path("echoscu")), "-aec", peer.ae_title, "-to", "60",
                           "-ta", "60", "-td", "60", LOOPBACK, str(peer.port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=120)
    assert echo.returncode == 0, echo.stdout + echo.stderr
