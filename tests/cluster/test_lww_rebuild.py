"""A peer whose catalog is lost and rebuilt from its archive answers the rows the others
answer (``catalog.rebuild`` marks the catalog, ``overlay.reclaim`` pulls back every fact
of its own at the first start, with the rows' last-writer-wins stamps).

Two real twistd peers, R=1, W=1, DCMTK storescu/findscu by full path: PATIENTS patients,
each with version 2 (PatientName LWW^V2, received first) then version 1 (LWW^V1,
received later: the row's version) in one series, sent to peera. Of the patients whose
two instances both landed on peera's archive, peera's catalog is deleted with the peer
stopped and rebuilt (``pacsp2p catalog rebuild``): the files say nothing of receipts,
so the rebuilt rows take the greater values, LWW^V2, stamp 0. Started again, peera must
answer LWW^V1 as peerb does, digests equal. Before: peera answered LWW^V2 for ever.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsp2p.testing import datasets as D
from pacsp2p.testing import findscu, storescu
from pacsp2p.testing.cluster import digest, get_json, wait_until

PACSP2P = Path(sys.executable).parent / "pacsp2p"
PATIENTS = 24


@pytest.fixture(scope="module")
def pair(make_cluster):
    return make_cluster(2, config={"cluster": {"replicas": 1, "write_quorum": 1}})


def version(root: Path, v: int) -> Path:
    for p in range(PATIENTS):
        D.write(D.make_image("CT", size=8, seed=v, PatientName=f"LWW^V{v}",
                             PatientID=f"LWWRB{p}", StudyInstanceUID=D.uid("lwwrb", p),
                             SeriesInstanceUID=D.uid("lwwrb-se", p),
                             SOPInstanceUID=D.uid("lwwrb-sop", p, v)), root / f"{p}.dcm")
    return root


def names(peer) -> dict[str, str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": "LWWRB*", "PatientName": "",
        "NumberOfPatientRelatedInstances": ""}, model="P", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.PatientID): f"{r.PatientName} {r.NumberOfPatientRelatedInstances}"
            for r in rows}


def test_a_rebuilt_catalog_answers_the_rows_the_others_answer(pair, tmp_path):
    a, b = pair[0], pair[1]
    for v in (2, 1):                                # V1 received last: the rows' version
        assert storescu(a.port, a.ae_title, [version(tmp_path / f"v{v}", v)]).returncode == 0
    want = {f"LWWRB{p}": "LWW^V1 2" for p in range(PATIENTS)}
    wait_until(lambda: names(a) == want and names(b) == want, 120, interval=1,
               what="both peers answer every patient, LWW^V1")
    alone = [f"LWWRB{p}" for p in range(PATIENTS)
             if all({r["peer"] for r in row["replicas"]} == {a.name} for row in get_json(
                 a, f"where?study={D.uid('lwwrb', p)}"))]
    assert alone, "no patient with both copies on peera (rendezvous placement)"
    a.stop()
    catalog = a.data_dir / "catalog.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{catalog}{suffix}").unlink(missing_ok=True)       # lost
    done = subprocess.run([str(PACSP2P), "catalog", "rebuild", "--config", str(a.config_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    a.restart()
    pair.wait_mesh(timeout=120)
    wait_until(lambda: digest(a) == digest(b), 180, interval=2, what="equal catalog digests")
    assert names(a) == names(b) == want             # peerb's answers never changed
