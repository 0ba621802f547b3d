"""A peer's status answers at once while one of its archives hangs.

An Orthanc archive frozen (SIGSTOP: a VM stall, its disk stalled) answers nothing; the
peer's ``GET /status`` (what ``pacsp2p status`` shows) asked every archive's health in
turn and waited each one's adapter timeout: 30.0 s per call, every call, for as long as
it hung (60 s with two such archives: longer than the CLI's own timeout). Now the
archives are asked together, each at most ``cluster.HEALTH_WAIT`` (5 s), and a hung one
is shown down, saying it did not answer. A real peer, a real Orthanc, the peer's own
embedded archive beside it (still shown up).
"""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

from pacsp2p.testing.orthanc import Orthanc
from pacsp2p.testing.peer import Peer

BOUND = 20.0         # seconds: the health wait (5 s) with room, below the 30 s of before


def _status(peer) -> tuple[float, dict]:
    t0 = time.monotonic()
    with urllib.request.urlopen(f"{peer.admin_url}/status", timeout=300) as r:
        body = json.load(r)
    return time.monotonic() - t0, body


def test_status_answers_while_an_archive_hangs(tmp_path):
    with Orthanc(tmp_path / "orthanc", aet="ORTHHUNG") as orthanc:
        with Peer(tmp_path / "peer", config={"archives": [
                {"name": "orth", "adapter": "orthanc", "url": orthanc.url},
                {"name": "local", "adapter": "embedded"}]}) as peer:
            took, body = _status(peer)
            assert body["archives"]["orth"]["up"] is True, body["archives"]
            os.kill(orthanc.process.pid, signal.SIGSTOP)
            try:
                took = []
                for _ in range(2):
                    t, body = _status(peer)
                    took.append(round(t, 2))
                    assert t < BOUND, took          # before: 30.0 s each
                    archives = body["archives"]
                    assert archives["orth"]["up"] is False, archives
                    assert "did not answer" in archives["orth"]["error"], archives
                    assert archives["local"]["up"] is True, archives
                assert list(archives) == ["orth", "local"], archives
            finally:
                os.kill(orthanc.process.pid, signal.SIGCONT)
            print(f"GET /status while the Orthanc hangs: {took} s")
