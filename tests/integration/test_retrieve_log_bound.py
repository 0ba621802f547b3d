"""A loop of small C-GETs or C-MOVEs writes a bounded log (fourteenth hostile-input session).

Each C-GET whose sub-operations failed wrote its summary line, and each C-MOVE its line
of counts, with no limit: a requestor looping tiny retrieves on one association wrote a
line each. They go through the acceptor's ``LogLimit`` now (``Operation.note``: at most
10 lines a kind per 10 s, then one counting the rest), as every refusal does (docs/
security.md). A real peer, DCMTK storescp as the destination, pynetdicom as requestor;
the C-GET proposes a storage context for MR only, so its CT sub-operation fails with
0xA702 and the instance in the Failed SOP Instance UID List, at once (no hang). The SCU's
factory of each C-MOVE's association wrote 'Starting factory' and 'Stopping factory'
(Twisted's noisy factory): two more lines a C-MOVE, now none.
"""
from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context, build_role
from pynetdicom.sop_class import CTImageStorage, MRImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from pacsp2p.testing import Peer, StoreSCP, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience, wait_until

LOOPS = 100


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with StoreSCP(tmp_path_factory.mktemp("logbound-dest")) as dest, \
            Peer(tmp_path_factory.mktemp("logbound"), name="logbound",
                 destinations={"STORESCP": dest.address}) as peer:
        ds = datasets.make_image("CT", size=8, PatientID="LOGBOUND",
                                 transfer_syntax=ImplicitVRLittleEndian)
        with dn.association(peer.port, peer.ae_title,
                            [build_context(CTImageStorage, ImplicitVRLittleEndian)]) as a:
            assert a.send_c_store(ds).Status == 0
        yield peer, dest, ds


def lines(peer, text: str) -> list[str]:
    return [line for line in peer.log_path.read_text(errors="replace").splitlines()
            if text in line]


def bound(seconds: float) -> int:
    """The most lines LogLimit lets through in *seconds*: 10 a window of 10 s begun."""
    return 10 * (int(seconds // 10) + 2)


def query(ds) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
    return q


def test_a_loop_of_failing_c_gets_writes_a_bounded_log(site):
    peer, _, ds = site
    before = len(lines(peer, "C-GET from"))
    finals = []
    t0 = time.monotonic()
    with dn.association(peer.port, peer.ae_title,
                        [build_context(GET), build_context(MRImageStorage)],
                        ext_neg=[build_role(MRImageStorage, scp_role=True)],
                        timeout=patience(120)) as a:
        for _ in range(LOOPS):
            final, identifier = list(a.send_c_get(query(ds), GET))[-1]
            finals.append((final.Status, identifier.FailedSOPInstanceUIDList))
    took = time.monotonic() - t0
    assert set(finals) == {(0xA702, ds.SOPInstanceUID)}, finals[:3]
    got = len(lines(peer, "C-GET from")) - before
    assert 1 <= got <= bound(took), f"{got} lines for {LOOPS} C-GETs in {took:.1f} s"
    wait_until(lambda: lines(peer, "more C-GET summary events"), 60,
               what="the line counting the C-GET summaries not logged")


def test_a_loop_of_c_moves_writes_a_bounded_log(site):
    peer, dest, ds = site
    before = len(lines(peer, "instances to STORESCP"))
    lines_before = len(lines(peer, ""))
    t0 = time.monotonic()
    with dn.association(peer.port, peer.ae_title, [build_context(MOVE)],
                        timeout=patience(120)) as a:
        statuses = [[s.Status for s, _ in a.send_c_move(query(ds), "STORESCP", MOVE)][-1]
                    for _ in range(LOOPS)]
    took = time.monotonic() - t0
    assert set(statuses) == {0x0000}, statuses
    assert {dn.sop_uid(p) for p in dest.files()} == {ds.SOPInstanceUID}
    got = len(lines(peer, "instances to STORESCP")) - before
    assert 1 <= got <= bound(took), f"{got} lines for {LOOPS} C-MOVEs in {took:.1f} s"
    written = len(lines(peer, "")) - lines_before      # no other line a C-MOVE either
    assert written <= 2 * bound(took), f"{written} lines for {LOOPS} C-MOVEs"
    wait_until(lambda: lines(peer, "more C-MOVE summary events"), 60,
               what="the line counting the C-MOVE summaries not logged")
