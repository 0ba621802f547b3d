"""A healthy peer declared dead for a moment (frozen a few seconds: a GC pause, a VM
steal, a host at load 20) costs neither availability nor copies.

Three real peers (R=2, W=2, the default placement). A holder is SIGSTOPped in the middle
of a C-STORE stream until the writer declares it dead, then resumed at once: it refutes
its death and is back within a second or two. Every C-STORE is answered Success (the
copies owed to it go to the third peer, hinted), and once the cluster settles every
instance has exactly two copies, no hint is left, and every peer's view agrees. The
same when the writer itself stands still until a holder declares it dead; and a peer
that stood still while holding a suspicion reads the refutation before its verdict.
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
from pacsp2p.testing.cluster import get_json, members, patience, wait_replicated, wait_until

N = 60
FREEZE_AT = 20
BOUND = 120.0


def _settled(cluster, study: str, n: int) -> None:
    """Until every peer's catalog holds the same two copies of each of the *n*
    instances of *study*, and no hint is left anywhere."""
    def where(p):
        return {r["instance"]: sorted(x["peer"] for x in r["replicas"])
                for r in get_json(p, f"where?study={study}", 30)}

    def agreed():
        views = [where(p) for p in cluster]
        return len(views[0]) == n and all(len(v) == 2 for v in views[0].values()) and \
            all(v == views[0] for v in views) and \
            all(get_json(p, "status")["catalog"].get("hints", 1) == 0 for p in cluster)
    wait_until(agreed, 300, interval=0.5, what="every peer's view of the copies agrees")


def _all_alive(cluster) -> bool:
    return all(st in ("alive", "self") for p in cluster for st in members(p).values())


def test_a_holder_dead_for_a_moment_costs_no_c_store_and_no_copy(cluster, tmp_path):
    cluster.start(3)
    cluster.wait_mesh()
    writer, frozen = cluster[0], cluster[1]
    files = datasets.make_study(tmp_path / "study", patient_id="FALSEDEAD1", size=16,
                                series=[("MR", N, ExplicitVRLittleEndian)])
    statuses, dead_for = [], None
    with dn.association(writer.port, writer.ae_title,
                        [build_context(MRImageStorage, [ExplicitVRLittleEndian])],
                        timeout=BOUND) as assoc:
        for i, path in enumerate(files):
            if i == FREEZE_AT:
                os.kill(frozen.process.pid, signal.SIGSTOP)
                try:
                    wait_until(lambda: members(writer)[frozen.name] == "dead", 60,
                               interval=0.1, what=f"{frozen.name} declared dead")
                finally:
                    os.kill(frozen.process.pid, signal.SIGCONT)
                t0 = time.monotonic()
            answer = assoc.send_c_store(path)
            statuses.append(answer.Status if "Status" in answer else None)
            if dead_for is None and i >= FREEZE_AT and \
                    members(writer)[frozen.name] == "alive":
                dead_for = time.monotonic() - t0
            if statuses[-1] is None:
                break
    assert statuses == [0x0000] * N, statuses
    wait_until(lambda: _all_alive(cluster), 60, interval=0.2, what="every view all alive")
    study = dn.study_of(files)
    rows = wait_replicated(writer, study, N, timeout=300)
    assert all(len(r["replicas"]) == 2 for r in rows), \
        [r["replicas"] for r in rows if len(r["replicas"]) != 2]
    _settled(cluster, study, N)
    print(f"{frozen.name} dead in the writer's view for {dead_for} s after its resume")


def _dead_count(peer) -> int:
    return get_json(peer, "status", 60)["overlay"]["swim"]["dead"]


def _stop(peer):
    os.kill(peer.process.pid, signal.SIGSTOP)


def _cont(peer):
    os.kill(peer.process.pid, signal.SIGCONT)


SUSPECTER_FROZEN = 1.5   # s: past its suspicion's timeout (1.25 s at 3 peers), short of
                         # the ~1.75 s the others need to declare IT dead


def test_a_suspicion_refuted_while_its_holder_stood_still_is_no_death(cluster):
    """peera suspects peerb (frozen a moment), then stands still itself past the
    suspicion's timeout while peerb, resumed, refutes. On resume peera's reactor ran the
    suspicion's timer, long past due, before reading the refutation waiting in its
    socket: it declared peerb dead (links closed, pushes and pulls to it cut, and the
    death gossiped) although peerb had answered. Now a verdict timer that fires late (this
    process stood still) first gives what waits a moment to be read.

    An attempt counts when peerc did not declare peerb dead itself (its own suspicion
    may run out before peerb's refutation reaches it: that is SWIM's verdict on peerb's
    freeze, not peera's)."""
    cluster.start(3)
    cluster.wait_mesh()
    a, b, c = cluster[0], cluster[1], cluster[2]
    counted, deaths_at_a = 0, []
    for attempt in range(8):
        before_a, before_c = _dead_count(a), _dead_count(c)
        _stop(b)
        try:
            wait_until(lambda: members(a)[b.name] != "alive", 60, interval=0.02,
                       what=f"{a.name} suspects {b.name}")
            _stop(a)
        finally:
            _cont(b)
        try:
            time.sleep(SUSPECTER_FROZEN)
        finally:
            _cont(a)
        wait_until(lambda: _all_alive(cluster), 60, interval=0.2,
                   what="every view all alive")
        time.sleep(1.0)
        if _dead_count(c) == before_c:
            counted += 1
            deaths_at_a.append(_dead_count(a) - before_a)
        if counted == 3:
            break
    assert counted >= 1, "peerc declared peerb dead in every attempt"
    assert deaths_at_a == [0] * counted, deaths_at_a


def test_a_writer_dead_for_a_moment_answers_every_c_store(cluster, tmp_path):
    """The writer itself stands still mid-stream (a GC pause) until a holder declares it
    dead, then goes on: it refutes, and every C-STORE of the association is answered
    Success with its two copies (the holders took the pushes of a member they had just
    held dead)."""
    cluster.start(3)
    cluster.wait_mesh()
    writer, other = cluster[0], cluster[2]
    n = 200
    files = datasets.make_study(tmp_path / "study", patient_id="FALSEDEAD2", size=16,
                                series=[("MR", n, ExplicitVRLittleEndian)])
    frozen = []

    def freeze():
        time.sleep(1.0)
        _stop(writer)
        t0 = time.monotonic()
        try:
            wait_until(lambda: members(other)[writer.name] == "dead", 60, interval=0.05,
                       what=f"{writer.name} declared dead")
        finally:
            _cont(writer)
        frozen.append(time.monotonic() - t0)

    statuses = []
    thread = threading.Thread(target=freeze)
    with dn.association(writer.port, writer.ae_title,
                        [build_context(MRImageStorage, [ExplicitVRLittleEndian])],
                        timeout=BOUND) as assoc:
        thread.start()
        for path in files:
            answer = assoc.send_c_store(path)
            statuses.append(answer.Status if "Status" in answer else None)
            if statuses[-1] is None:
                break
    thread.join(patience(60))
    assert frozen, "the writer was not declared dead"
    assert statuses == [0x0000] * n, statuses
    _settled(cluster, dn.study_of(files), n)
