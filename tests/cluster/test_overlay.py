"""The overlay with real peers: three `twistd pacsp2p` processes joined by mutual-TLS AMP.

One three-peer cluster (module scope; peera, peerb, peerc) with a cluster CA made here,
DCMTK clients, and a storescp as C-MOVE destination. Tests run in file order; the ones
that crash, freeze or refuse peers leave the cluster meshed again for the next.

Figures measured here (time to find at peerc, time to mark a peer dead, ...) are
printed (pytest -s) and collected in FIGURES.
"""
from __future__ import annotations

import datetime
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from pacsp2p.overlay import tls
from pacsp2p.testing import LOOPBACK, StoreSCP, dcmtk, echo, findscu, storescu
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.peer import twistd_path

from pacsp2p.testing.cluster import Cluster, digest, get_json, members, wait_until

PATIENT_ID, PATIENT_NAME = "OVL0001", "OVERLAY^PATIENT"
# study 1 at peera: CT (explicit), CT (RLE Lossless), MR (explicit)
SERIES_1 = (("CT", 3, ExplicitVRLittleEndian), ("CT", 2, RLELossless),
            ("MR", 2, ExplicitVRLittleEndian))
# study 2 at peerb, same patient: MR + US
SERIES_2 = (("MR", 2, ExplicitVRLittleEndian), ("US", 1, ExplicitVRLittleEndian))
FIGURES: dict[str, float] = {}


def figure(name: str, seconds: float) -> float:
    FIGURES[name] = round(seconds, 3)
    print(f"\nFIGURE {name}: {seconds:.3f} s")
    return seconds


def study_uid(paths) -> str:
    return str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def values(value) -> list[str]:
    """A multi-valued element's values, sorted (a single value as a list of one)."""
    return sorted(map(str, value)) if isinstance(value, MultiValue) else [str(value)]


def store(peer, paths) -> None:
    """storescu -R -xr (each file in its own syntax, RLE too); every response Success."""
    proc = storescu(peer.port, peer.ae_title, paths, extra=["-v"])
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == len(paths), out[-3000:]


def find_study(peer, uid: str, **keys):
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": uid, **keys}, timeout=20)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return rows


def time_until_found(peer, uid: str, timeout: float = 10.0) -> float:
    return wait_until(lambda: len(find_study(peer, uid)) == 1, timeout, interval=0.02,
                      what=f"study {uid} findable at {peer.name}")


def write_study(directory: Path, seed: int, series, n_patient_id: str = PATIENT_ID):
    return datasets.make_study(directory, patient_name=PATIENT_NAME, patient_id=n_patient_id,
                               series=series, size=64, seed=seed,
                               StudyDescription=f"OVERLAY STUDY {seed}")


def states_of(peer, name: str) -> str | None:
    return members(peer).get(name)


# -- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    """storescp writing exactly the bytes it receives (+B): the C-MOVE destination."""
    with StoreSCP(tmp_path_factory.mktemp("ovl-scp") / "received", extra=["+B"]) as s:
        yield s


@pytest.fixture(scope="module")
def the_cluster(make_cluster, scp) -> Cluster:
    return make_cluster(3, destinations={"STORESCP": scp.address})


@pytest.fixture
def cluster(the_cluster) -> Cluster:
    """The module's cluster, every peer running and seeing the others alive."""
    for peer in the_cluster:
        if not peer.alive:
            peer.restart()
    the_cluster.wait_mesh(timeout=20)
    return the_cluster


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("ovl-studies")
    return {1: write_study(root / "s1", 1, SERIES_1), 2: write_study(root / "s2", 2, SERIES_2),
            3: write_study(root / "s3", 3, (("CT", 2, ExplicitVRLittleEndian),)),
            4: write_study(root / "s4", 4, (("MR", 2, ExplicitVRLittleEndian),),
                           n_patient_id="OVL0004")}


@pytest.fixture(scope="module")
def spread(the_cluster, studies):
    """Study 1 stored at peera, then study 2 (same patient) at peerb; times to find."""
    a, b, c = the_cluster.peers
    the_cluster.wait_mesh()
    store(a, studies[1])
    times = {"1@c": time_until_found(c, study_uid(studies[1]))}
    store(b, studies[2])
    times["2@c"] = time_until_found(c, study_uid(studies[2]))
    times["2@a"] = time_until_found(a, study_uid(studies[2]))
    return times


# -- 1. find across the cluster -----------------------------------------------------

def test_study_stored_at_a_is_found_at_c_within_2s(cluster, spread, studies):
    figure("study stored at peera findable at peerc", spread["1@c"])
    figure("study stored at peerb findable at peerc", spread["2@c"])
    assert spread["1@c"] < 2.0
    assert spread["2@c"] < 2.0
    a, b, c = cluster.peers
    # the instances stayed on the archive they were stored at
    assert dn.dataset_hashes(dn.archive_files(a.data_dir)) == dn.dataset_hashes(studies[1])
    assert dn.dataset_hashes(dn.archive_files(b.data_dir)) == dn.dataset_hashes(studies[2])
    assert dn.archive_files(c.data_dir) == []


@pytest.mark.parametrize("at", [0, 1, 2], ids=["peera", "peerb", "peerc"])
def test_counts_over_studies_spread_across_peers(cluster, spread, studies, at):
    peer = cluster[at]
    uid1, uid2 = study_uid(studies[1]), study_uid(studies[2])
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "PATIENT", "PatientID": PATIENT_ID, "PatientName": "",
        "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
        "NumberOfPatientRelatedInstances": ""}, model="P")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(rows) == 1, rows
    assert str(rows[0].PatientName) == PATIENT_NAME
    assert int(rows[0].NumberOfPatientRelatedStudies) == 2
    assert int(rows[0].NumberOfPatientRelatedSeries) == len(SERIES_1) + len(SERIES_2)
    assert int(rows[0].NumberOfPatientRelatedInstances) == len(studies[1]) + len(studies[2])

    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "PatientID": PATIENT_ID, "StudyInstanceUID": "",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {r.StudyInstanceUID: (values(r.ModalitiesInStudy), int(r.NumberOfStudyRelatedSeries),
                                int(r.NumberOfStudyRelatedInstances)) for r in rows}
    assert got == {uid1: (["CT", "MR"], 3, 7), uid2: (["MR", "US"], 2, 3)}

    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": uid1, "SeriesInstanceUID": "",
        "SeriesNumber": "", "Modality": "", "NumberOfSeriesRelatedInstances": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {int(r.SeriesNumber): (r.Modality, int(r.NumberOfSeriesRelatedInstances))
           for r in rows}
    assert got == {n: (m, k) for n, (m, k, _ts) in enumerate(SERIES_1, start=1)}


# -- 2. retrieve at a peer that holds nothing ------------------------------------------

def test_move_at_c_relays_every_instance_byte_identical(cluster, spread, studies, scp):
    a, b, c = cluster.peers
    for f in scp.files():
        f.unlink()
    proc = dn.movescu(c.port, c.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "PATIENT", "PatientID": PATIENT_ID}, model="P")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Received Final Move Response (Success)" in out, out[-3000:]
    sent = {**dn.dataset_hashes(studies[1]), **dn.dataset_hashes(studies[2])}
    assert dn.dataset_hashes(scp.files()) == sent
    # peerc relayed them: it still holds nothing itself, the holders still hold theirs
    assert dn.archive_files(c.data_dir) == []
    assert len(dn.archive_files(a.data_dir)) == len(studies[1])
    assert len(dn.archive_files(b.data_dir)) == len(studies[2])
