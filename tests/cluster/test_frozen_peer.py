"""A holder that freezes (SIGSTOP: a VM stall, a swap storm) in the middle of a C-STORE
stream does not hold the writer's C-STOREs: once the failure detector declares it dead
(seconds), the copies waiting for its answer are placed elsewhere and answered.

Before, the writer's push connection to it waited ``ANSWER_WAIT`` (600 s) for the
holder's answer: one C-STORE, and the modality's whole association behind it, stood
still for ten minutes. Three real peers (R=2, W=2), a pynetdicom requestor timing each
C-STORE; the frozen peer is resumed at the end and every instance then has two copies.
"""
from __future__ import annotations

import os
import signal
import time

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import build_context

from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import members, wait_replicated, wait_until

N = 60
FREEZE_AT = 20
BOUND = 120.0     # seconds: far above detection (~2.5 s here), far below ANSWER_WAIT (600)


def test_a_frozen_holder_does_not_hold_the_writers_c_stores(cluster, tmp_path):
    cluster.start(3)
    cluster.wait_mesh()
    writer, frozen = cluster[0], cluster[1]
    files = datasets.make_study(tmp_path / "study", patient_id="FROZEN01", size=16,
                                series=[("MR", N, ExplicitVRLittleEndian)])
    took, statuses = [], []
    try:
        with dn.association(writer.port, writer.ae_title,
                            [build_context(MRImageStorage, [ExplicitVRLittleEndian])],
                            timeout=BOUND) as assoc:
            for i, path in enumerate(files):
                if i == FREEZE_AT:
                    os.kill(frozen.process.pid, signal.SIGSTOP)
                t0 = time.monotonic()
                answer = assoc.send_c_store(path)
                took.append(time.monotonic() - t0)
                statuses.append(answer.Status if "Status" in answer else None)
                if statuses[-1] is None:
                    break               # no answer within BOUND: the association is gone
        # the frozen peer was in the stream's placements (R=2 of 3 peers) and was found dead
        assert members(writer)[frozen.name] == "dead"
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    assert statuses == [0x0000] * N, (statuses, [round(t, 2) for t in took])
    assert max(took) < BOUND, max(took)
    wait_until(lambda: members(writer)[frozen.name] == "alive", 120, interval=0.5,
               what=f"{frozen.name} alive again")
    rows = wait_replicated(writer, dn.study_of(files), N, timeout=300)
    assert len(rows) == N
