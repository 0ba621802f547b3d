"""Many associations from one host against ``max_per_address``, at a real peer (sixteenth
hostile-input session).

With every one of an address's ``max_per_address`` connections an association, one
more from it was closed at accept: DCMTK's echoscu said "Peer aborted Association (or
never connected)". DCMTK's SCPs answer an association over their limit with
A-ASSOCIATE-RJ, rejected-transient (service provider, local limit exceeded), which a
modality reads as "try later"; so does the peer now (``admission.full``), as it answered
``max_associations`` already. Once one of them is released, the address is served again.
"""
from __future__ import annotations

import socket
import subprocess

import pytest

from pacsp2p.testing import Peer
from pacsp2p.testing.cluster import patience
from pacsp2p.testing.fuzz import wire as w

LIMIT = 4


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("perhost"), name="perhost",
              config={"facade": {"max_per_address": LIMIT}}) as p:
        yield p


def echoscu(peer) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/echoscu", "-aec", peer.ae_title, "127.0.0.1",
                           str(peer.port)], capture_output=True, text=True,
                          env={"TCP_NODELAY": "1"}, timeout=patience(60))


def test_one_association_too_many_from_a_host_is_rejected_transient(peer):
    held = []
    try:
        for _ in range(LIMIT):
            s = socket.create_connection(("127.0.0.1", peer.port), timeout=patience(30))
            s.sendall(w.associate_rq(called=peer.ae_title,
                                     contexts=[(1, w.VERIFICATION, [w.IMPLICIT])]))
            assert w.read_pdu(s)[0] == 0x02
            held.append(s)
        r = echoscu(peer)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "Association Rejected" in out, out
        assert "Transient" in out and "Local Limit Exceeded" in out.title(), out
        held.pop().sendall(w.RELEASE_RQ)          # one released: room again
        r = None
        for _ in range(50):
            r = echoscu(peer)
            if r.returncode == 0:
                break
        assert r is not None and r.returncode == 0, r.stdout + r.stderr
    finally:
        for s in held:
            s.close()
    log = peer.log_path.read_text(errors="replace")
    assert f"{LIMIT} associations from 127.0.0.1 already" in log
    assert "Traceback" not in log and "Unhandled" not in log
