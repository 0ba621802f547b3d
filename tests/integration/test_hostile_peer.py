"""Hostile clients against a real peer (issue 11): what an attacker on the network did,
replayed with raw sockets, DCMTK and pynetdicom against `twistd pacsp2p`.

Silent sockets (more than max_associations, more than max_pending, from one address and
from several), a presentation context without an abstract syntax, a 7-byte maximum PDU,
endless command fragments, a non-ASCII SOP Instance UID, a process near its file
descriptor limit, a full disk (a small tmpfs as the peer's data directory). Each time:
legitimate clients still get in, the attacker gets an A-ASSOCIATE-RJ, an A-ABORT, a DIMSE
failure status or a closed socket, the log has no traceback and no "Unhandled", and the
archive and the catalog agree.
"""
from __future__ import annotations

import os
import resource
import select
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import Verification

from pacsp2p.dicom import dimse
from pacsp2p.dicom.pdu import APPLICATION_CONTEXT, PDV, RELEASE_RQ
from pacsp2p.testing import LOOPBACK, Peer, datasets, echo, findscu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import _meta_end
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.fuzz.watch import rss_kib

HOSTS = [f"127.0.0.{i}" for i in range(2, 10)]   # loopback addresses other than ours
STUDY = datasets.uid("hostile-study")


# -- a raw requestor -------------------------------------------------------------------------
def item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(called: str, contexts, max_pdu: int = 0, calling: str = "HOSTILE") -> bytes:
    """A-ASSOCIATE-RQ; *contexts* [(id, abstract syntax or None, [transfer syntaxes])]."""
    items = item(0x10, APPLICATION_CONTEXT)
    for cid, abstract, syntaxes in contexts:
        sub = item(0x30, abstract.encode()) if abstract else b""
        sub += b"".join(item(0x40, ts.encode()) for ts in syntaxes)
        items += item(0x20, bytes((cid, 0, 0, 0)) + sub)
    items += item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + bytes(32) + items)
    return struct.pack(">BBI", 1, 0, len(body)) + body


def pdv(cid: int, data: bytes, command: bool, last: bool) -> bytes:
    control = (1 if command else 0) | (2 if last else 0)
    return PDV.pack(0x04, 0, len(data) + 6, len(data) + 2, cid, control) + data


class Raw:
    """A blocking socket speaking the upper layer protocol byte by byte."""

    def __init__(self, port: int, host: str = LOOPBACK):
        self.sock = socket.socket()
        self.sock.settimeout(30)
        self.sock.bind((host, 0))
        self.sock.connect((LOOPBACK, port))

    def read_pdu(self) -> tuple[int, bytes]:
        head = self.exact(6)
        kind, _, length = struct.unpack(">BBI", head)
        return kind, head + self.exact(length)

    def exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the peer")
            out += chunk
        return bytes(out)

    def response(self) -> dict:
        """The next command set the peer sends."""
        cmd = b""
        while True:
            kind, pdu = self.read_pdu()
            assert kind == 0x04, f"expected P-DATA-TF, got PDU type {kind}"
            pos = 6
            while pos < len(pdu):
                length, _, control = struct.unpack_from(">IBB", pdu, pos)
                cmd += pdu[pos + 6:pos + 4 + length]
                pos += 4 + length
                if control & 3 == 3:
                    return dimse.command_elements(cmd)

    def close(self):
        self.sock.close()


def accepted(pdu: bytes) -> dict[int, int]:
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu)
    return {cx.context_id: cx.result for cx in ac.presentation_context}


def echo_rq(msg_id: int = 1) -> bytes:
    return dimse.command([(dimse.AFFECTED_SOP_CLASS, Verification.encode()),
                          (dimse.COMMAND_FIELD, dimse.C_ECHO_RQ), (dimse.MESSAGE_ID, msg_id),
                          (dimse.DATA_SET_TYPE, dimse.NO_DATA_SET)])


# -- silent sockets ---------------------------------------------------------------------------
def silent(port: int, host: str) -> socket.socket:
    s = socket.socket()
    s.bind((host, 0))
    s.connect((LOOPBACK, port))
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """True once the peer closed (or reset) the socket; it sent nothing before."""
    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, OSError):
        return True


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + patience(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def assert_clean_log(peer, *also: str) -> str:
    text = peer.log_path.read_text(errors="replace")
    for bad in ("Unhandled", "Traceback", *also):
        assert bad not in text, f"{bad!r} in {peer.log_path}"
    return text


def test_silent_sockets_lock_nobody_out(make_peer):
    """Before: 33 silent sockets locked every modality out (max_associations counted
    connections that never sent an A-ASSOCIATE-RQ). Now 80 of them, from five
    addresses, do not: the oldest pending ones make room, C-ECHO gets through."""
    peer = make_peer()
    socks = [silent(peer.port, host) for host in HOSTS[:5] for _ in range(16)]
    try:
        assert echo(peer.port, peer.ae_title)
        assert wait_until(lambda: sum(closed_by_peer(s) for s in socks) >= 80 - 64)
        with dn.association(peer.port, peer.ae_title, [build_context(Verification)]) as a:
            assert a.send_c_echo().Status == 0
    finally:
        for s in socks:
            s.close()
    text = assert_clean_log(peer)
    room = [line for line in text.splitlines() if "to make room (pending limit)" in line]
    assert 1 <= len(room) <= 10                      # one line per event, rate-limited


def test_one_address_holds_at_most_max_per_address(make_peer):
    peer = make_peer()
    socks = [silent(peer.port, HOSTS[6]) for _ in range(20)]
    try:
        assert wait_until(lambda: [closed_by_peer(s) for s in socks[:4]] == [True] * 4)
        time.sleep(0.5)
        assert not any(closed_by_peer(s) for s in socks[4:])
        assert echo(peer.port, peer.ae_title)        # from another address
    finally:
        for s in socks:
            s.close()
    assert "to make room (per-address limit)" in assert_clean_log(peer)


def test_file_descriptor_reserve_keeps_the_facade_accepting(make_peer):
    """The peer near its RLIMIT_NOFILE: 96 silent sockets never make it run out of file
    descriptors (no EMFILE), C-ECHO gets through meanwhile and after."""
    peer = make_peer()
    pid = peer.process.pid
    used = len(os.listdir(f"/proc/{pid}/fd"))
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    limit = used + 64 + 24                           # the default reserve is 64
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, before[1]))
    socks = []
    try:
        socks = [silent(peer.port, host) for host in HOSTS for _ in range(12)]
        assert echo(peer.port, peer.ae_title)
        assert len(os.listdir(f"/proc/{pid}/fd")) < limit
        assert sum(closed_by_peer(s) for s in socks) > 0
    finally:
        for s in socks:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
    assert echo(peer.port, peer.ae_title)
    text = assert_clean_log(peer, "EMFILE", "Too many open files")
    assert "file descriptor reserve" in text


# -- association negotiation --------------------------------------------------------------------
def test_context_without_abstract_syntax_is_rejected_and_the_rest_works(make_peer):
    """Before: negotiate_as_acceptor raised in the reactor; the connection was dropped
    without an A-ABORT and an Unhandled Error logged."""
    peer = make_peer()
    raw = Raw(peer.port)
    try:
        raw.sock.sendall(associate_rq(peer.ae_title, [
            (1, Verification, [ExplicitVRLittleEndian]), (3, None, [ExplicitVRLittleEndian])]))
        kind, pdu = raw.read_pdu()
        assert kind == 0x02
        assert accepted(pdu) == {1: 0, 3: 3}         # 3: abstract syntax not supported
        raw.sock.sendall(pdv(1, echo_rq(), True, True))
        assert dimse.us(raw.response(), dimse.STATUS) == 0
        raw.sock.sendall(RELEASE_RQ)
        assert raw.read_pdu()[0] == 0x06
    finally:
        raw.close()
    assert_clean_log(peer)


def test_a_7_byte_maximum_pdu_is_rejected(make_peer):
    """Before: accepted, and every byte sent to it cost 13 on the wire."""
    peer = make_peer()
    raw = Raw(peer.port)
    try:
        raw.sock.sendall(associate_rq(peer.ae_title, [
            (1, Verification, [ExplicitVRLittleEndian])], max_pdu=7))
        kind, pdu = raw.read_pdu()
        assert (kind, pdu[7:]) == (0x03, bytes((1, 2, 1)))   # permanent, ACSE, no reason
    finally:
        raw.close()
    assert "maximum PDU length 7 below 4096" in assert_clean_log(peer)


# -- bounded buffers ----------------------------------------------------------------------------
def test_endless_command_fragments_are_aborted(make_peer):
    """Before: one association took 2 GB of memory with command fragments never marked
    last. Now the command set is cut at 64 KiB with an A-ABORT."""
    peer = make_peer()
    rss = rss_kib(peer.process.pid)
    raw = Raw(peer.port)
    try:
        raw.sock.sendall(associate_rq(peer.ae_title, [(1, Verification,
                                                      [ExplicitVRLittleEndian])]))
        assert raw.read_pdu()[0] == 0x02
        piece = pdv(1, b"\0" * 16384, command=True, last=False)
        sent = 0
        try:
            while sent < 64 << 20:
                raw.sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        kind, pdu = raw.read_pdu()
        assert kind == 0x07                           # A-ABORT
    except ConnectionResetError:
        pass                                          # the A-ABORT lost in the reset
    finally:
        raw.close()
    assert sent < 64 << 20
    assert rss_kib(peer.process.pid) - rss < 32 << 10
    assert "command set larger than 65536 bytes" in assert_clean_log(peer)
    assert echo(peer.port, peer.ae_title)


# -- hostile values -------------------------------------------------------------------------------
def ct_file(directory: Path, name: str, size: int = 64) -> Path:
    ds = datasets.make_image("CT", size=size, StudyInstanceUID=STUDY, PatientID="HOSTILE",
                             SeriesInstanceUID=datasets.uid("hostile-series"),
                             SOPInstanceUID=datasets.uid("hostile", name))
    return datasets.write(ds, directory / f"{name}.dcm")


def test_non_ascii_sop_instance_uid_gets_a_failure_status(make_peer, tmp_path):
    """Before: UnicodeEncodeError in incoming.file_meta, raised in the reactor: no status,
    no A-ABORT. Now a DIMSE failure status, and the association goes on."""
    peer = make_peer()
    raw_file = ct_file(tmp_path, "non-ascii").read_bytes()
    data = raw_file[_meta_end(raw_file):]
    raw = Raw(peer.port)
    try:
        raw.sock.sendall(associate_rq(peer.ae_title, [
            (1, Verification, [ExplicitVRLittleEndian]),
            (3, CTImageStorage, [ExplicitVRLittleEndian])]))
        assert raw.read_pdu()[0] == 0x02
        command = dimse.command([
            (dimse.AFFECTED_SOP_CLASS, CTImageStorage.encode()),
            (dimse.COMMAND_FIELD, dimse.C_STORE_RQ), (dimse.MESSAGE_ID, 7),
            (dimse.PRIORITY, 0), (dimse.DATA_SET_TYPE, 0),
            (dimse.AFFECTED_SOP_INSTANCE, "1.2.\u00e9\u4e2d.3".encode("utf-8"))])
        raw.sock.sendall(pdv(3, command, True, True) + pdv(3, data, False, True))
        rsp = raw.response()
        assert dimse.us(rsp, dimse.COMMAND_FIELD) == dimse.C_STORE_RSP
        assert dimse.us(rsp, dimse.STATUS) not in (0x0000, 0xFF00)
        raw.sock.sendall(pdv(1, echo_rq(8), True, True))
        assert dimse.us(raw.response(), dimse.STATUS) == 0
    finally:
        raw.close()
    assert_clean_log(peer)
    assert dn.archive_files(peer.data_dir) == []


# -- a full disk ------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs mounted where a peer's data directory goes (unmounted afterwards)."""
    workdir = tmp_path / "full"
    data = workdir / "data"
    data.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(data)], check=True)
    try:
        yield workdir
    finally:
        if subprocess.run(["umount", str(data)]).returncode:
            subprocess.run(["umount", "-l", str(data)], check=True)


def _leave_free(filler: Path, pages: int) -> None:
    """Fill *filler*'s file system to its last page, then free *pages* pages of it."""
    with open(filler, "ab", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
        size = f.seek(0, os.SEEK_END)
    with open(filler, "r+b") as f:
        f.truncate(max(0, size // 4096 * 4096 - pages * 4096))


def test_full_disk_fails_cleanly_and_archive_and_catalog_agree(small_disk, tmp_path):
    """Before: OSError escaped incoming._discard, the catalog's ROLLBACK masked the real
    error, and a C-STORE that failed left its file in the archive without a row."""
    files = [ct_file(tmp_path, f"full{i}", size=256) for i in range(30)]   # ~130 KB each
    small = [ct_file(tmp_path, f"small{i}", size=8) for i in range(200)]
    filler = small_disk / "data" / "filler"
    filler.write_bytes(b"\0" * (128 * 4096))  # the room the small ones are given back: the
    peer = Peer(small_disk, name="full")        # CTs fill the disk, with no page to spare
    try:
        peer.start()
        statuses = []
        with dn.association(peer.port, peer.ae_title,
                            [build_context(CTImageStorage, [ExplicitVRLittleEndian])]) as a:
            for path in files:
                rsp = a.send_c_store(path)
                assert "Status" in rsp, "no C-STORE-RSP (association aborted?)"
                statuses.append(rsp.Status)
            # then small ones, each with room for its file and a few pages more (0-11 in
            # turn): the disk filled to its last page beside the catalog, then those pages
            # freed. Where the file fits and the catalog's next WAL frames do not, a kept
            # file must go again (the path this test means to reach); how many pages the
            # spool and a catalog row take varies, so the slack is swept, not guessed;
            # stored ones grow the WAL until it must take a page
            for i, path in enumerate(small):
                if "could not record the copy" in peer.log_path.read_text(errors="replace"):
                    break
                _leave_free(filler, -(-path.stat().st_size // 4096) + i % 12)
                rsp = a.send_c_store(path)
                assert "Status" in rsp, "no C-STORE-RSP (association aborted?)"
                statuses.append(rsp.Status)
                files.append(path)
            filler.unlink(missing_ok=True)     # (the catalog may have filled up first)
        ok = {dn.sop_uid(p) for p, s in zip(files, statuses) if s == 0}
        failed = [s for s in statuses if s != 0]
        assert ok and failed, statuses
        assert all(0xA700 <= s <= 0xA7FF or 0xC000 <= s <= 0xCFFF for s in failed), failed
        held = {dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)}
        rows, proc = findscu(peer.port, peer.ae_title, {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": STUDY, "SOPInstanceUID": ""})
        assert proc.returncode == 0, proc.stderr
        assert ok <= held
        assert {r.SOPInstanceUID for r in rows} == held   # no file without a row, no row
        assert echo(peer.port, peer.ae_title)               # without a file
    finally:
        peer.stop()
    text = assert_clean_log(peer, "cannot rollback")
    assert "could not record the copy" in text and "database or disk is full" in text


# -- the limits from [facade] ---------------------------------------------------------------------
def test_limits_come_from_the_config(make_peer, tmp_path):
    peer = make_peer(config={"facade": {"artim_timeout": 1, "idle_timeout": 2,
                                        "max_dataset": 65536, "min_peer_pdu": 0}})
    s = silent(peer.port, HOSTS[0])                  # ARTIM: closed after about 1 s
    try:
        assert wait_until(lambda: closed_by_peer(s), 20)
    finally:
        s.close()
    raw = Raw(peer.port)                             # a 7-byte PDU is allowed again, and
    try:                                             # idle associations end after 2 s
        raw.sock.sendall(associate_rq(peer.ae_title, [
            (1, Verification, [ExplicitVRLittleEndian])], max_pdu=7))
        assert raw.read_pdu()[0] == 0x02
        assert raw.read_pdu()[0] == 0x07
    finally:
        raw.close()
    raw_file = ct_file(tmp_path, "too-big", size=256).read_bytes()
    data = raw_file[_meta_end(raw_file):]
    assert len(data) > 65536
    raw = Raw(peer.port)                             # a data set over max_dataset: A-ABORT
    try:
        raw.sock.sendall(associate_rq(peer.ae_title, [
            (3, CTImageStorage, [ExplicitVRLittleEndian])]))
        assert raw.read_pdu()[0] == 0x02
        raw.sock.sendall(pdv(3, dimse.c_store_rq(1, CTImageStorage, "1.2.3.4"), True, True))
        try:
            raw.sock.sendall(pdv(3, data, False, True))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert raw.read_pdu()[0] == 0x07
    finally:
        raw.close()
    assert "data set larger than 65536 bytes" in assert_clean_log(peer)
