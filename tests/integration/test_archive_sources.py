"""Every archive a source (issue 14): ONE peer managing two real Orthanc archives and one
embedded archive, all three holding the same study, reads a C-MOVE from all three at
once, and survives ``kill -9`` of one Orthanc mid-transfer with 0 failed.

The study is stored through the peer with ``replicas = write_quorum = 3`` (the rule of
distinct copies puts one copy on each of the peer's three archives). The C-MOVE
destinations: a DCMTK storescp (+B, bytes as received) and, for the kill, a pynetdicom
storage SCP that takes 30 ms per C-STORE, so that the transfer lasts long enough to
kill an Orthanc (by its PID) while the retrieval still has most instances to fetch.
"""
from __future__ import annotations

import hashlib
import subprocess
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt

from pacsp2p.testing import Orthanc, Peer, StoreSCP, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.dcmtk import dcmtk_env, dcmtk_path
from pacsp2p.testing.ports import LOOPBACK, free_port

N = 150
ARCHIVES = ("orthanc1", "orthanc2", "local")


class SlowSCP:
    """A storage SCP (pynetdicom, in this process) taking *delay* s per C-STORE; keeps
    {SOP Instance UID: sha256 of the data set bytes as received}."""

    def __init__(self, ae_title: str = "SLOWSCP", delay: float = 0.03):
        self.ae_title, self.delay = ae_title, delay
        self.got: dict[str, str] = {}
        self.lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = StoragePresentationContexts
        ae.maximum_pdu_size = 0
        self.server = ae.start_server((LOOPBACK, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event):
        time.sleep(self.delay)
        data = event.request.DataSet.getvalue()
        with self.lock:
            self.got[event.request.AffectedSOPInstanceUID] = hashlib.sha256(data).hexdigest()
        return 0x0000

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    orthancs = [Orthanc(root / name, aet=name.upper()).start() for name in ARCHIVES[:2]]
    slow = SlowSCP()
    try:
        with StoreSCP(root / "in", extra=["+B"]) as dest:
            peer = Peer(root / "peer", name="north", ae_title="NORTH", destinations={
                "STORESCP": dest.address, "SLOWSCP": f"{LOOPBACK}:{slow.port}"},
                config={"cluster": {"replicas": 3, "write_quorum": 3},
                        "archives": [
                            {"name": "orthanc1", "adapter": "orthanc", "url": orthancs[0].url},
                            {"name": "orthanc2", "adapter": "orthanc", "url": orthancs[1].url},
                            {"name": "local", "adapter": "embedded"}]}).start()
            try:
                files = datasets.make_study(root / "study", patient_id="SRC0001", size=128,
                                            series=[("CT", N, ExplicitVRLittleEndian)])
                proc = storescu(peer.port, peer.ae_title, files, extra=["-v"], timeout=300)
                assert (proc.stdout + proc.stderr).count(
                    "Received Store Response (Success)") == N, proc.stderr[-2000:]
                study = dn.study_of(files)
                rows = get_json(peer, f"where?study={study}")
                assert len(rows) == N and all(
                    {r["archive"] for r in row["replicas"]} == set(ARCHIVES) for row in rows)
                for o in orthancs:
                    assert o.get("/statistics")["CountInstances"] == N
                yield {"peer": peer, "dest": dest, "slow": slow, "orthancs": orthancs,
                       "study": study, "sent": dn.dataset_hashes(files)}
            finally:
                peer.stop()
    finally:
        slow.stop()
        for o in orthancs:
            o.stop()


def latest(peer, before: int = 0) -> dict | None:
    rs = [r for r in get_json(peer, timeout=10)["retrievals"]
          if r["instances"] == N and r["id"] > before]
    return max(rs, key=lambda r: r["id"]) if rs else None


def test_a_move_reads_from_all_three_archives_of_one_peer(world):
    peer, dest = world["peer"], world["dest"]
    dn.clear(dest.directory)
    proc = dn.movescu(peer.port, peer.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": world["study"]},
                      timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Received Final Move Response (Success)" in out, out[-3000:]
    assert dn.dataset_hashes(dest.files()) == world["sent"], "not byte-identical"
    r = latest(peer)
    sources = r["sources"]
    print(f"\nC-MOVE from one peer's three archives: {sources}")
    assert set(sources) == {f"north/{a}" for a in ARCHIVES}, sources
    assert all(s["completed"] > 0 and s["alive"] and s["failed"] == 0
               for s in sources.values()), sources
    assert sum(s["completed"] for s in sources.values()) == N
    assert sources["north/orthanc1"]["limit"] == 4 and sources["north/local"]["limit"] == 8
    status = get_json(peer)
    assert {f"north/{a}" for a in ARCHIVES} <= set(status["sources"]), status["sources"]
    assert all(status["sources"][f"north/{a}"]["MB_per_s"] > 0 for a in ARCHIVES)
    assert status["archives"]["orthanc1"]["max_fetches"] == 4


def test_kill9_of_one_orthanc_mid_move_costs_no_suboperation(world):
    peer, slow = world["peer"], world["slow"]
    victim = world["orthancs"][0]
    slow.got.clear()
    before = (latest(peer) or {"id": 0})["id"]
    argv = [str(dcmtk_path("movescu")), "-S", "-v", "-aet", "MOVESCU", "-aec",
            peer.ae_title, "-aem", "SLOWSCP", "-to", "20", "-ta", "20", "-td", "120",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={world['study']}",
            LOOPBACK, str(peer.port)]
    mover = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, errors="replace", env=dcmtk_env(),
                             stdin=subprocess.DEVNULL)
    try:
        state = {}

        def under_way():
            r = state["r"] = latest(peer, before)
            return r is not None and r["done"] >= 15 and \
                r["sources"].get("north/orthanc1", {}).get("completed", 0) > 0
        wait_until(under_way, 120, interval=0.02, what="the C-MOVE's retrieval under way")
        assert victim.process.kill9() is not None
        done_at_kill = state["r"]["done"]
        out, _ = mover.communicate(timeout=600)
    finally:
        if mover.poll() is None:
            mover.kill()
            mover.wait(10)
    print(f"\nkilled orthanc1 (pid) with {done_at_kill}/{N} fetched")
    assert done_at_kill < N - 30, "the retrieval was nearly over before the kill"
    assert mover.returncode == 0, out[-3000:]
    final = out.split("Received Final Move Response")[-1]
    assert final.lstrip().startswith("(Success)"), out[-3000:]
    assert slow.got == world["sent"], "missing or different data sets at the destination"
    r = latest(peer, before)
    sources = r["sources"]
    print(f"sources after the kill: {sources}")
    assert r["done"] == N
    assert sources["north/orthanc1"]["alive"] is False, sources
    assert sum(s["completed"] for s in sources.values()) == N
    assert sources["north/orthanc2"]["completed"] > 0 and sources["north/local"]["completed"] > 0
