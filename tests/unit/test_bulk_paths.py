"""The bulk channel serves instances the catalog knows, by valid UID, never a path; its
ports drop connections that do not complete the TLS handshake in time (issue 11). Every
test of instance reads runs against both ports that serve them: the bulk port (Twisted,
for older askers) and the read port (``bulk.Reads`` on ``threadtls``).

A real bulk channel runs in a process of its own (tests/unit/bulk_server.py: real
catalog, real embedded archive, mutual TLS with a CA made here); the test speaks HTTPS
to it with a certificate of the same CA, as any holder of a cluster certificate could.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pacsp2p.dicom.header import read_meta
from pacsp2p.overlay import bulk, sync, threadtls, tls
from pacsp2p.testing import datasets
from pacsp2p.testing.fuzz.watch import rss_kib as rss_kb

SERVER = Path(__file__).with_name("bulk_server.py")
PATIENCE = 120.0              # generous: the machine may be busy


PORTS = ["port", "read_port"]      # the bulk port, the read port


class Server:
    def __init__(self, tmp: Path, timeout: float, limit: int, known=(), uncatalogued=(),
                 which: str = "port"):
        self.tls_dir = tmp / "tls"
        if not (self.tls_dir / "ca.crt").exists():
            tls.init_ca(self.tls_dir)
            tls.issue(self.tls_dir, "a")
            tls.issue(self.tls_dir, "b")
        self.root = tmp / f"server-{timeout}-{limit}"
        args = [sys.executable, str(SERVER), str(self.root), str(self.tls_dir), str(timeout),
                str(limit), *map(str, known), "--", *map(str, uncatalogued)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bulk server did not start: {self.proc.stderr.read()}")
        ports = json.loads(line)
        self.which, self.port, self.status_port = which, ports[which], ports["status"]

    def status(self) -> dict:
        """The handshake guard's counters of the port tested."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/",
                                    timeout=PATIENCE) as r:
            counters = json.load(r)
        return counters["read"] if self.which == "read_port" else counters

    def get(self, path: str) -> tuple[int, bytes]:
        return self.ask("GET", path)

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return self.ask("POST", path, body, {"content-type": "application/json"})

    def ask(self, method: str, path: str, *args) -> tuple[int, bytes]:
        """(status, body) of one request as peer "b" (a cluster certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        ctx.check_hostname = False
        ctx.load_cert_chain(self.tls_dir / "b.crt", self.tls_dir / "b.key")
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx,
                                           timeout=PATIENCE)
        try:
            conn.request(method, path, *args)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    return [datasets.write(datasets.make_image("CT", size=8, seed=i,
                                               SOPInstanceUID=datasets.uid("bulk", i)),
                           d / f"{i}.dcm") for i in range(3)]


@pytest.fixture(scope="module", params=PORTS)
def served(request, tmp_path_factory, files):
    server = Server(tmp_path_factory.mktemp("bulk"), 600, 64, files[:2], files[2:],
                    request.param)
    yield server
    server.stop()


def uid_of(path: Path) -> str:
    return read_meta(path).sop_instance_uid


def assert_no_path(server: Server, body: bytes) -> None:
    assert b"/" not in body, body                 # no path of any kind
    assert str(server.root).encode() not in body and b"etc" not in body, body


def test_a_known_instance_is_served(served, files):
    status, body = served.get(f"/instances/local/{uid_of(files[0])}")
    assert status == 200 and body == files[0].read_bytes()


def frames(body: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(body):
        status, size = bulk.FRAME.unpack_from(body, pos)
        pos += bulk.FRAME.size
        out.append((status, body[pos:pos + size]))
        pos += size
    return out


def test_a_batch_serves_known_instances_in_order_and_no_others(served, files):
    asked = [[uid_of(files[0]), ""], [uid_of(files[2]), ""],    # on disk, not catalogued
             ["1.2.3.4.5.6.7", ""], [uid_of(files[1]), "0" * 64]]
    status, body = served.post("/instances/local", json.dumps(asked).encode())
    assert status == 200, body
    assert frames(body) == [(bulk.OK, files[0].read_bytes()), (bulk.NOT_HELD, b""),
                            (bulk.NOT_HELD, b""), (bulk.OK, files[1].read_bytes())]


@pytest.mark.parametrize("body", [
    b"", b"{}", b"[]", b"not json", b'[["1.2.3"]]', b'[["1.2.3", 5]]',
    b'[["..%2F..%2Fetc%2Fpasswd", ""]]', b'[["/etc/passwd", ""]]', b'[["1.2.3", "ABC"]]',
    b'[["1.2.3", ""], ["1.2.3", ""]]',                            # twice
    json.dumps([[f"1.2.{i}", ""] for i in range(bulk.MAX_BATCH + 1)]).encode(),
    b"[" + b" " * bulk.MAX_BATCH_BODY + b'["1.2.3", ""]]',
    b"[" * 8000])                                                 # nested past recursion
def test_a_bad_batch_is_400_without_a_path(served, body):
    status, answer = served.post("/instances/local", body)
    too_large = served.which == "read_port" and len(body) > bulk.MAX_BATCH_BODY  # (its head)
    assert status == (413 if too_large else 400), (body[:80], status, answer)
    assert_no_path(served, answer)


def test_a_catalog_pull_nested_past_recursion_is_400(served):
    status, answer = served.post("/changes", b"[" * 8000)
    assert status == (400 if served.which == "port" else 404), (status, answer)


def test_a_batch_of_another_archive_or_path_is_refused_without_a_path(served, files):
    asked = json.dumps([[uid_of(files[0]), ""]]).encode()
    for path, code in (("/instances/other", 404), ("/instances/%2Fetc", 404),
                       ("/instances/local/x", 400), ("/instances", 400)):
        status, answer = served.post(path, asked)
        assert status == code, (path, status, answer)
        assert_no_path(served, answer)


@pytest.mark.parametrize("path", [
    "%2Fetc%2Fpasswd", "..%2F..%2F..%2Fetc%2Fpasswd", "1.2.3%2F..%2F..%2Fx", "..", "1.02.3",
    "1." + "2" * 63, "1.2.%C3%A93", "%00", "1.2.3%20", "1.2.3.", ".1.2"])
def test_an_invalid_uid_is_400_without_a_path(served, path):
    status, body = served.get(f"/instances/local/{path}")
    assert status == 400, (status, body)
    assert_no_path(served, body)


def test_paths_that_are_not_archive_and_uid_are_400(served, files):
    for path in (f"/instances/local/{uid_of(files[0])}/x", "/instances/local/1.2/..%2Fx",
                 f"/instances/local/{uid_of(files[0])}?sha256=..%2F..%2Fx",
                 f"/instances/local/{uid_of(files[0])}?sha256=ABC"):
        status, body = served.get(path)
        assert status == 400, (path, status, body)
        assert_no_path(served, body)


def test_unknown_instances_and_archives_are_404_without_a_path(served, files):
    for path in ("/instances/local/1.2.3.4.5.6.7",          # nowhere
                 f"/instances/local/{uid_of(files[2])}",     # on disk, not in the catalog
                 f"/instances/other/{uid_of(files[0])}",     # no such archive
                 "/instances/%2Fetc/1.2.3"):
        status, body = served.get(path)
        assert status == 404, (path, status, body)
        assert_no_path(served, body)


def test_a_catalogued_instance_whose_file_is_gone_is_404_without_a_path(served, files):
    from pacsp2p.adapters import layout
    lost = served.root / "archive" / "objects" / layout.relative(uid_of(files[1]))
    lost.unlink()
    status, body = served.get(f"/instances/local/{uid_of(files[1])}")
    assert status == 404 and b"objects" not in body, (status, body)
    assert_no_path(served, body)


def closed_by_peer(sock: socket.socket) -> bool:
    """Wait (generously) until the other end closes *sock*."""
    sock.settimeout(PATIENCE)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("which", PORTS)
def test_an_idle_socket_is_dropped_after_the_handshake_timeout(tmp_path_factory, which):
    server = Server(tmp_path_factory.mktemp("idle"), 1.0, 64, which=which)
    try:
        t0 = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", server.port))
        with sock:
            assert closed_by_peer(sock)
        assert time.monotonic() - t0 >= 0.9
        half = socket.create_connection(("127.0.0.1", server.port))
        with half:                          # a TLS hello cut short, then silence
            half.sendall(b"\x16\x03\x01\x00\xff\x01\x00")
            assert closed_by_peer(half)
        assert server.status()["expired"] == 2
        assert server.status()["pending"] == 0
        assert server.get("/instances/local/1.2.3")[0] == 404   # a real client: served
    finally:
        server.stop()


@pytest.mark.parametrize("which", PORTS)
def test_pending_handshakes_are_capped(tmp_path_factory, which):
    server = Server(tmp_path_factory.mktemp("cap"), 600, 4, which=which)
    idle = []
    try:
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
        deadline = time.monotonic() + PATIENCE
        while server.status()["pending"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.status()["pending"] == 4
        extra = socket.create_connection(("127.0.0.1", server.port))
        idle.append(extra)                  # over the cap: the OLDEST one makes room
        assert closed_by_peer(idle[0])
        assert server.status()["evicted"] == 1 and server.status()["pending"] == 4
        assert server.get("/instances/local/1.2.3")[0] == 404   # and so does a client's
        assert server.status()["evicted"] == 2
        for sock in idle:                   # gone: room again
            sock.close()
        while server.status()["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.status()["pending"] == 0
    finally:
        for sock in idle:
            sock.close()
        server.stop()


@pytest.mark.parametrize("which", PORTS)
def test_an_asker_gone_before_a_large_instance_is_served_leaves_no_error(tmp_path_factory,
                                                                          which):
    """A retrieval that cancels a GET (its stall timer, C-CANCEL, the endgame's second
    copy) closes the connection while the holder still looks the instance up: the
    holder must not fail on the gone request ("Unhandled error in Deferred": finish()
    on a lost connection, the opened file left to the garbage collector)."""
    tmp = tmp_path_factory.mktemp("gone")
    big = datasets.write(datasets.make_image("CT", size=1024, SOPInstanceUID=datasets.uid(
        "bulk-gone", 1)), tmp / "big.dcm")
    assert big.stat().st_size > bulk.WHOLE              # streamed, not sent at once
    server = Server(tmp, 600, 64, [big], which=which)
    try:
        ctx = ssl.create_default_context(cafile=str(server.tls_dir / "ca.crt"))
        ctx.check_hostname = False
        ctx.load_cert_chain(server.tls_dir / "b.crt", server.tls_dir / "b.key")
        for _ in range(5):
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server.port))) as s:
                s.sendall(f"GET /instances/local/{uid_of(big)} HTTP/1.1\r\nHost: a\r\n"
                          "\r\n".encode())
        status, body = server.get(f"/instances/local/{uid_of(big)}")   # then served
        assert status == 200 and body == big.read_bytes()
        server.status()                     # (collects: a Deferred dropped failed is told)
    finally:
        server.stop()
    errors = server.proc.stderr.read()
    assert "Unhandled error" not in errors and "Traceback" not in errors, errors[-2000:]


def test_a_request_body_past_its_bound_is_413_and_not_kept(served):
    """A body of any size was spooled whole to a temporary file by Twisted before the
    endpoint read its first 16 KB: a certificate holder could fill the holder's disk
    (its archive's, its catalog's) with one POST. Past the largest body any request
    needs (a pull's), it is dropped as it arrives and answered 413."""
    if served.which == "read_port":         # refused on its head, before any body
        return _read_port_refuses_a_body_past_its_bound_on_its_length(served)
    huge = b"[" + b" " * (sync.MAX_PULL_BODY + (1 << 20)) + b"]"
    for path in ("/instances/local", "/changes"):
        status, answer = served.post(path, huge)
        assert status == 413, (path, status, answer)
        assert_no_path(served, answer)
    status, _ = served.post("/instances/local", b'[["1.2.3", ""]]')    # then served
    assert status == 200


def _read_port_refuses_a_body_past_its_bound_on_its_length(served):
    """The read port answers 413 as soon as a request's head announces more than a batch
    request's bytes (``bulk.MAX_BATCH_BODY``) and the little it reads and drops past
    them (``threadtls.DRAIN``), then closes: nothing of the body is read."""
    ctx = ssl.create_default_context(cafile=str(served.tls_dir / "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(served.tls_dir / "b.crt", served.tls_dir / "b.key")
    for length in (bulk.MAX_BATCH_BODY + threadtls.DRAIN + 1, 1 << 40):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", served.port),
                                                      timeout=PATIENCE)) as s:
            s.sendall(b"POST /instances/local HTTP/1.1\r\ncontent-length: %d\r\n\r\n"
                      % length)
            answer = http.client.HTTPResponse(s)
            answer.begin()
            assert answer.status == 413 and answer.read() == b"request too large\n"
    assert served.post("/instances/local", b'[["1.2.3", ""]]')[0] == 200   # then served


@pytest.mark.parametrize("which", PORTS)
def test_pipelined_answers_nobody_reads_are_not_all_buffered(tmp_path_factory, which):
    """An asker that pipelines many GETs (or batch POSTs) and reads no answer: each
    answer is written whole, and Twisted serves the next request as soon as one is
    finished — every answer was buffered in the holder's memory (2 connections of 40
    GETs of 0.9 MB: ~70 MB). A request now finishes once the connection took it."""
    tmp = tmp_path_factory.mktemp("pipelined")
    mid = datasets.write(datasets.make_image("CT", size=660, SOPInstanceUID=datasets.uid(
        "bulk-pipelined", 1)), tmp / "mid.dcm")
    assert 512 << 10 < mid.stat().st_size <= bulk.WHOLE            # sent at once
    server = Server(tmp, 600, 64, [mid], which=which)
    socks = []
    try:
        ctx = ssl.create_default_context(cafile=str(server.tls_dir / "ca.crt"))
        ctx.check_hostname = False
        ctx.load_cert_chain(server.tls_dir / "b.crt", server.tls_dir / "b.key")
        assert server.get(f"/instances/local/{uid_of(mid)}")[0] == 200      # warmed up
        base = rss_kb(server.proc.pid)
        ask = f"GET /instances/local/{uid_of(mid)} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.port))
            socks.append(ctx.wrap_socket(sock))
            socks[-1].sendall(ask * 40)
        peak, until = base, time.monotonic() + 10.0     # (an observation, not a bound)
        while time.monotonic() < until and peak - base < 30_000:
            peak = max(peak, rss_kb(server.proc.pid))
            time.sleep(0.2)
        assert peak - base < 30_000, f"{(peak - base) // 1024} MB held for unread answers"
        socks[0].settimeout(PATIENCE)
        answer = http.client.HTTPResponse(socks[0])
        answer.begin()
        assert answer.status == 200 and answer.read() == mid.read_bytes()  # still served
    finally:
        for sock in socks:
            sock.close()
        server.stop()
