"""A C-GET requestor that stops reading holds at most a byte-bounded window (fifteenth
hostile-input session).

The facade's C-GET reads its instances through a ``Retrieval`` that fetches ahead of the
sub-operations. Its window was bounded by count alone (64 instances), and instances up
to ``verify.WHOLE`` (1 MB) are held in memory: a requestor that takes the first C-STORE
and then reads nothing more (its TCP window full, the association kept open) held 64 x
512 KB = 32 MB of a CT study until it was aborted, and ``max_associations`` such
requestors up to 2 GB. Now the window is bounded by the bytes it holds in memory as well
(``retrieve.WINDOW_BYTES``, 16 MB): about 32 such CTs, not 64. The association still
ends with an A-ABORT once the requestor has read nothing for the idle timeout.

Sixteenth session: what all the stalled requestors hold together is bounded as well
(``held.SHARED_BYTES``, 64 MB, and ``held.FLOOR_BYTES`` each past it): 8 of them held 8
x 16 MB before.

A real lone peer, a raw-socket requestor (``pacsp2p.testing.fuzz.wire``) with a small
receive buffer, the peer's /status.
"""
from __future__ import annotations

import socket
import time

import pytest
from pydicom import dcmread

from pacsp2p.testing import Peer, datasets
from pacsp2p.testing.cluster import get_json, patience, wait_until
from pacsp2p.testing.dcmtk import storescu
from pacsp2p.testing.fuzz import wire as w
from pacsp2p.testing.ports import LOOPBACK

N = 80                  # CTs of 512 x 512 x 16 bits: 512 KB each, 40 MB in all
WINDOW_BYTES = 16 << 20
SHARED_BYTES, FLOOR_BYTES = 64 << 20, 2 << 20       # (transfer.held)
IDLE = 8.0


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("stalled-files")
    paths = datasets.make_study(d, patient_id="STALLED", size=512,
                                series=(("CT", N, "1.2.840.10008.1.2.1"),))
    study = str(dcmread(paths[0]).StudyInstanceUID)
    size = paths[0].stat().st_size
    with Peer(tmp_path_factory.mktemp("stalled"), name="stalled",
              config={"facade": {"idle_timeout": IDLE}}) as peer:
        storescu(peer.port, peer.ae_title, [d])
        yield peer, study, size


def settled(peer, rid, seen: list) -> bool:
    """The retrieval fetches nothing more: none in flight, the same count done twice
    a second apart."""
    r = next(r for r in get_json(peer)["retrievals"] if r["id"] == rid)
    flying = sum(s["in_flight"] for s in r["sources"].values())
    seen.append(r["done"])
    if flying or len(seen) < 2 or seen[-1] != seen[-2]:
        time.sleep(1)
        return False
    return True


def stalled_get(peer, study: str) -> socket.socket:
    """A C-GET of *study* whose requestor takes the first C-STORE-RQ and reads nothing
    more (a small receive buffer), its association kept open."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(patience(60))
    sock.connect((LOOPBACK, peer.port))
    sock.sendall(w.associate_rq(contexts=[(1, w.GET_STUDY, [w.IMPLICIT]),
                                          (3, w.CT, [w.EXPLICIT])], roles=[w.CT]))
    assert w.read_pdu(sock)[0] == 0x02                      # A-ASSOCIATE-AC
    identifier = w.data_set({0x00080052: b"STUDY", 0x0020000D: study.encode()})
    sock.sendall(w.message(1, w.c_find(1, w.GET_STUDY, w.C_GET_RQ), identifier))
    assert w.read_pdu(sock)[0] == 0x04           # the first C-STORE-RQ; then nothing read
    return sock


def new_retrievals(peer, before: set, n: int) -> list:
    found: list = []

    def appeared():
        found[:] = [r["id"] for r in get_json(peer)["retrievals"] if r["id"] not in before]
        return len(found) >= n
    wait_until(appeared, 60, what=f"{n} new retrieval(s) in /status")
    return found


def test_a_stalled_c_get_holds_a_window_bounded_in_bytes(site):
    peer, study, size = site
    assert 400_000 < size <= 1 << 20        # held in memory when fetched (verify.WHOLE)
    before = {r["id"] for r in get_json(peer)["retrievals"]}
    sock = stalled_get(peer, study)
    try:
        (rid,) = new_retrievals(peer, before, 1)
        seen: list = []
        wait_until(lambda: settled(peer, rid, seen), 120,
                   what="the stalled C-GET's retrieval fetching nothing more")
        done = seen[-1]
        # one sent (on the wire, unread), the rest held: at most WINDOW_BYTES of them
        # (the window is claimed at the average size: one instance over at most)
        assert (done - 1) * size <= WINDOW_BYTES + size, (done, size)
        assert done < N
        # and the requestor that reads nothing is let go: A-ABORT, the retrieval cancelled
        wait_until(lambda: next(r for r in get_json(peer)["retrievals"]
                                if r["id"] == rid)["cancelled"], 120,
                   what="the stalled C-GET ended (idle timeout)")
    finally:
        sock.close()


def test_stalled_c_gets_together_hold_a_shared_budget(site):
    """8 stalled requestors: at 1a343bf each held its 16 MB window (8 x ~31 CTs held,
    128 MB); now all together at most SHARED_BYTES, and FLOOR_BYTES each past it."""
    peer, study, size = site
    clients = 8
    before = {r["id"] for r in get_json(peer)["retrievals"]}
    socks = []
    try:
        for _ in range(clients):
            socks.append(stalled_get(peer, study))
        rids = new_retrievals(peer, before, clients)
        for rid in rids:
            seen: list = []
            wait_until(lambda: settled(peer, rid, seen), 120,
                       what=f"stalled C-GET {rid} fetching nothing more")
        held = {r["id"]: r["done"] - 1 for r in get_json(peer)["retrievals"]
                if r["id"] in rids}        # one sent (on the wire, unread) each
        total = sum(held.values()) * size
        assert total <= SHARED_BYTES + clients * (FLOOR_BYTES + size), (held, size)
        assert all(n >= 1 for n in held.values()), held      # each one still served
    finally:
        for s in socks:
            s.close()
