"""One AMP box on an overlay link holds a bounded number of keys, and a link whose other
end reads nothing holds a bounded number of answers (fifteenth hostile-input session).

AMP bounds each key (255 bytes) and each value (65,535 bytes) of a box, not the number
of keys: a box is kept in memory until its empty key ends it. A client holding a
cluster certificate (a peer's, or one stolen) that sends one box of ever new keys and
never ends it grew the peer by its size: 400 MB sent in 2 s, RSS 104 -> 525 MB, the
link kept. Now a box of more keys than any command has (``link.MAX_BOX_KEYS``) closes
the link (one rate-limited line); the peer's other links go on.

The same client sending small commands and never reading their answers grew the peer
by the answers queued for it (59 MB of asks in 120 s: RSS 104 -> 282 MB, the link
kept). Now a link that is written more than ``link.MAX_UNREAD`` bytes while its transport
is full (the other end reads nothing) is closed.

Garbage (random bytes) on the link: the first length past AMP's bound closed the link
gracefully, which over TLS waits for the other end's close_notify; meanwhile AMP kept
every byte that came after in front of the length it refused (and copied it at each
read): 76 MB of garbage in 120 s, RSS 104 -> 261 MB. Now the link is aborted at once.

Two real peers; the client is a raw TLS socket with a cluster certificate.
"""
from __future__ import annotations

import random
import socket
import ssl
import struct
import time

import pytest

from pacsp2p.overlay import tls
from pacsp2p.testing.cluster import members, patience, wait_until
from pacsp2p.testing.ports import LOOPBACK
from pacsp2p.testing.fuzz.watch import Growth

BOX_MB = 64                  # what the client tries to put in one box


@pytest.fixture(scope="module")
def cluster(make_cluster):
    c = make_cluster(2)
    tls.issue(c.ca_dir, "intruder", out=c.tls_dir)       # a valid cluster certificate
    return c


def connect(cluster, peer) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cluster.tls_dir / "ca.crt")
    ctx.load_cert_chain(cluster.tls_dir / "intruder.crt", cluster.tls_dir / "intruder.key")
    raw = socket.create_connection((LOOPBACK, cluster.overlay_ports[peer.name][0]),
                                   timeout=patience(60))
    return ctx.wrap_socket(raw)


def mesh_kept(a, b) -> None:
    """Neither peer declared the other dead: on a busy host (the flood takes a core) SWIM
    may suspect the other for a moment and hear it refuted, which is what it is for."""
    wait_until(lambda: members(a)[b.name] == "alive" and members(b)[a.name] == "alive",
               30, 0.2, "both peers alive in each other's view")
    for p, other in ((a, b), (b, a)):
        assert f"peer {other.name} is dead" not in p.log_path.read_text(), p.name


def test_a_box_of_endless_keys_closes_the_link_not_the_memory(cluster):
    a, b = cluster[0], cluster[1]
    rss = Growth(a.pid)
    sock = connect(cluster, a)
    value = b"v" * 65535
    sent, closed = 0, False
    try:
        for i in range(BOX_MB * 16):           # 64 KB a key: BOX_MB MB in one box
            key = b"k%07d" % i
            sock.sendall(struct.pack(">H", len(key)) + key +
                         struct.pack(">H", len(value)) + value)
            sent += len(value)
    except OSError:
        closed = True                          # the peer closed the link
    if not closed:                             # all sent: closed since?
        sock.settimeout(patience(30))
        try:
            closed = sock.recv(1) == b""
        except OSError:
            closed = True
    sock.close()
    grown = rss.mb()
    print(f"\n{sent / 1e6:.0f} MB sent, link closed: {closed}, RSS +{grown:.0f} MB")
    assert closed, f"the link stayed open after {sent / 1e6:.0f} MB in one box"
    assert grown < BOX_MB / 2, f"RSS +{grown:.0f} MB"
    time.sleep(1)
    mesh_kept(a, b)
    log = a.log_path.read_text(errors="replace")
    assert "Unhandled" not in log and "Traceback" not in log


def test_asks_whose_answers_are_never_read_close_the_link(cluster):
    a, b = cluster[0], cluster[1]
    rss = Growth(a.pid)
    sock = connect(cluster, a)
    sent, closed, t0 = 0, False, time.monotonic()
    try:
        for i in range(3_000_000):             # an unknown command: an error answer each
            if time.monotonic() - t0 > patience(120):
                break
            ask = b"%d" % i
            box = (struct.pack(">H", 8) + b"_command" + struct.pack(">H", 4) + b"Nope" +
                   struct.pack(">H", 4) + b"_ask" + struct.pack(">H", len(ask)) + ask +
                   b"\0\0")
            sock.sendall(box)
            sent += len(box)
    except OSError:
        closed = True                          # the peer closed the link
    sock.close()
    grown = rss.mb()
    print(f"\n{sent / 1e6:.0f} MB of asks in {time.monotonic() - t0:.0f} s, link closed: "
          f"{closed}, RSS +{grown:.0f} MB")
    assert closed, f"the link stayed open after {sent / 1e6:.0f} MB of asks"
    assert grown < 64, f"RSS +{grown:.0f} MB"
    time.sleep(1)
    mesh_kept(a, b)


def test_garbage_aborts_the_link(cluster):
    a, b = cluster[0], cluster[1]
    rss = Growth(a.pid)
    sock = connect(cluster, a)
    rng = random.Random(15)
    garbage = bytes(rng.getrandbits(8) for _ in range(65536))
    sent, closed, t0 = 0, False, time.monotonic()
    sock.settimeout(10)
    try:
        while sent < BOX_MB << 20 and time.monotonic() - t0 < patience(60):
            sock.sendall(garbage)
            sent += len(garbage)
    except OSError:
        closed = True
    sock.close()
    grown = rss.mb()
    print(f"\n{sent / 1e6:.1f} MB of garbage in {time.monotonic() - t0:.0f} s, link "
          f"closed: {closed}, RSS +{grown:.0f} MB")
    assert closed, f"the link took {sent / 1e6:.0f} MB of garbage"
    assert grown < 32, f"RSS +{grown:.0f} MB"
    mesh_kept(a, b)
