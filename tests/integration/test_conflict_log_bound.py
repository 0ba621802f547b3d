"""A loop of C-STOREs of one SOP Instance UID with other bytes writes a bounded log
(fourteenth hostile-input session).

A data set received again with other bytes is kept beside the first (a conflict: nothing
is lost, docs/README.md) and reported in a warning line; each wrote its line, with no
limit: a requestor sending one UID in a loop, a byte changed each time, wrote a line a
C-STORE (300 C-STOREs: 299 lines). The report now goes through a ``LogLimit`` (10
lines per 10 s, then one counting the rest), as every refusal does (docs/security.md).
At most ``embedded.MAX_VERSIONS`` versions of one UID are kept (before, every one: the
loop filled the disk); each one more is answered Out of Resources, and that failure's
line is bounded the same way. A real lone peer, pynetdicom.
"""
from __future__ import annotations

import time

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage

from pacsp2p.adapters.embedded import MAX_VERSIONS
from pacsp2p.testing import Peer, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience, wait_until

STORES = 100


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("conflicts"), name="conflicts") as p:
        yield p


def lines(peer, text: str) -> list[str]:
    return [line for line in peer.log_path.read_text(errors="replace").splitlines()
            if text in line]


def test_a_loop_of_conflicting_versions_writes_a_bounded_log(peer):
    ds = datasets.make_image("CT", size=8, PatientID="CONFLICTS",
                             transfer_syntax=ImplicitVRLittleEndian)
    statuses = []
    t0 = time.monotonic()
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, ImplicitVRLittleEndian)],
                        timeout=patience(120)) as a:
        for i in range(STORES):
            ds.ImageComments = f"version {i}"
            statuses.append(a.send_c_store(ds).Status)
    took = time.monotonic() - t0
    # the first MAX_VERSIONS kept (before: all 100, the disk filling), then Out of Resources
    assert statuses == [0x0000] * MAX_VERSIONS + [0xA700] * (STORES - MAX_VERSIONS)
    kept = dn.archive_files(peer.data_dir)
    assert len(kept) == MAX_VERSIONS, len(kept)
    most = 10 * (int(took // 10) + 2)        # 10 a window of 10 s begun
    for text in ("received again with different bytes",
                 "versions of this SOP Instance UID are kept"):
        got = len(lines(peer, text))
        assert 1 <= got <= most, f"{got} lines '{text}' in {took:.1f} s"
    wait_until(lambda: lines(peer, "more store failure events"), 60,   # 84 of them
               what="the line counting the store failures not logged")
