"""The native facade's acceptor (pacsp2p.dicom.acceptor) at the edges the black-box suites
do not reach: a requestor that aborts or vanishes in the middle of a C-STORE data set, a
PDU larger than the maximum we advertised, concurrent associations and the
max_associations limit.

A raw socket client (below) speaks the upper layer protocol byte by byte, with the
encoders of pacsp2p.dicom.pdu / dimse, so that it can do what DCMTK and pynetdicom never
do on purpose. Real peers, loopback, free ports.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC

from pacsp2p.dicom import dimse
from pacsp2p.dicom.pdu import PDV, RELEASE_RQ, abort_pdu, associate_rq
from pacsp2p.testing import dataset_sha256, datasets, echo, findscu, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import _meta_end
from pacsp2p.testing.cluster import patience


STUDY = datasets.uid("acceptor-study")


class RawAssociation:
    """A blocking requestor that sends whatever PDUs it is told to."""

    def __init__(self, port: int, called: str, contexts, calling: str = "RAWSCU"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(associate_rq(called, calling, contexts))
        pdu_type, pdu = self.read_pdu()
        assert pdu_type == 0x02, f"association not accepted (PDU type {pdu_type})"
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu)
        self.accepted = {item.context_id: str(item.transfer_syntax)
                         for item in ac.presentation_context if item.result == 0}

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the acceptor")
            out += chunk
        return bytes(out)

    def read_pdu(self) -> tuple[int, bytes]:
        head = self.recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        return pdu_type, head + self.recv_exact(length)

    def pdu(self, cid: int, data: bytes, command: bool, last: bool) -> bytes:
        """One P-DATA-TF PDU holding all of *data* in one PDV, whatever its size."""
        control = (1 if command else 0) | (2 if last else 0)
        return PDV.pack(0x04, 0, len(data) + 6, len(data) + 2, cid, control) + data

    def response(self) -> dict:
        """The next command set the acceptor sends (its fragments gathered)."""
        cmd = b""
        while True:
            pdu_type, pdu = self.read_pdu()
            assert pdu_type == 0x04, f"expected P-DATA, got PDU type {pdu_type}"
            pos = 6
            while pos < len(pdu):
                length, _, control = struct.unpack_from(">IBB", pdu, pos)
                cmd += pdu[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 3 == 3:
                    return dimse.command_elements(cmd)

    def close(self):
        self.sock.close()


def ct_file(directory: Path, name: str, size: int) -> tuple[Path, bytes]:
    ds = datasets.make_image("CT", size=size, StudyInstanceUID=STUDY, PatientID="ACC001",
                             SOPInstanceUID=datasets.uid("acceptor", name))
    path = datasets.write(ds, directory / f"{name}.dcm")
    raw = path.read_bytes()
    return path, raw[_meta_end(raw):]


def store_rq(uid: str, msg_id: int = 1) -> bytes:
    return dimse.c_store_rq(msg_id, CTImageStorage, uid)


def held(peer) -> set[str]:
    """``<SOP Instance UID>.dcm`` of every file the peer's archive holds."""
    return {f"{dn.sop_uid(p)}.dcm" for p in dn.archive_files(peer.data_dir)}


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("how", ["abort", "close"])
def test_requestor_leaving_mid_store_leaves_nothing(make_peer, tmp_path, how):
    """Half of a 2 MB data set, then A-ABORT (or the TCP connection just closes): no file
    stays in incoming, nothing is stored or recorded, and the peer serves on."""
    peer = make_peer()
    path, data = ct_file(tmp_path, "cut", 1024)
    uid = dn.sop_uid(path)
    raw = RawAssociation(peer.port, peer.ae_title,
                         [(1, CTImageStorage, [ExplicitVRLittleEndian])])
    raw.sock.sendall(raw.pdu(1, store_rq(uid), command=True, last=True))
    half = len(data) // 2
    for pos in range(0, half, 65536):
        raw.sock.sendall(raw.pdu(1, data[pos:min(pos + 65536, half)], False, False))
    incoming = peer.data_dir / "incoming"

    def partial():      # incoming also holds empty spare files made ahead
        found = []
        for p in incoming.iterdir():
            try:
                if p.stat().st_size:
                    found.append(p)
            except FileNotFoundError:       # removed between listing and stat
                pass
        return found

    assert wait_until(partial), "the partial file was never written"
    if how == "abort":
        raw.sock.sendall(abort_pdu())
    raw.close()
    assert wait_until(lambda: not partial()), partial()
    assert held(peer) == set()
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""})
    assert proc.returncode == 0 and rows == []
    assert list((peer.data_dir / "archives" / "local" / "tmp").iterdir()) == []
    # the same instance, sent whole, is stored as usual
    storescu(peer.port, peer.ae_title, [path])
    assert held(peer) == {f"{uid}.dcm"}


def test_pdu_larger_than_our_maximum_is_received(make_peer, tmp_path):
    """We advertise 16 KB; a requestor that sends the whole 600 KB data set in one PDU
    (and its command in another) still gets its instance stored byte-identical."""
    peer = make_peer(config={"facade": {"max_pdu": 16384}})
    path, data = ct_file(tmp_path, "big-pdu", 550)
    assert len(data) > 500_000
    raw = RawAssociation(peer.port, peer.ae_title,
                         [(1, CTImageStorage, [ExplicitVRLittleEndian])])
    raw.sock.sendall(raw.pdu(1, store_rq(dn.sop_uid(path)), True, True)
                     + raw.pdu(1, data, False, True))
    rsp = raw.response()
    assert dimse.us(rsp, dimse.COMMAND_FIELD) == dimse.C_STORE_RSP
    assert dimse.us(rsp, dimse.STATUS) == 0x0000
    assert dimse.text(rsp, dimse.AFFECTED_SOP_INSTANCE) == dn.sop_uid(path)
    raw.sock.sendall(RELEASE_RQ)
    assert raw.read_pdu()[0] == 0x06
    raw.close()
    [stored] = dn.archive_files(peer.data_dir)
    assert dataset_sha256(stored) == dataset_sha256(path)


def test_many_small_pdus_and_pdvs_split_anywhere(make_peer, tmp_path):
    """Data set fragments of 1..997 bytes, several PDVs per PDU, the PDU bytes written
    to the socket in pieces that cut headers in half: reassembled exactly."""
    peer = make_peer()
    path, data = ct_file(tmp_path, "split", 64)
    raw = RawAssociation(peer.port, peer.ae_title,
                         [(1, CTImageStorage, [ExplicitVRLittleEndian])])
    stream = bytearray(raw.pdu(1, store_rq(dn.sop_uid(path)), True, True))
    pos, size = 0, 1
    while pos < len(data):
        pdvs = []
        for _ in range(3):
            piece = data[pos:pos + size]
            pos += len(piece)
            control = 2 if pos >= len(data) else 0
            pdvs.append(struct.pack(">IBB", len(piece) + 2, 1, control) + piece)
            size = size * 7 % 997 + 1
            if pos >= len(data):
                break
        body = b"".join(pdvs)
        stream += struct.pack(">BBI", 4, 0, len(body)) + body
    for i in range(0, len(stream), 5):                  # 5-byte writes
        raw.sock.sendall(stream[i:i + 5])
    assert dimse.us(raw.response(), dimse.STATUS) == 0x0000
    raw.close()
    [stored] = dn.archive_files(peer.data_dir)
    assert dataset_sha256(stored) == dataset_sha256(path)


def test_concurrent_associations_store_together(make_peer, tmp_path):
    """Two associations open at once, each storing while the other is open."""
    peer = make_peer()
    files = [ct_file(tmp_path, f"c{i}", 32)[0] for i in range(20)]
    halves = [files[:10], files[10:]]
    statuses: list = [[], []]
    ready = threading.Barrier(2, timeout=20)

    def run(i):
        with dn.association(peer.port, peer.ae_title,
                            [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as a:
            ready.wait()
            for path in halves[i]:
                statuses[i].append(a.send_c_store(path).Status)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [[0] * 10, [0] * 10]
    assert held(peer) == {f"{dn.sop_uid(p)}.dcm" for p in files}


def test_max_associations_rejects_the_one_too_many(make_peer):
    peer = make_peer(config={"facade": {"max_associations": 1}})
    raw = RawAssociation(peer.port, peer.ae_title,
                         [(1, "1.2.840.10008.1.1", [ExplicitVRLittleEndian])])
    try:
        assert not echo(peer.port, peer.ae_title)
        log = peer.log_path.read_text()
        assert "rejected: 1 associations already" in log
    finally:
        raw.sock.sendall(RELEASE_RQ)
        raw.close()
    assert wait_until(lambda: echo(peer.port, peer.ae_title))
