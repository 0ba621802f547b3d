"""`pacsp2p demo`: a three-peer cluster in one command, as a new user runs it.

The demo writes a CA and three configs, runs the peers as separate twistd processes,
prints each facade, and stops them all on Ctrl-C (SIGINT).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pacsp2p.testing import datasets
from pacsp2p.testing.cluster import wait_until
from pacsp2p.testing.dcmtk import findscu, storescu

BIN = Path(sys.executable).parent


def _free_block(width: int = 30) -> int:
    """A base port whose next *width* ports are all free on 127.0.0.1."""
    for base in range(21000, 60000, 97):
        socks = []
        try:
            for port in range(base, base + width):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of ports")


def _peers(config: Path) -> str:
    return subprocess.run([str(BIN / "pacsp2p"), "peers", "--config", str(config)],
                          capture_output=True, text=True, timeout=20).stdout


def test_demo_runs_a_cluster_until_ctrl_c(tmp_path):
    base = _free_block()
    demo = subprocess.Popen(
        [str(BIN / "pacsp2p"), "demo", "--peers", "3", "--dir", str(tmp_path / "demo"),
         "--base-port", str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [demo.stdout.readline() for _ in range(4)]
        assert lines[0].startswith(f"peera: facade PEERA at 127.0.0.1:{base}"), lines
        assert f"PEERC at 127.0.0.1:{base + 20}" in lines[2]
        assert f"STORESCP = 127.0.0.1:{base + 1}" in lines[3]
        pids = [int(line.rsplit("pid ", 1)[1]) for line in lines[:3]]
        config_a = tmp_path / "demo" / "peera.toml"
        wait_until(lambda: _peers(config_a).count(" alive ") == 2, 30, 0.3,
                   "peera sees peerb and peerc alive")

        study = datasets.make_study(tmp_path / "study", series=[("CT", 4, "1.2.840.10008.1.2.1")],
                                    size=16)
        storescu(base, "PEERA", study)
        uid = str(__import__("pydicom").dcmread(study[0]).StudyInstanceUID)

        def found_at_c():
            rows, _ = findscu(base + 20, "PEERC", {"QueryRetrieveLevel": "STUDY",
                                                    "StudyInstanceUID": uid,
                                                    "NumberOfStudyRelatedInstances": ""})
            return rows and str(rows[0].NumberOfStudyRelatedInstances) == "4"
        wait_until(found_at_c, 15, 0.3, "the study is found at PEERC")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    assert demo.returncode == 0
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"peer pid {pid} still runs after Ctrl-C")
