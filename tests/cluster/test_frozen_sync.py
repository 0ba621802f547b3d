"""A peer that freezes (SIGSTOP) while another pulls catalog facts from it does not hold
that other peer's catalog sync: once the failure detector declares it dead, the pull
from it is cut and the next pull goes to a live peer.

Before, the pull waited for its answer's timeout (``fetching.ANSWER_TIMEOUT``, 60 s) and
a peer pulls one at a time: every fact of every other peer -- new instances, tombstones
-- waited behind it. Found with ``pacsp2p delete`` just after a peer froze: the healthy
third peer did not pull the tombstones, and the delete waited its whole
``SPREAD_TIMEOUT`` (30 s; "peer(s) peerb have not pulled the tombstones after 30 s").

Three real peers (R=2); a stream of C-STOREs at peerc, which peerb pulls the facts of
from peerc; peerc is frozen in the middle of it; once it is dead, 5 instances stored at
peera must reach peerb's catalog soon. Three rounds (a freeze lands in a pull from peerc
often, not always).
"""
from __future__ import annotations

import os
import signal
import threading
import time

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import build_context

from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, members, store_study, wait_until

ROUNDS = 3
N = 120
FREEZE_AT = 60
BOUND = 30.0     # seconds: detection (~2.5 s) and a pull, far below ANSWER_TIMEOUT (60)


def _vector(peer) -> dict:
    return get_json(peer)["overlay"]["vector"]


def _stream(peer, files, frozen, statuses):
    """C-STOREs of *files* at *peer*, which is frozen (SIGSTOP) after FREEZE_AT: the
    C-STORE under way then waits until it is resumed."""
    context = [build_context(MRImageStorage, [ExplicitVRLittleEndian])]
    with dn.association(peer.port, peer.ae_title, context, timeout=120) as assoc:
        for i, path in enumerate(files):
            if i == FREEZE_AT:
                os.kill(peer.process.pid, signal.SIGSTOP)
                frozen.set()
            answer = assoc.send_c_store(path)
            statuses.append(answer.Status if "Status" in answer else None)


def test_a_frozen_peer_does_not_hold_the_others_catalog_sync(cluster, tmp_path):
    cluster.start(3)
    cluster.wait_mesh()
    a, b, writer = cluster[0], cluster[1], cluster[2]
    lags = []
    for r in range(ROUNDS):
        files = datasets.make_study(tmp_path / f"s{r}", patient_id=f"FRZSYNC{r}", size=16,
                                    series=[("MR", N, ExplicitVRLittleEndian)])
        frozen, statuses = threading.Event(), []
        streaming = threading.Thread(target=_stream, args=(writer, files, frozen, statuses))
        streaming.start()
        try:
            # peerb pulls the stream's facts from its writer, which freezes meanwhile
            wait_until(frozen.is_set, 120, what="the writer frozen")
            wait_until(lambda: members(b)[writer.name] == "dead", 60, interval=0.2,
                       what=f"{writer.name} dead at {b.name}")
            store_study(a, tmp_path / f"a{r}", f"FRZSYNCA{r}", 5)
            top = _vector(a)[a.name]        # peera's own log, as it stands now
            t0 = time.monotonic()
            wait_until(lambda: _vector(b).get(a.name, 0) >= top, 120, interval=0.2,
                       what=f"{b.name} holds {a.name}'s log up to {top}")
            lags.append(round(time.monotonic() - t0, 1))
        finally:
            os.kill(writer.process.pid, signal.SIGCONT)
            streaming.join()
        assert lags[-1] < BOUND, lags       # before: ~60 s when the freeze cut a pull
        assert statuses == [0x0000] * N, statuses
        wait_until(lambda: all(members(p)[writer.name] == "alive" for p in (a, b)), 120,
                   interval=0.5, what=f"{writer.name} alive again")
    print(f"seconds until {b.name} held {a.name}'s log, each round: {lags}")
    assert max(lags) < BOUND, lags
