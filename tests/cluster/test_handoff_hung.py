"""Hinted hand-off skips an archive its peer says is down: a hung archive (an Orthanc
stopped with SIGSTOP) is not asked again and again while it hangs.

Before, the hand-off loop asked for every hint owed to it as long as its peer was
alive: each copy waited the adapter's 30 s timeout, one after the other, and every hint
owed to other archives waited behind them (fault injection, fifteenth session: 2 hints
tried in 63 s, 26 left). Now the hints wait until the archive is up again, then go.
The adapter's timeout is cut to 8 s here to keep the test short.
Three real peers (R=2, W=2); peerb's only archive is a real Orthanc.
"""
from __future__ import annotations

import os
import signal
import time

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.orthanc import Orthanc

N = 4
TIMEOUT = 8        # seconds the Orthanc adapter waits for an answer (default 30)
WINDOW = 25.0      # seconds watched: over two adapter timeouts and a loop (3 s)


def test_hints_wait_while_their_archive_is_down(cluster, tmp_path):
    with Orthanc(tmp_path / "orthanc", aet="ORTHB") as orthanc:
        cluster.config = {"cluster": {"replicas": 2, "write_quorum": 2,
                                      "repair_after": 3600}}
        a, b, c = cluster.start(3, per_peer={"peerb": {"archives": [
            {"name": "orth", "adapter": "orthanc", "url": orthanc.url,
             "timeout": TIMEOUT}]}})
        cluster.wait_mesh(timeout=60)
        files = datasets.make_study(tmp_path / "study", patient_id="HUNG01", size=16,
                                    series=[("MR", N, ExplicitVRLittleEndian)])
        os.kill(orthanc.process.pid, signal.SIGSTOP)
        try:
            proc = storescu(a.port, a.ae_title, files, extra=["-v"], timeout=600)
            assert (proc.stdout + proc.stderr).count("(Success)") == N
            wait_until(lambda: not get_json(b)["archives"]["orth"]["up"], 120, 0.5,
                       "peerb finds its Orthanc down")
            wait_until(lambda: get_json(a)["catalog"]["hints"] > 0, 120, 0.5,
                       "a copy owed to the Orthanc (a hint at the writer)")
            time.sleep(3)                       # peerb's word spread (membership)
            start = len(b.log_path.read_text().splitlines())
            time.sleep(WINDOW)
            tried = [line for line in b.log_path.read_text().splitlines()[start:]
                     if "not kept" in line]
            assert get_json(a)["catalog"]["hints"] > 0
        finally:
            os.kill(orthanc.process.pid, signal.SIGCONT)
        assert tried == [], tried               # before: asked again, TIMEOUT s each
        wait_until(lambda: get_json(a)["catalog"]["hints"] == 0, 180, 1.0,
                   "every hint handed off once the Orthanc is back")
        rows = get_json(a, f"where?study={dn.study_of(files)}")
        assert len(rows) == N and all(len(r["replicas"]) >= 2 for r in rows), rows
