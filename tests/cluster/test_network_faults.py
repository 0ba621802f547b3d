"""Network faults between peers (fault injection, sixteenth session): three real peers,
each twistd in a network namespace of its own behind a router namespace
(``pacsp2p.testing.netfaults``; 198.18.0.0/15), a pynetdicom requestor timing each
C-STORE of a stream at peera.

1. 5 % loss and 100 ms (+-10 ms) delay each way on every packet between peers, 20 s:
   every C-STORE Success within ``BOUND``, and no peer declared dead by any (SWIM with
   Lifeguard holds: a suspicion is allowed, a death is a false one).
2. peerb cut off from the others (both ways) for 10 s, then healed: every C-STORE
   Success within ``BOUND`` (a copy waiting for peerb placed elsewhere once it is
   declared dead), and after the heal every peer sees every other alive, the catalogs'
   digests are equal, no hint is left and each acknowledged instance has 2 copies.

No traceback in any log. Needs root (ip netns, a TUN device: this kernel has no
sch_netem, so loss and delay are applied by ``pacsp2p.testing.netem``). The namespaces,
links and the emulator are removed whatever happened.
"""
from __future__ import annotations

import threading
import time

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE

from pacsp2p.testing import datasets, fuzz
from pacsp2p.testing.cluster import wait_until
from pacsp2p.testing.netfaults import Net, NsCluster

BOUND = 15.0          # seconds one C-STORE may take: detection (~2.5 s) and more, far
#                       below the push's answer wait (600 s)
LOSSY = 20.0          # seconds of loss + delay
CUT = 10.0            # seconds peerb is cut off


def stream(peer, files, seconds: float, out: list) -> None:
    """C-STOREs of *files* to *peer* on one association for *seconds* (at most all)."""
    ae = AE(ae_title="STREAM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    assert assoc.is_established
    try:
        end = time.monotonic() + seconds
        for path in files:
            if time.monotonic() > end:
                break
            t0 = time.monotonic()
            status = assoc.send_c_store(path)
            out.append((path, time.monotonic() - t0,
                        status.Status if "Status" in status else None))
    finally:
        assoc.release()
        ae.shutdown()


def watch(cluster, stop: threading.Event, seen: list) -> None:
    while not stop.is_set():
        for p in cluster:
            try:
                seen += [(p.name, n, s) for n, s in p.members().items() if s == "dead"]
            except Exception:       # a peer busy a moment: the next look sees it
                pass
        stop.wait(1.0)


def test_loss_delay_and_a_partition_between_peers(tmp_path):
    files = datasets.make_study(tmp_path / "study", patient_id="NETFAULT", size=32,
                                series=[("MR", 400, ExplicitVRLittleEndian)])
    with Net(3, tmp_path / "net") as net:
        cluster = NsCluster(tmp_path / "cl", net)
        try:
            cluster.start()
            cluster.wait_mesh()
            a, b, c = (net.addr(k) for k in range(3))
            peers = [a, b, c]
            # 1. loss and delay
            stored, seen, stop = [], [], threading.Event()
            watcher = threading.Thread(target=watch, args=(cluster, stop, seen))
            net.faults([{"src": peers, "dst": peers, "loss": 0.05, "delay": 0.1,
                         "jitter": 0.01}])
            watcher.start()
            try:
                stream(cluster[0], files[:200], LOSSY, stored)
            finally:
                net.faults([])
                stop.set()
                watcher.join()
            lossy = [dt for _, dt, _ in stored]
            print(f"5 % loss, 100 ms each way: {len(stored)} C-STOREs, max "
                  f"{max(lossy):.2f} s, mean {sum(lossy) / len(lossy) * 1000:.0f} ms; "
                  f"deaths seen {sorted(set(seen))}")
            assert not seen, f"false deaths under loss and delay: {sorted(set(seen))}"
            # 2. peerb cut off, then healed
            cut: list = []
            net.faults([{"src": [b], "dst": [a, c], "loss": 1.0},
                        {"src": [a, c], "dst": [b], "loss": 1.0}])
            try:
                stream(cluster[0], files[200:], CUT, cut)
            finally:
                net.faults([])
            healed = time.monotonic()
            parted = [dt for _, dt, _ in cut]
            print(f"peerb cut off {CUT:.0f} s: {len(cut)} C-STOREs, max {max(parted):.2f} s")
            stored += cut
            bad = [(round(dt, 2), st) for _, dt, st in stored if st != 0 or dt > BOUND]
            assert not bad, f"{len(bad)} C-STOREs failed or slower than {BOUND} s: {bad[:5]}"
            uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p, _, _ in stored}
            study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

            def converged() -> bool:
                if any(s not in ("alive", "self") for p in cluster
                       for s in p.members().values()):
                    return False
                if len({p.get_json("digest")["digest"] for p in cluster}) != 1 or \
                        any(p.get_json()["catalog"].get("hints", 1) for p in cluster):
                    return False
                rows = cluster[2].get_json(f"where?study={study}")
                copies = {r["instance"]: len({x["peer"] for x in r["replicas"]}) for r in rows}
                return all(copies.get(u, 0) >= 2 for u in uids)
            wait_until(converged, 60, interval=1.0, what="convergence after the heal")
            print(f"converged {time.monotonic() - healed:.1f} s after the heal")
        finally:
            cluster.stop()
    for p in cluster:
        problems = fuzz.log_problems(p.log_path.read_bytes())
        assert not problems, f"{p.name}: {problems[0][1][:2000]}"
