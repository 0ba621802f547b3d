"""A C-MOVE whose requestor goes (a C-CANCEL, the release, an A-ABORT, a dropped
connection) while the peer is still setting up its association to the move destination
ends that association then (A-ABORT, the connection closed), not once the destination
answers (fourteenth hostile-input session).

The delivery's cancel did nothing while its association was being set up: the C-MOVE
answered at once, and the association went on being negotiated for nobody, released
only once the destination accepted it (or aborted at the ACSE timeout, 30 s). A
requestor looping C-MOVE + C-CANCEL on one association so left one connection pending
at a slow destination per C-MOVE; at a fast one (storescp) the association opened after
the C-MOVE's final response, where test_hostile_cancel's next case could see it (its
CI flake: 'destination freed' not true after 180 s).

The destination is a real socket server: it reads each A-ASSOCIATE-RQ and answers
(A-ASSOCIATE-RJ) only once the test has seen the requestor's operation end, then
records what the peer sent until the connection closed. Before: nothing (the peer took
the answer, then closed); now: an A-ABORT, sent before the operation ended.
"""
from __future__ import annotations

import socket
import struct
import threading

import pytest

from pacsp2p.testing import Peer, datasets
from pacsp2p.testing.cluster import patience, wait_until
from pacsp2p.testing.dcmtk import storescu
from pacsp2p.testing.fuzz import wire as w
from pacsp2p.testing.fuzz.client import elements, us
from pacsp2p.testing.ports import LOOPBACK

N = 3
STUDY = datasets.uid("move-abandoned-study")
IDENT = w.data_set({0x00080052: b"STUDY", 0x0020000D: STUDY.encode()})
REJECT = b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x01"     # A-ASSOCIATE-RJ (permanent)




class SlowDestination:
    """A C-MOVE destination that takes each association request and holds its answer
    until ``answer(i)``; ``seen[i]``: the PDU types connection *i* then received before
    it closed (bounded: 32 PDUs, ``patience(120)`` s)."""

    def __init__(self):
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.requested: list[threading.Event] = []
        self.go: list[threading.Event] = []
        self.closed: list[threading.Event] = []
        self.seen: list[list] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                i = len(self.seen)
                for lst in (self.requested, self.go, self.closed):
                    lst.append(threading.Event())
                self.seen.append([])
            threading.Thread(target=self._serve, args=(conn, i), daemon=True).start()

    def _serve(self, conn, i):
        conn.settimeout(patience(120))
        try:
            if w.read_pdu(conn)[0] != 0x01:
                return
            self.requested[i].set()
            if not self.go[i].wait(patience(120)):
                return
            try:
                conn.sendall(REJECT)
            except OSError:
                pass                         # the peer closed it already
            for _ in range(32):
                self.seen[i].append(w.read_pdu(conn)[0])
        except (OSError, ConnectionError, ValueError):
            pass
        finally:
            conn.close()
            self.closed[i].set()

    def wait_requested(self, i, requestor):
        """Until the peer's association request *i* arrived (not past the requestor's
        association ending: A-ABORT or closed)."""
        def gone():
            try:
                return requestor.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) in (
                    b"", b"\x07")
            except BlockingIOError:
                return False
        wait_until(lambda: len(self.requested) > i and self.requested[i].is_set() or
                   gone(), 60, what=f"the peer's association request {i} at the destination")
        assert not gone(), "the peer ended the requestor's association"

    def answer(self, i) -> list:
        """Answer request *i* now; what the peer had sent on it (PDU types)."""
        self.go[i].set()
        assert self.closed[i].wait(patience(120)), f"connection {i} never closed"
        return self.seen[i]

    def close(self):
        self.listener.close()
        for e in self.go:
            e.set()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("move-abandoned")
    series = datasets.uid("ma-series", STUDY)
    files = [datasets.write(datasets.make_image(
        "CT", size=32, seed=i, PatientID="MA0001", PatientName="MOVE^ABANDONED",
        StudyInstanceUID=STUDY, SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=i,
        SOPInstanceUID=datasets.uid("ma-sop", series, i)), d / "in" / f"{i:03d}.dcm")
        for i in range(1, N + 1)]
    dest = SlowDestination()
    try:
        with Peer(d / "peer", name="mabandoned",
                  destinations={"SLOW": f"{LOOPBACK}:{dest.port}"}) as p:
            storescu(p.port, p.ae_title, files)
            yield p, dest
    finally:
        dest.close()


def associate(peer) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, peer.port), timeout=patience(60))
    sock.sendall(w.associate_rq(called=peer.ae_title))
    assert w.read_pdu(sock)[0] == 0x02                      # A-ASSOCIATE-AC
    return sock


def move(sock, msg_id):
    sock.sendall(w.message(w.CX_MOVE, w.c_find(msg_id, w.MOVE_STUDY, w.C_MOVE_RQ,
                                               dest="SLOW"), IDENT))


def final_status(sock, msg_id) -> int:
    """The status of the final response to *msg_id* (Pending ones skipped)."""
    cmd = b""
    for _ in range(1000):
        kind, body = w.read_pdu(sock)
        assert kind == 0x04, f"PDU type {kind:#04x} instead of a response"
        pos = 0
        while pos + 6 <= len(body):
            length, _, control = struct.unpack_from(">IBB", body, pos)
            if control & 1:
                cmd += body[pos + 6:pos + 4 + length]
                if control & 2:
                    fields, cmd = elements(cmd), b""
                    status = us(fields, 0x0900, -1)
                    if us(fields, 0x0120) == msg_id and status not in w.PENDING:
                        return status
            pos += 4 + length
    raise AssertionError("no final response")


def left_lines(peer) -> int:
    return peer.log_path.read_text(errors="replace").count("C-MOVE requestor left")


def clean(peer):
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]


def test_a_c_cancel_while_the_destination_association_is_set_up_aborts_it(site):
    """Twice on one association (a requestor looping C-MOVE + C-CANCEL): each C-MOVE's
    association to the destination is aborted before its final response (0xFE00)."""
    peer, dest = site
    first = len(dest.seen)
    sock = associate(peer)
    try:
        for k in range(2):
            msg_id = 10 + k
            move(sock, msg_id)
            dest.wait_requested(first + k, sock)
            sock.sendall(w.message(w.CX_MOVE, w.command_set(
                [(0x0100, w.C_CANCEL_RQ), (0x0120, msg_id), (0x0800, w.NO_DATA)])))
            assert final_status(sock, msg_id) == 0xFE00
            assert dest.answer(first + k) == [0x07], \
                "the association to the destination was not aborted when the C-MOVE ended"
        sock.sendall(w.message(w.CX_ECHO, w.c_echo(20)))
        assert final_status(sock, 20) == 0x0000
        sock.sendall(w.RELEASE_RQ)
        assert w.read_pdu(sock)[0] == 0x06
    finally:
        sock.close()
    clean(peer)


@pytest.mark.parametrize("how", ["release", "abort", "drop"])
def test_a_requestor_gone_while_the_destination_association_is_set_up_aborts_it(site, how):
    peer, dest = site
    i = len(dest.seen)
    left = left_lines(peer)
    sock = associate(peer)
    try:
        move(sock, 1)
        dest.wait_requested(i, sock)
        if how == "release":
            sock.sendall(w.RELEASE_RQ)
            kinds = [w.read_pdu(sock)[0]]
            while kinds[-1] == 0x04 and len(kinds) < 100:    # Pending responses first
                kinds.append(w.read_pdu(sock)[0])
            assert kinds[-1] == 0x06, kinds                  # A-RELEASE-RP
        elif how == "abort":
            sock.sendall(w.ABORT)
    finally:
        sock.close()
    # the peer has taken the requestor's leaving (and cancelled the delivery) once the
    # line is written; only then does the destination answer
    wait_until(lambda: left_lines(peer) > left, 60, what="'C-MOVE requestor left' logged")
    assert dest.answer(i) == [0x07], \
        "the association to the destination was not aborted when the requestor left"
    clean(peer)
