"""A C-GET whose requestor leaves (or cancels) stops its retrieval (fourteenth
hostile-input session).

The facade's C-GET reads its instances through a ``Retrieval`` that fetches ahead of
the sub-operations, up to a window of 64 instances. When the requestor went away
mid-way (an A-ABORT, a dropped connection) or sent a C-CANCEL, nothing stopped the
retrieval: it went on fetching into its window for nobody (from other peers too) and
kept what it fetched, in memory for the small ones, while the cluster's status list
holds it (the latest 20). A requestor opening C-GETs of a study of 512 KB CTs and
leaving grew a lone peer by ~20 MB each, never given back (104 -> 453 MB after 8 + 7 of
them). Now the C-GET cancels its retrieval when it ends or its requestor leaves; what
was fetched and not sent is let go. A real lone peer, a raw-socket requestor
(``pacsp2p.testing.fuzz.wire``), the peer's /status.
"""
from __future__ import annotations

import socket

import pytest
from pydicom import dcmread

from pacsp2p.testing import Peer, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, patience, wait_until
from pacsp2p.testing.dcmtk import storescu
from pacsp2p.testing.fuzz import wire as w
from pacsp2p.testing.ports import LOOPBACK

N = 150


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("abandoned-files")
    paths = datasets.make_study(d, patient_id="ABANDONED", size=64,
                                series=(("CT", N, "1.2.840.10008.1.2.1"),))
    study = str(dcmread(paths[0]).StudyInstanceUID)
    with Peer(tmp_path_factory.mktemp("abandoned"), name="abandoned") as peer:
        storescu(peer.port, peer.ae_title, [d])
        yield peer, study




def start_get(peer, study) -> socket.socket:
    """A C-GET of *study* whose requestor takes the first sub-operation's C-STORE-RQ
    and answers nothing."""
    sock = socket.create_connection((LOOPBACK, peer.port), timeout=patience(60))
    sock.sendall(w.associate_rq(contexts=[(1, w.GET_STUDY, [w.IMPLICIT]),
                                          (3, w.CT, [w.EXPLICIT])], roles=[w.CT]))
    assert w.read_pdu(sock)[0] == 0x02                      # A-ASSOCIATE-AC
    identifier = w.data_set({0x00080052: b"STUDY", 0x0020000D: study.encode()})
    sock.sendall(w.message(1, w.c_find(1, w.GET_STUDY, w.C_GET_RQ), identifier))
    assert w.read_pdu(sock)[0] == 0x04                      # the first C-STORE-RQ
    return sock


def the_get(peer, before: set) -> dict:
    found = []

    def appeared():
        found[:] = [r for r in get_json(peer)["retrievals"] if r["id"] not in before]
        return found
    wait_until(appeared, 60, what="the C-GET's retrieval in /status")
    return found[0]


def retrieval(peer, rid) -> dict:
    return next(r for r in get_json(peer)["retrievals"] if r["id"] == rid)


@pytest.mark.parametrize("how", ["abort", "close"])
def test_a_c_get_whose_requestor_leaves_stops_its_retrieval(site, how):
    peer, study = site
    before = {r["id"] for r in get_json(peer)["retrievals"]}
    sock = start_get(peer, study)
    rid = the_get(peer, before)["id"]
    if how == "abort":
        sock.sendall(w.ABORT)
    sock.close()
    wait_until(lambda: retrieval(peer, rid)["cancelled"], 60,
               what="the abandoned C-GET's retrieval cancelled")
    r = retrieval(peer, rid)
    assert r["finished_at"] is not None and r["done"] < N, r


def test_a_c_get_cancelled_stops_its_retrieval(site):
    peer, study = site
    before = {r["id"] for r in get_json(peer)["retrievals"]}
    sock = start_get(peer, study)
    rid = the_get(peer, before)["id"]
    try:
        cancel = w.command_set([(0x0100, w.C_CANCEL_RQ), (0x0120, 1),
                                (0x0800, w.NO_DATA)])
        sock.sendall(w.message(1, cancel))
        wait_until(lambda: retrieval(peer, rid)["cancelled"], 60,
                   what="the cancelled C-GET's retrieval cancelled")
    finally:
        sock.close()


def test_a_c_get_sent_whole_is_not_called_cancelled(site):
    peer, study = site
    before = {r["id"] for r in get_json(peer)["retrievals"]}
    final, _, received = dn.get_study(peer, study, w.CT, "1.2.840.10008.1.2.1")
    assert final.Status == 0x0000 and len(received) == N
    r = the_get(peer, before)
    assert r["done"] == N and not r["cancelled"], r
