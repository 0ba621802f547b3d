"""Upgrades with real older releases (docs/upgrading.md): peers of an older commit of this
repository's history (``pacsp2p.testing.release``: its tree from ``git archive``, run by
twistd beside peers of this tree).

- a rolling upgrade within overlay protocol 5: a peer of this release pushes a C-STORE's
  copies to a peer of 4921334 (protocol 5 before ReplicaOpen carried data and a box
  carried more1..more3): the old peer must get every byte (before: it dropped all but
  ReplicaData's *data*, the copy hashed otherwise, the C-STORE failed);
- peers of two overlay protocols (3 and 5) refuse each other's links with one clear line
  on each side per 5 minutes, naming both protocols from its own side (before: the line
  of the other side, "this peer speaks 3" in the log of a peer of 5, every 2 s);
- rows that two peers of 4921334 held in two versions agree once both run this release
  (``catalog.rows.reannounce``; before: apart for ever).
"""
from __future__ import annotations

import threading
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p import __version__
from pacsp2p.testing import dataset_sha256, datasets, findscu, storescu
from pacsp2p.testing.cluster import digest, get_json, wait_until
from pacsp2p.testing.dcmtk import get_study_hashes
from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.release import release

PROTOCOL_5_BEFORE_VALUES = "4921334a36153e3540f372cd4b214c0a6ea651d7"
PROTOCOL_3 = "f4c5aaf9ecc0d411cb193ff66b4a483a75a3ddd0"  # the first milestone's last commit (2026-11-25)


def _release(commit: str, tmp_path_factory) -> Path:
    return release(commit, tmp_path_factory.mktemp(f"release-{commit[:7]}"))


def test_copies_pushed_to_a_peer_of_an_older_protocol_5_are_whole(cluster, tmp_path,
                                                                   tmp_path_factory):
    old = _release(PROTOCOL_5_BEFORE_VALUES, tmp_path_factory)
    new = cluster.add("peera")
    older = cluster.add("peerb", twistd=old)
    cluster.wait_mesh()
    files = datasets.make_study(tmp_path / "in", patient_id="ROLL1",
                                series=(("CT", 2, ExplicitVRLittleEndian),
                                        ("MR", 2, ExplicitVRLittleEndian)))
    sent = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_sha256(f)
            for f in files}
    study = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert any(f.stat().st_size > 4 * 65000 for f in files)     # CT: more than one box
    proc = storescu(new.port, new.ae_title, files, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]            # R=2: both peers hold one

    def both_hold():
        rows = get_json(new, f"where?study={study}")
        return len(rows) == len(files) and all(
            {x["peer"] for x in r["replicas"]} == {"peera", "peerb"} for r in rows)

    wait_until(both_hold, 60, interval=0.5, what="every instance on peera and peerb")
    new.stop()                                   # the old peer serves from its own copies
    assert get_study_hashes(older.port, older.ae_title, study, tmp_path / "got") == sent


def test_two_overlay_protocols_refuse_each_other_with_one_line_each(cluster,
                                                                     tmp_path_factory):
    old = _release(PROTOCOL_3, tmp_path_factory)
    new = cluster.add("peera")
    older = cluster.add("peerb", twistd=old)                  # seeds on peera
    # the old peer redials its seed every 2 s and logs each refusal: wait for 10 of them
    wait_until(lambda: older.log_path.read_text().count("speaks overlay protocol") >= 10,
               120, interval=1, what="the old peer refused 10 times")
    lines = [line for line in new.log_path.read_text().splitlines()
             if "overlay protocol" in line]
    assert len(lines) == 1, lines[:5]
    assert (f"peer peerb (pacsp2p 0.1.0) speaks overlay protocol 3, peer peera (pacsp2p "
            f"{__version__}) speaks 5" in lines[0] and "docs/upgrading.md" in lines[0]), lines[0]
    assert {m["name"] for m in get_json(new)["overlay"]["members"]} == {"peera"}


PATIENTS = 32          # per round of the race (test_lww_race: 48 left rows apart 3 of 3)


def _versions(root: Path, v: int, first: int) -> Path:
    """Instance x<v> of patients ROLL<first>.., one study each, series of its own:
    PatientName ROW^V<v>, StudyDescription "study v<v>"."""
    for p in range(first, first + PATIENTS):
        datasets.write(datasets.make_image(
            "CT", size=8, seed=v, PatientName=f"ROW^V{v}", PatientID=f"ROLL{p}",
            StudyDescription=f"study v{v}", StudyInstanceUID=datasets.uid("rollrow", p),
            SeriesInstanceUID=datasets.uid("rollrow-se", p, v),
            SOPInstanceUID=datasets.uid("rollrow-sop", p, v)), root / f"{p}" / f"x{v}.dcm")
    return root


def _rows(peer) -> dict[str, tuple[str, str, str]]:
    """{PatientID: (PatientName, StudyDescription, instances)} of the ROLL studies."""
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "STUDY", "PatientID": "ROLL*", "PatientName": "",
        "StudyDescription": "", "NumberOfStudyRelatedInstances": ""}, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.PatientID): (str(r.PatientName), str(r.StudyDescription),
                               str(r.NumberOfStudyRelatedInstances)) for r in rows}


def test_rows_that_differed_before_the_stamps_agree_once_upgraded(cluster, tmp_path,
                                                                  tmp_path_factory):
    """Two peers of 4921334 (schema 4: a row kept the version applied last) are sent two
    versions of each patient and study at once (storescu to each), in rounds until they
    answer some patient differently. Both are then upgraded to this release, one after
    the other: at its first start each numbers its own facts of stamp-less series again
    (``catalog.rows.reannounce``), and both answer the same rows, digests equal. Before
    (docs/upgrading.md, "Known limit"): the rows stayed apart for ever."""
    old = _release(PROTOCOL_5_BEFORE_VALUES, tmp_path_factory)
    one = {"cluster": {"replicas": 1, "write_quorum": 1}}
    a = cluster.add("peera", twistd=old, config=one)
    b = cluster.add("peerb", twistd=old, config=one)
    cluster.wait_mesh()
    apart, held = [], 0
    for round_ in range(4):
        first = round_ * PATIENTS
        sent = [_versions(tmp_path / f"v{v}-{round_}", v, first) for v in (1, 2)]
        done = []
        runs = [threading.Thread(target=lambda p=p, d=d: done.append(
            storescu(p.port, p.ae_title, [d]))) for p, d in ((a, sent[0]), (b, sent[1]))]
        for t in runs:
            t.start()
        for t in runs:
            t.join()
        assert len(done) == 2 and all(r.returncode == 0 for r in done)
        held += PATIENTS
        wait_until(lambda: all(len(r) == held and all(n == "2" for *_, n in r.values())
                               for r in (_rows(a), _rows(b))), 120, interval=1,
                   what="both old peers hold every instance")
        at_a, at_b = _rows(a), _rows(b)
        apart = [p for p in at_a if at_a[p] != at_b[p]]
        if apart:
            break
    assert apart, "the old release never left two rows apart in 4 rounds"
    for peer in (a, b):                          # one peer at a time, as docs/upgrading.md
        peer.stop()
        peer.twistd = twistd_path()
        peer.restart()
        cluster.wait_mesh(timeout=120)
    wait_until(lambda: digest(a) == digest(b), 120, interval=1, what="equal digests")
    assert _rows(a) == _rows(b)
    assert len(_rows(a)) == held and {(name, n) for name, _, n in _rows(a).values()} <= {
        ("ROW^V1", "2"), ("ROW^V2", "2")}          # one version's name (the first one
    # upgraded may have passed its rows to the old peer, which took them as it applies)
