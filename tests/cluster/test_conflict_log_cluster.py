"""A loop of C-STOREs of one SOP Instance UID with other bytes, at a peer of a cluster,
writes a bounded log at every holder.

A version received again with other bytes is kept beside the first (a conflict) and
reported in a warning line. The lone peer's line went through a ``LogLimit`` since
2932d0b; the cluster's (``replicas.record``: the writer's record, each holder's commit)
wrote one line per C-STORE at every holder. Both now go through the same limiter
(``transfer.conflicts``: 10 lines per 10 s, then one counting the rest). Real peers
(twistd processes, R=2, W=2), pynetdicom as the requestor.
"""
from __future__ import annotations

import time

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from pacsp2p.adapters.embedded import MAX_VERSIONS
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience, wait_until

UIDS = 6                     # each sent MAX_VERSIONS times: 90 conflicts at each holder
TEXT = "received again with different bytes"


def lines(peer, text: str) -> list[str]:
    return [line for line in peer.log_path.read_text(errors="replace").splitlines()
            if text in line]


def test_conflicting_versions_in_a_cluster_write_a_bounded_log(cluster):
    cluster.config = {"cluster": {"replicas": 2, "write_quorum": 2}}
    a, b = cluster.start(2)
    cluster.wait_mesh()
    statuses = []
    t0 = time.monotonic()
    with dn.association(a.port, a.ae_title,
                        [build_context(CTImageStorage, ImplicitVRLittleEndian)],
                        timeout=patience(120)) as assoc:
        for u in range(UIDS):
            ds = datasets.make_image("CT", size=8, PatientID="CONFLICTS",
                                     transfer_syntax=ImplicitVRLittleEndian,
                                     SOPInstanceUID=datasets.uid("conflicts", str(u)))
            for i in range(MAX_VERSIONS):
                ds.ImageComments = f"version {i}"
                statuses.append(assoc.send_c_store(ds).Status)
    took = time.monotonic() - t0
    assert statuses == [0x0000] * (UIDS * MAX_VERSIONS)
    conflicts = UIDS * (MAX_VERSIONS - 1)
    for peer in (a, b):      # each holds every version: its commits all logged
        wait_until(lambda: lines(peer, "more conflicting version events"), 60,
                   what=f"{peer.name}: the line counting the conflicts not logged")
        most = 10 * (int((time.monotonic() - t0) // 10) + 1)    # 10 a window begun
        got = len(lines(peer, TEXT))
        assert 1 <= got <= min(most, conflicts - 1), \
            f"{peer.name}: {got} lines of {conflicts} conflicts in {took:.1f} s"
