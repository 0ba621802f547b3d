"""A patient's row emptied of the instance whose version it held, at a peer that never
saw that instance: every peer ends with the same row (``catalog.rows``: a deleted
instance's facts carry its series, study and patient rows, retired or held).

Three real twistd peers, R=1, W=1, DCMTK storescu/findscu by full path:

1. instance x1 (PatientName LWW^V1) sent to peerb; every peer answers it;
2. peerb stopped; instance x2 of the same series (LWW^V2, received later) sent to
   peera; peera and peerc answer LWW^V2;
3. ``pacsp2p delete --instance x2`` at peera; peera and peerc answer x1 alone, LWW^V2;
4. peerb started again: it learns x2 only as deleted.

Then every peer answers the one instance x1 under LWW^V2 and the catalog digests are
equal. Before: the facts of a deleted instance travelled without rows, so peerb kept
LWW^V1 for ever while peera and peerc answered LWW^V2 (digests unequal after 180 s).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsp2p.testing import datasets as D
from pacsp2p.testing import findscu, storescu
from pacsp2p.testing.cluster import digest, wait_until

PACSP2P = Path(sys.executable).parent / "pacsp2p"
PID = "LWWDEL1"


@pytest.fixture(scope="module")
def trio(make_cluster):
    return make_cluster(3, config={"cluster": {"replicas": 1, "write_quorum": 1}})


def version(root: Path, v: int) -> Path:
    """Instance x<v> of the one patient, study and series, with PatientName LWW^V<v>."""
    root.mkdir()
    return D.write(D.make_image("CT", size=8, seed=v, PatientName=f"LWW^V{v}", PatientID=PID,
                                PatientSex="MF"[v - 1], StudyInstanceUID=D.uid("lwwdel"),
                                SeriesInstanceUID=D.uid("lwwdel-se"),
                                SOPInstanceUID=D.uid("lwwdel-sop", v), InstanceNumber=str(v)),
                   root / f"x{v}.dcm")


def patient(peer) -> tuple[str, str, str] | None:
    """(PatientName, PatientSex, instances) of PID as *peer* answers, None if none."""
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": PID, "PatientName": "",
        "PatientSex": "", "NumberOfPatientRelatedInstances": ""}, model="P", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(rows) <= 1
    return (str(rows[0].PatientName), str(rows[0].PatientSex),
            str(rows[0].NumberOfPatientRelatedInstances)) if rows else None


def test_a_peer_that_learns_a_version_only_as_deleted_takes_its_row(trio, tmp_path):
    a, b, c = trio[0], trio[1], trio[2]
    x1, x2 = version(tmp_path / "v1", 1), version(tmp_path / "v2", 2)
    assert storescu(b.port, b.ae_title, [x1]).returncode == 0
    wait_until(lambda: all(patient(p) == ("LWW^V1", "M", "1") for p in (a, b, c)), 120,
               interval=1, what="every peer answers x1")
    b.stop()
    assert storescu(a.port, a.ae_title, [x2]).returncode == 0
    wait_until(lambda: all(patient(p) == ("LWW^V2", "F", "2") for p in (a, c)), 120,
               interval=1, what="peera and peerc answer x1 and x2 under LWW^V2")
    done = subprocess.run([str(PACSP2P), "delete", "--config", str(a.config_path),
                           "--instance", D.uid("lwwdel-sop", 2), "--reason", "test"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: all(patient(p) == ("LWW^V2", "F", "1") for p in (a, c)), 120,
               interval=1, what="x2 deleted at peera and peerc, LWW^V2 kept")
    b.restart()
    trio.wait_mesh(timeout=120)
    wait_until(lambda: len({digest(p) for p in (a, b, c)}) == 1, 180, interval=2,
               what="equal catalog digests")
    assert [patient(p) for p in (a, b, c)] == [("LWW^V2", "F", "1")] * 3
