"""The ``pacsp2p`` CLI against a real peer (issue 16.4): ``where --study`` of an unknown
study says "no such study"; ``status`` and ``peers`` show no epoch floats; ``delete``
shows a progress bar on a terminal (a pseudo-terminal here) and plain output
otherwise; ``catalog rebuild`` reports what it rebuilt."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from pydicom import dcmread

from pacsp2p.testing import Peer, storescu
from pacsp2p.testing.datasets import make_study

PACSP2P = Path(sys.executable).with_name("pacsp2p")


def _cli(peer, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), *args, "--config", str(peer.config_path)],
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _cli_on_a_terminal(peer, *args) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; (exit status, what it showed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(PACSP2P), *args, "--config", str(peer.config_path)],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:            # the terminal closed: the process is done
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_cli_for_people(tmp_path):
    files = make_study(tmp_path / "study", patient_id="CLI-1",
                       series=(("CT", 6, "1.2.840.10008.1.2.1"),))
    study = str(dcmread(files[0]).StudyInstanceUID)
    files2 = make_study(tmp_path / "study2", patient_id="CLI-2", seed=2,
                        series=(("CT", 3, "1.2.840.10008.1.2.1"),))
    study2 = str(dcmread(files2[0]).StudyInstanceUID)
    peer = Peer(tmp_path / "peer")
    with peer:
        storescu(peer.port, peer.ae_title, [tmp_path / "study", tmp_path / "study2"])
        unknown = "1.2.3.4.5.6.7.8.9"
        r = _cli(peer, "where", "--study", unknown)
        assert r.returncode == 1
        assert r.stdout.strip() == f"no such study {unknown} in the catalog"
        r = _cli(peer, "where", "--study", study)
        assert r.returncode == 0 and "6 instances" in r.stdout

        r = _cli(peer, "status")
        assert r.returncode == 0, r.stderr
        assert "archive local: up" in r.stdout and "iB free" in r.stdout
        assert not re.search(r"\d{9,}\.\d", r.stdout), r.stdout      # no epoch floats

        # on a terminal: a progress bar out of the study's instances
        code, shown = _cli_on_a_terminal(peer, "delete", "--study", study)
        assert code == 0, shown
        assert f"deleting study {study[:10]}...{study[-8:]}" in shown, shown
        assert "6/6" in shown and "100%" in shown, shown
        assert "deleted 6 instance(s)" in shown
        # not on a terminal: no bar, the result
        r = _cli(peer, "delete", "--study", study2)
        assert r.returncode == 0, r.stderr
        assert "\r" not in r.stderr and "deleted 3 instance(s)" in r.stdout
    # peer stopped: rebuild the catalog from the archive (nothing left: both deleted)
    r = _cli(peer, "catalog", "rebuild")
    assert r.returncode == 0, r.stderr
    catalog = peer.data_dir / "catalog.sqlite"
    assert r.stdout.splitlines() == [
        f"rebuilding {catalog} (peer {peer.name}) from 1 archive(s)",
        f"catalog rebuilt: 0 instances in {catalog}"], r.stdout


def test_catalog_rebuild_without_a_data_directory_makes_nothing(tmp_path):
    """Run where no peer lives (no --config: the default ./pacsp2p-data), the rebuild
    says there is nothing to rebuild, in one line, and creates nothing (it made an empty
    data directory and catalog there, saying only "catalog rebuilt: 0 instances")."""
    here = tmp_path / "elsewhere"
    here.mkdir()
    r = subprocess.run([str(PACSP2P), "catalog", "rebuild"], cwd=here, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip() == (f"pacsp2p: no data directory {here / 'pacsp2p-data'} to "
                                "rebuild the catalog of; give the peer's --config"), r.stderr
    assert list(here.iterdir()) == []


def test_cli_refusals_are_one_line(tmp_path):
    """What the peer refuses is said as the peer's reason, not as "no peer answers"; an
    empty UID is refused by the peer, not a traceback; a peer that is down is named."""
    peer = Peer(tmp_path / "peer")
    with peer:
        for args, says in ((("where", "--study", "abc"), "not digits and dots"),
                           (("where", "--study", ""), "study: empty"),
                           (("where", "--instance", "../../x"), "not digits and dots"),
                           (("delete", "--study", ""), "StudyInstanceUID: empty"),
                           (("delete", "--series", "1.2.03"), "not digits and dots"),
                           (("drain", "--peer", "nosuch"), "peer 'nosuch'")):
            r = _cli(peer, *args)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
            assert "refused by the peer" in lines[0] and "HTTP 400" in lines[0], lines
            assert says in lines[0], lines
            assert "is it running" not in lines[0]
    for args in (("status",), ("where", "--study", "1.2.3"), ("delete", "--study", "1.2.3"),
                 ("scrub",), ("drain", "--archive", "local")):
        r = _cli(peer, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("pacsp2p: no peer answers at http://127.0.0.1:"), lines
        assert lines[0].endswith("is it running?"), lines
