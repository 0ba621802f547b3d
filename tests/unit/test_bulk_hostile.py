"""A fetch from a hostile or broken peer's bulk channel gives everything back: the memory
budget's bytes, the temporary file, the connection. A cancelled fetch (a retrieval's
stalled source) stops receiving at once instead of keeping the body coming.

The peer is a real TLS server of the cluster CA in a thread here that answers
``GET /instances/...`` as told: part of a body, then silence ("stall"); a chunked body
that never ends ("endless"); part of a body, then a close ("short": the body lies about
its size); a 404 whose body never ends ("error"), or an honest short one ("notfound");
an answer to ``POST /changes`` that never ends ("answer"), or none at all ("silent"); an
answer to a batch, ``POST /instances/local``, that never ends ("batch"), or the 405 of a
peer that serves no batches ("old").
The client is a real ``BulkClient`` in a process of its own (tests/unit/bulk_cancel.py).
"""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pacsp2p.overlay import bulk, fetching, tls

HERE = Path(__file__).parent
PATIENCE = 60.0               # generous: the machine may be busy
SLACK = 16 << 20              # what a never-ending answer sends past the client's bound
ERROR_SLACK = 4 << 20         # what a never-ending error answer sends at most


class HostilePeer:
    """Serves one connection as peer "a" in the way *mode* says; ``closed`` is set when
    the client closes it."""

    def __init__(self, tls_dir: Path, mode: str):
        self.mode = mode
        self.closed = threading.Event()
        self.release = threading.Event()    # set by the test: the socket may close now
        self.sent = 0
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_dir / "a.crt", tls_dir / "a.key")
        ctx.load_verify_locations(tls_dir / "ca.crt")
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(PATIENCE)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            raw, _ = self.sock.accept()
        except OSError:
            return
        raw.settimeout(PATIENCE)
        with self.ctx.wrap_socket(raw, server_side=True) as s:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                got = s.recv(4096)
                if not got:
                    return
                request += got
            try:
                getattr(self, f"_{self.mode}")(s)
            except TimeoutError:
                pass
            except OSError:                         # reset, broken pipe, TLS EOF
                self.closed.set()
            if self.mode != "short":
                self.release.wait(2 * PATIENCE)     # open until the test has looked

    def _head(self, s, length: int | None, status: bytes = b"200 OK"):
        framing = (b"Content-Length: %d" % length if length is not None
                   else b"Transfer-Encoding: chunked")
        s.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/dicom\r\n" +
                  framing + b"\r\n\r\n")

    def _wait_close(self, s):
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if not s.recv(4096):
                self.closed.set()
                return

    def _stall(self, s):                    # less than MEMORY, then nothing
        self._head(s, 600_000)
        s.sendall(b"\0" * 200_000)
        self._wait_close(s)

    def _short(self, s):                    # says 600,000 bytes, sends 200,000
        self._head(s, 600_000)
        s.sendall(b"\0" * 200_000)

    def _notfound(self, s):                 # short, the connection kept
        self._head(s, 16, b"404 Not Found")
        s.sendall(b"unknown instance")

    def _silent(self, s):                   # the request read, never an answer
        self._wait_close(s)

    def _answer(self, s):                   # a /changes answer that never ends
        self._endless(s, limit=fetching.MAX_ANSWER + SLACK)

    def _batch(self, s):                    # a batch answer that never ends
        self._endless(s, limit=bulk.BATCH_BYTES + SLACK)

    def _old(self, s):                      # an older peer: no POST on /instances
        self._head(s, 18, b"405 Not Allowed")
        s.sendall(b"Method Not Allowed")

    def _error(self, s):                    # an error answer that never ends
        self._endless(s, b"404 Not Found", limit=ERROR_SLACK)

    def _endless(self, s, status: bytes = b"200 OK", limit: int | None = None):
        """An answer that never ends (past MEMORY: a file). With *limit*, the body stops
        there without ending (the connection kept open): a client without a bound would
        wait for its end for ever, one with a bound has cut it before — whatever the
        machine's load, not a race between the client's reaction and this sender."""
        self._head(s, None, status)
        chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if limit is not None and self.sent >= limit:
                self._wait_close(s)
                return
            self.sent += 65536              # counted before: the client may cut it in
            s.sendall(chunk)                # the middle (sendall then raises: no count)
            time.sleep(0.005)               # ~13 MB/s: the machine is shared


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "tls"
    tls.init_ca(d)
    tls.issue(d, "a")
    tls.issue(d, "b")
    return d


def cancelled_fetch(tls_dir: Path, tmp: Path, mode: str) -> tuple[dict, HostilePeer]:
    peer = HostilePeer(tls_dir, mode)
    tmp.mkdir()
    wait = {"stall": "memory", "endless": "file", "short": "end", "error": "end",
            "notfound": "end", "answer": "changes", "silent": "silent",
            "batch": "batch", "old": "old"}[mode]
    proc = subprocess.Popen([sys.executable, str(HERE / "bulk_cancel.py"), str(tls_dir),
                             str(peer.port), str(tmp), str(PATIENCE), wait],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        answer = json.loads(line)
        if mode not in ("short", "notfound", "old"):
            peer.closed.wait(PATIENCE)      # closed by the client, not by its exit
        answer["closed"] = peer.closed.is_set()
        proc.stdin.write("done\n")
        proc.stdin.flush()
        proc.wait(PATIENCE)
    finally:
        peer.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return answer, peer


def test_a_cancelled_fetch_from_a_stalled_peer_gives_the_budget_and_connection_back(
        tls_dir, tmp_path):
    answer, _ = cancelled_fetch(tls_dir, tmp_path / "tmp", "stall")
    assert 0 < answer["arriving"]["held"] <= fetching.MEMORY        # it was in memory
    assert answer["outcome"] == ["CancelledError"]
    assert answer["held"] == 0
    assert answer["closed"]                 # not left open with the peer, forever
    assert answer["logged"] == []


def test_a_cancelled_fetch_of_an_endless_body_stops_writing_its_file(tls_dir, tmp_path):
    answer, peer = cancelled_fetch(tls_dir, tmp_path / "tmp", "endless")
    assert answer["arriving"]["files"] == 1     # past MEMORY: spilled to a file
    assert answer["outcome"] == ["CancelledError"]
    assert answer["left"] == [] and answer["held"] == 0
    assert answer["closed"]
    assert peer.sent < 200 << 20            # stopped long before PATIENCE at full rate
    assert answer["logged"] == []


def test_a_body_shorter_than_it_said_is_not_handed_over(tls_dir, tmp_path):
    answer, _ = cancelled_fetch(tls_dir, tmp_path / "tmp", "short")
    assert answer["outcome"] == ["ResponseFailed"]
    assert answer["held"] == 0 and answer["left"] == []
    assert answer["logged"] == []


def test_an_error_answer_that_never_ends_fails_the_fetch_at_once(tls_dir, tmp_path):
    answer, peer = cancelled_fetch(tls_dir, tmp_path / "tmp", "error")
    assert answer["outcome"] == ["NotHeld"]     # 404: not after the whole (endless) body
    assert answer["closed"]                     # its body dropped, then its connection
    assert peer.sent <= ERROR_SLACK
    assert answer["held"] == 0 and answer["left"] == [] and answer["logged"] == []


def test_an_honest_error_answer_fails_the_fetch(tls_dir, tmp_path):
    answer, _ = cancelled_fetch(tls_dir, tmp_path / "tmp", "notfound")
    assert answer["outcome"] == ["NotHeld"]     # a 404: that copy is not there
    assert answer["held"] == 0 and answer["left"] == [] and answer["logged"] == []


def test_a_catalog_answer_that_never_ends_is_cut_at_its_bound(tls_dir, tmp_path):
    answer, peer = cancelled_fetch(tls_dir, tmp_path / "tmp", "answer")
    assert answer["outcome"] == ["OSError"]     # "an answer over ... bytes", not memory
    assert answer["closed"]                     # its connection closed by the client
    assert fetching.MAX_ANSWER < peer.sent <= fetching.MAX_ANSWER + SLACK
    assert answer["logged"] == []


def test_a_catalog_pull_a_peer_never_answers_fails_in_bounded_time(tls_dir, tmp_path):
    answer, _ = cancelled_fetch(tls_dir, tmp_path / "tmp", "silent")
    # failed after the 3 s bound (the request cancelled: ResponseNeverReceived, or
    # TimeoutError once an answer had begun): the pull is free for another peer
    assert answer["outcome"] in (["ResponseNeverReceived"], ["TimeoutError"])
    assert answer["closed"]                         # the connection closed by the client
    assert answer["logged"] == []


def test_a_batch_answer_that_never_ends_is_cut_at_its_bound(tls_dir, tmp_path):
    answer, peer = cancelled_fetch(tls_dir, tmp_path / "tmp", "batch")
    assert answer["outcome"] == ["OSError"]     # "an answer over ... bytes", not memory
    assert answer["closed"]                     # its connection closed by the client
    assert bulk.BATCH_BYTES < peer.sent <= bulk.BATCH_BYTES + SLACK
    assert answer["held"] == 0 and answer["left"] == [] and answer["logged"] == []


def test_a_peer_that_serves_no_batches_is_asked_alone(tls_dir, tmp_path):
    answer, _ = cancelled_fetch(tls_dir, tmp_path / "tmp", "old")
    assert answer["outcome"] == ["Unbatched"]   # the retrieval then GETs each instance
    assert answer["again"] == "Unbatched"       # remembered: no second POST to that peer
    assert answer["held"] == 0 and answer["left"] == [] and answer["logged"] == []
