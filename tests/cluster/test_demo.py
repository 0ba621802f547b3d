"""`pacsp2p demo`: a three-peer cluster in one command, as a new user runs it.

The demo writes a CA and three configs, runs the peers as separate twistd processes,
prints each facade, and stops them all on Ctrl-C (SIGINT). It also runs more than ten
peers (issue 19.9: it stopped at 10), keeps every port below the kernel's ephemeral range
and refuses, with one clear line and before starting any peer, a port that is taken or
in that range.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsp2p import config
from pacsp2p.admin import demo as demo_module
from pacsp2p.testing import datasets
from pacsp2p.testing.cluster import patience, wait_until
from pacsp2p.testing.dcmtk import findscu, storescu
from pacsp2p.testing.ports import free_block

BIN = Path(sys.executable).parent


def _free_block(width: int = 30) -> int:
    """A base port whose next *width* ports are all free on 127.0.0.1 (below the
    ephemeral range, as the demo wants them; in this xdist worker's slice)."""
    lo, _ = demo_module.ephemeral_range()
    base = free_block(width)
    assert base + width <= lo, (base, width, lo)
    return base


def _peers(config: Path) -> str:
    return subprocess.run([str(BIN / "pacsp2p"), "peers", "--config", str(config)],
                          capture_output=True, text=True, timeout=20).stdout


IGNORING_SIGINT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def test_demo_runs_a_cluster_until_ctrl_c(tmp_path):
    base = _free_block()
    # started as a background job of a script is (SIGINT ignored, kept across exec):
    # Ctrl-C still stops it
    demo = subprocess.Popen(
        [sys.executable, "-c", IGNORING_SIGINT, str(BIN / "pacsp2p"), "demo", "--peers", "3",
         "--dir", str(tmp_path / "demo"), "--base-port", str(base)],
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
            demo.wait(patience(30))         # bounded, but a busy machine stops slowly
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    assert demo.returncode == 0
    deadline = time.monotonic() + patience(10)
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"peer pid {pid} still runs after Ctrl-C")


def _run_demo(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "pacsp2p"), "demo", "--dir", str(tmp_path / "demo"),
                           *args], capture_output=True, text=True, timeout=60)


def test_names_and_ports_for_64_peers(tmp_path):
    names = demo_module.peer_names(64)
    assert names[:3] == ["peera", "peerb", "peerc"]
    assert names[25:28] == ["peerz", "peeraa", "peerab"]
    assert len(set(names)) == 64
    base = demo_module.plan_base(64)
    configs = demo_module.write_cluster(tmp_path / "demo", 64, base)
    peers = demo_module.ports_of(configs)
    ports = [port for p in peers for _, port in p.named()]
    assert len(ports) == len(set(ports)) == 64 * 4
    lo, _ = demo_module.ephemeral_range()
    assert max(ports) < lo
    for path in configs:                        # valid configs, AE titles included
        s = config.load(path)
        assert s.facade.ae_title == s.peer.name.upper()


def test_base_port_kept_below_the_ephemeral_range():
    assert demo_module.plan_base(3, ephemeral=(32768, 60999)) == 11112
    for lo in (10000, 11500, 12345):
        for n in (1, 10, 64):
            base = demo_module.plan_base(n, ephemeral=(lo, 60999))
            assert demo_module.last_port(base, n) < lo and base % 10 == 2
    with pytest.raises(demo_module.PortError, match="not enough"):
        demo_module.plan_base(64, ephemeral=(1500, 60999))
    assert demo_module.ephemeral_range(Path("/nonexistent")) == (32768, 60999)


def test_port_in_the_ephemeral_range_is_refused_before_any_peer_starts(tmp_path):
    lo, hi = demo_module.ephemeral_range()
    r = _run_demo(tmp_path, "--peers", "2", "--base-port", str(lo + 100))
    assert r.returncode != 0
    assert f"peera: facade.port {lo + 100} lies in the ephemeral port range {lo}-{hi}" \
        in r.stderr, r.stderr
    assert "--base-port" in r.stderr
    assert not list((tmp_path / "demo").glob("*.log"))      # nothing was started


def test_port_in_use_is_refused_with_a_clear_message(tmp_path):
    base = _free_block()
    taken = socket.socket()
    taken.bind(("127.0.0.1", base + 13))                    # peerb's bulk port
    taken.listen()
    try:
        r = _run_demo(tmp_path, "--peers", "3", "--base-port", str(base))
    finally:
        taken.close()
    assert r.returncode != 0
    assert f"peerb: overlay.bulk_port {base + 13} on 127.0.0.1 is in use" in r.stderr, \
        r.stderr
    assert not list((tmp_path / "demo").glob("*.log"))


def test_more_than_ten_peers(tmp_path):
    """Before: "--peers must be 1-10". Eleven peers start and see each other."""
    n = 11
    base = _free_block(10 * n)
    demo = subprocess.Popen(
        [str(BIN / "pacsp2p"), "demo", "--peers", str(n), "--dir", str(tmp_path / "demo"),
         "--base-port", str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [demo.stdout.readline() for _ in range(n + 1)]
        assert lines[10].startswith(f"peerk: facade PEERK at 127.0.0.1:{base + 100}"), lines
        config_k = tmp_path / "demo" / "peerk.toml"
        wait_until(lambda: _peers(config_k).count(" alive ") == n - 1, 120, 1,
                   "peerk sees the ten others alive")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    assert demo.returncode == 0


def test_a_failing_peer_is_shown_and_the_others_stopped(tmp_path):
    """Issue 16.4: a peer that cannot start ends the demo: its last log lines are
    printed, the other peers are stopped, the demo exits with status 1."""
    base = _free_block()
    directory = tmp_path / "demo"
    configs = demo_module.write_cluster(directory, 3, base)
    (directory / "blocker").write_text("a file where peerb's data directory should be\n")
    text = configs[1].read_text().replace('data_dir = "peerb-data"', 'data_dir = "blocker"')
    configs[1].write_text(text)                   # a config edited by hand is kept
    r = subprocess.run([str(BIN / "pacsp2p"), "demo", "--peers", "3", "--dir",
                        str(directory), "--base-port", str(base)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    pids = [int(line.rsplit("pid ", 1)[1]) for line in out.splitlines()
            if ": facade PEER" in line]
    assert len(pids) == 3, out
    # a data directory that is a file is a configuration error (424fc0d): status 2
    assert f"peerb exited with status 2; the last lines of {directory / 'peerb.log'}:" \
        in out, out
    tail = out.split("the last lines of", 1)[1]
    assert "peer.data_dir" in tail and "blocker: not a directory" in tail, out  # peerb's log
    assert "stopping the other peers" in out, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
