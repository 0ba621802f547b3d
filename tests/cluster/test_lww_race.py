"""Two versions of a patient stored at two peers at once: every peer keeps the same
patient, study and series rows (the catalog's last-writer-wins rule, ``catalog.facts``).

Two real twistd peers, R=1, W=1; PATIENTS patients each sent as version 1 (PatientName
RACE^V1) to peera and as version 2 (RACE^V2) to peerb, the two DCMTK storescu runs at the
same time. Once both peers hold every instance, their C-FIND answers (DCMTK findscu)
name the same version of every patient and their catalog digests are equal. Before:
each peer kept the version it applied last (the review found 1 of 8 patients answered
RACE^V1 at peera and RACE^V2 at peerb for ever, digests unequal).
"""
from __future__ import annotations

import threading

import pytest

from pacsp2p.testing import datasets as D
from pacsp2p.testing import findscu, storescu
from pacsp2p.testing.cluster import digest, wait_until

PATIENTS = 48


@pytest.fixture(scope="module")
def pair(make_cluster):
    return make_cluster(2, config={"cluster": {"replicas": 1, "write_quorum": 1}})


def write_versions(root, version: int):
    """One instance per patient, of *version*: same Patient ID and study, own series."""
    for p in range(PATIENTS):
        D.write(D.make_image("CT", size=8, seed=p, PatientName=f"RACE^V{version}",
                             PatientID=f"RACE{p}", PatientSex="MF"[version - 1],
                             StudyDescription=f"version {version}",
                             StudyInstanceUID=D.uid("race", p),
                             SeriesInstanceUID=D.uid("race-se", p, version),
                             SOPInstanceUID=D.uid("race-sop", p, version)),
                root / f"{p}.dcm")
    return root


def patients(peer) -> dict[str, tuple[str, str, str]]:
    """{PatientID: (PatientName, PatientSex, instances)} of the RACE patients."""
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": "RACE*", "PatientName": "",
        "PatientSex": "", "NumberOfPatientRelatedInstances": ""}, model="P", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.PatientID): (str(r.PatientName), str(r.PatientSex),
                               str(r.NumberOfPatientRelatedInstances)) for r in rows}


def studies(peer) -> dict[str, str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "PatientID": "RACE*", "StudyInstanceUID": "",
        "StudyDescription": ""}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.StudyInstanceUID): str(r.StudyDescription) for r in rows}


def test_two_versions_sent_at_once_to_two_peers_end_the_same_everywhere(pair, tmp_path):
    a, b = pair[0], pair[1]
    v1 = write_versions((tmp_path / "v1").mkdir() or tmp_path / "v1", 1)
    v2 = write_versions((tmp_path / "v2").mkdir() or tmp_path / "v2", 2)
    done = []
    runs = [threading.Thread(target=lambda p=p, d=d: done.append(storescu(p.port, p.ae_title,
                                                                          [d])))
            for p, d in ((a, v1), (b, v2))]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert len(done) == 2 and all(r.returncode == 0 for r in done)

    def all_held():
        return all(len(ps) == PATIENTS and all(n == "2" for _, _, n in ps.values())
                   for ps in (patients(a), patients(b)))
    wait_until(all_held, 120, interval=1, what="both peers hold every instance")
    # rows and digests agree (a pull still under way may take a moment: polled)
    wait_until(lambda: digest(a) == digest(b), 60, interval=1, what="digests equal")
    at_a, at_b = patients(a), patients(b)
    assert at_a == at_b
    for name, sex, _ in at_a.values():          # one version's attributes, not a mix
        assert (name, sex) in (("RACE^V1", "M"), ("RACE^V2", "F"))
    assert studies(a) == studies(b)
    assert len(studies(a)) == PATIENTS
