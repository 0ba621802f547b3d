"""C-CANCEL from a hostile or clumsy requestor during a C-GET and a C-MOVE (PS3.7
9.3.2.3, 9.3.3.3), against one real peer and a DCMTK storescp destination: at the first
sub-operation (in the same write as the request), mid-way, after the last; naming no
operation; sent 3 or 2,000 times; carrying a data set; followed at once by the release
or an A-ABORT. Each ends in one final response (0xFE00 with counts when honoured), no
sub-operation association left open at the destination, no traceback, and the
association serves the next request (a C-ECHO). Found sound (2026-12-07); kept so it
stays so.
"""
from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (CTImageStorage, StudyRootQueryRetrieveInformationModelGet
                                  as GET, Verification)

from pacsp2p.testing import Peer, StoreSCP, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience, wait_until
from pacsp2p.testing.fuzz import wire as w
from pacsp2p.testing.fuzz.cases import Case
from pacsp2p.testing.fuzz.client import send_case

N = 20
STUDY = datasets.uid("hostile-cancel-study")
IDENT = w.data_set({0x00080052: b"STUDY", 0x0020000D: STUDY.encode()})


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-cancel")
    series = datasets.uid("hc-series", STUDY)
    files = []
    for i in range(1, N + 1):
        ds = datasets.make_image("CT", size=32, seed=i, PatientID="HC0001",
                                 PatientName="HOSTILE^CANCEL", StudyInstanceUID=STUDY,
                                 SeriesInstanceUID=series, SeriesNumber=1, InstanceNumber=i,
                                 SOPInstanceUID=datasets.uid("hc-sop", series, i))
        files.append(datasets.write(ds, d / "in" / f"{i:03d}.dcm"))
    with StoreSCP(d / "received") as scp, \
            Peer(d / "peer", name="hcancel", destinations={"STORESCP": scp.address}) as p:
        storescu(p.port, p.ae_title, files)
        p.scp = scp
        yield p


def served_and_clean(peer):
    with dn.association(peer.port, peer.ae_title, [build_context(Verification)]) as a:
        assert a.send_c_echo().Status == 0
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]


def get_association(peer):
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, False, True
    cxs = [build_context(GET), build_context(Verification),
           build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
    return dn.association(peer.port, peer.ae_title, cxs, ext_neg=[role],
                          evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)],
                          timeout=patience(120))


@pytest.mark.parametrize("at, target, times", [
    (1, 7, 1), (10, 7, 1), (1, 7, 3), (1, 8, 1), (1, 0, 1), (N + 1, 7, 1)])
def test_cancel_of_a_get_at_any_point(peer, at, target, times):
    """pynetdicom's C-CANCEL after the *at*-th response naming *target* (the C-GET is
    7), *times* times; after the final (at > N) it names nothing."""
    responses = []
    with get_association(peer) as a:
        cx = next(c for c in a.accepted_contexts if c.abstract_syntax == GET)
        for status, _ in a.send_c_get(Dataset.from_json({
                "00080052": {"vr": "CS", "Value": ["STUDY"]},
                "0020000D": {"vr": "UI", "Value": [STUDY]}}), GET, msg_id=7):
            responses.append(status)
            if len(responses) == at:
                for _ in range(times):
                    a.send_c_cancel(target, cx.context_id)
        if at > N:
            a.send_c_cancel(target, cx.context_id)
        assert a.send_c_echo().Status == 0
    final = responses[-1]
    if target == 7 and at <= N:
        assert final.Status == 0xFE00, final
        done = final.NumberOfCompletedSuboperations
        assert 0 < done < N and final.NumberOfRemainingSuboperations == N - done, final
    else:
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == N, final
    served_and_clean(peer)


def cancel(msg_id, cid, data=None):
    fields = [(0x0100, w.C_CANCEL_RQ), (0x0120, msg_id),
              (0x0800, w.NO_DATA if data is None else 0)]
    return w.message(cid, w.command_set(fields), data)


RAW = {   # what follows the A-ASSOCIATE-RQ and the C-GET / C-MOVE (message ID 1)
    "cancel at once": lambda cx: cancel(1, cx) + w.message(w.CX_ECHO, w.c_echo(2)),
    "cancel with a data set": lambda cx: cancel(1, cx, IDENT) +
    w.message(w.CX_ECHO, w.c_echo(2)),
    "2,000 cancels": lambda cx: cancel(1, cx) * 2000 + w.message(w.CX_ECHO, w.c_echo(2)),
    "cancel then release": lambda cx: cancel(1, cx) + w.RELEASE_RQ,
    "release": lambda cx: w.RELEASE_RQ,
    "cancel then abort": lambda cx: cancel(1, cx) + w.ABORT,
}


@pytest.mark.parametrize("how", list(RAW))
@pytest.mark.parametrize("service", ["C-GET", "C-MOVE"])
def test_a_cancel_in_the_same_write_as_the_request(peer, service, how):
    if service == "C-GET":
        cx, rq = w.CX_GET, w.associate_rq(called=peer.ae_title, roles=[w.CT])
        request = w.message(cx, w.c_find(1, w.GET_STUDY, w.C_GET_RQ), IDENT)
    else:
        cx, rq = w.CX_MOVE, w.associate_rq(called=peer.ae_title)
        request = w.message(cx, w.c_find(1, w.MOVE_STUDY, w.C_MOVE_RQ, dest="STORESCP"),
                            IDENT)
    scp_log = peer.scp.log_path
    before = scp_log.read_text()
    case = Case(0, how, wait=patience(60), finals=2)
    case.send(rq + request + RAW[how](cx))
    if how == "cancel then abort":
        case.end = "close"
    res = send_case("127.0.0.1", peer.port, case, io_timeout=patience(60))
    if how.startswith("cancel") and "release" not in how and "abort" not in how or \
            how == "2,000 cancels":
        assert res.statuses[-2:] == [0xFE00, 0x0000], (res.outcome, res.statuses)
    elif "release" in how:
        assert res.outcome == "released", res.outcome
    # every sub-operation association the peer opened to the destination is ended
    wait_until(lambda: (lambda t: t.count("Association Received") == t.count(
        "Association Release") + t.count("Association Aborted"))(
            scp_log.read_text()[len(before):]), patience(60), 0.2, "destination freed")
    served_and_clean(peer)
