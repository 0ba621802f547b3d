"""A direct-mode C-MOVE whose requestor leaves stops every holder's share (fifteenth
hostile-input session).

With ``mode = "direct"`` each holder peer sends its share of a C-MOVE to the destination
itself: the asking peer through its own delivery, the others on ``SendTo`` (chunks of
50). When the requestor left (A-ABORT), only the asking peer's own delivery was
cancelled: each other holder went on sending the chunk it had been asked for, to a
destination nobody was waiting on. Now the asking peer sends ``CancelSend`` to each
holder with a ``SendTo`` under way, and the holder cancels that delivery; a holder whose
link to the asking peer is lost (that peer killed) cancels the shares asked on it (their
answer cannot arrive: the C-MOVE is gone, or hands them to other holders).

Three real peers (R=2), a real DICOM destination (a pynetdicom storage SCP taking
0.05 s per C-STORE, so that a chunk lasts a few seconds) in direct mode, a raw-socket
requestor (``pacsp2p.testing.fuzz.wire``) that aborts once some instances arrived.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from pacsp2p.testing.cluster import Cluster, store_study, wait_replicated, wait_until
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.fuzz import wire as w
from pacsp2p.testing.ports import LOOPBACK

N = 300
ABORT_AT = 20                # instances at the destination when the requestor aborts
PER_STORE = 0.05             # seconds the destination takes per C-STORE
AFTER = 16                   # arrivals allowed after the abort (in flight then)


class SlowSCP:
    """A pynetdicom storage SCP: counts what arrives and the associations open."""

    def __init__(self):
        self.lock = threading.Lock()
        self.arrived: list[float] = []
        self.open = 0
        self.ae = AE(ae_title="SLOWSCP")
        self.ae.supported_contexts = StoragePresentationContexts
        self.ae.maximum_associations = 32
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_OPEN, self._opened),
                    (evt.EVT_CONN_CLOSE, self._closed)]
        self.server = self.ae.start_server((LOOPBACK, 0), block=False,
                                           evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event):
        time.sleep(PER_STORE)
        with self.lock:
            self.arrived.append(time.monotonic())
        return 0x0000

    def _opened(self, event):
        with self.lock:
            self.open += 1

    def _closed(self, event):
        with self.lock:
            self.open -= 1

    def count(self) -> int:
        with self.lock:
            return len(self.arrived)

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def dest():
    scp = SlowSCP()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, dest):
    c = Cluster(tmp_path_factory.mktemp("direct-cancel"),
                {"SLOWSCP": {"address": f"{LOOPBACK}:{dest.port}", "mode": "direct"}})
    try:
        c.start(3)
        c.wait_mesh(timeout=30)
        yield c
    finally:
        c.stop()


def start_move(a, dest, study) -> socket.socket:
    """A raw-socket C-MOVE of *study* to SLOWSCP at *a*, once ABORT_AT instances arrived."""
    sock = socket.create_connection((LOOPBACK, a.port), timeout=patience(60))
    sock.sendall(w.associate_rq(called=a.ae_title))
    assert w.read_pdu(sock)[0] == 0x02                  # A-ASSOCIATE-AC
    ident = w.data_set({0x00080052: b"STUDY", 0x0020000D: study.encode()})
    sock.sendall(w.message(w.CX_MOVE, w.c_find(1, w.MOVE_STUDY, w.C_MOVE_RQ,
                                               dest="SLOWSCP"), ident))
    before = dest.count()
    wait_until(lambda: dest.count() >= before + ABORT_AT, 120, interval=0.01,
               what=f"{ABORT_AT} instances at the destination")
    return sock


def arrived_after(dest, at: int) -> int:
    """Instances that arrived after *at* once the destination is quiet (nothing for 3 s,
    no association open)."""
    def quiet():
        with dest.lock:
            last = dest.arrived[-1] if dest.arrived else 0.0
            return dest.open == 0 and time.monotonic() - last > 3.0
    wait_until(quiet, 120, interval=0.2,
               what="the destination receiving nothing more, no association open")
    after = dest.count() - at
    print(f"\n{at} instances when the move was left, {after} after it")
    return after


def stored(cluster, tmp_path, patient):
    a = cluster[0]
    study, _ = store_study(a, tmp_path / "study", patient, N, modality="CT")
    rows = wait_replicated(a, study, N, timeout=120)
    holders = {x["peer"] for r in rows for x in r["replicas"]}
    assert len(holders) == 3, holders
    return study


def test_an_aborted_direct_move_stops_every_holders_share(cluster, dest, tmp_path):
    study = stored(cluster, tmp_path, "DCANCEL01")
    sock = start_move(cluster[0], dest, study)
    try:
        sock.sendall(w.ABORT)
    finally:
        sock.close()
    at = dest.count()
    assert arrived_after(dest, at) <= AFTER


def test_holders_stop_the_shares_of_a_peer_killed_mid_move(cluster, dest, tmp_path):
    study = stored(cluster, tmp_path, "DCANCEL02")
    a = cluster[0]
    sock = start_move(a, dest, study)
    try:
        assert a.kill9() == -9
    finally:
        sock.close()
    at = dest.count()
    assert arrived_after(dest, at) <= AFTER
