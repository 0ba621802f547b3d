"""Delete on a peer alone (no overlay; the embedded archive keeps files in the thread
that received them): ``pacsp2p delete --series`` and ``--instance``, and an IHE IOCM
rejection note sent by DCMTK storescu (its store session is the one-job kind here).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Peer, datasets, findscu, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.iocm import rejection_note


PACSP2P = Path(sys.executable).parent / "pacsp2p"


def images(peer: Peer, study: str) -> set[str]:
    rows, proc = findscu(peer.port, peer.ae_title, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": ""},
        timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {str(r.SOPInstanceUID) for r in rows}


def on_disk(peer: Peer) -> set[str]:
    return {dn.sop_uid(p) for p in dn.archive_files(peer.data_dir)}


def cli(peer: Peer, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(PACSP2P), "delete", "--config", str(peer.config_path), *args],
                          capture_output=True, text=True, timeout=600)


def test_delete_and_reject_on_a_peer_alone(tmp_path):
    files = datasets.make_study(tmp_path / "in", patient_id="ALONE01", size=16, series=[
        ("CT", 4, ExplicitVRLittleEndian), ("CT", 3, ExplicitVRLittleEndian),
        ("MR", 2, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    by_series = {}
    for p in files:
        by_series.setdefault(p.parent.name, []).append(p)
    first, second, third = (by_series[k] for k in sorted(by_series))
    uid = {p: dn.sop_uid(p) for p in files}
    with Peer(tmp_path / "peer") as peer:
        storescu(peer.port, peer.ae_title, files)
        assert len(images(peer, study)) == 9

        # a rejection note rejects the first series
        note = rejection_note(tmp_path / "kos" / "note.dcm", files, first,
                              code=("113039", "Data Retention Policy Expired"))
        done = storescu(peer.port, peer.ae_title, [note])
        assert done.returncode == 0, done.stderr[-2000:]
        left = {uid[p] for p in second + third} | {dn.sop_uid(note)}
        assert images(peer, study) == left
        wait_until(lambda: on_disk(peer) == left, 60, 0.5, "rejected files removed")

        # pacsp2p delete --series: the second series
        series2 = str(dcmread(second[0], stop_before_pixels=True).SeriesInstanceUID)
        done = cli(peer, "--series", series2)
        assert done.returncode == 0 and "deleted 3 instance(s) of series" in done.stdout
        left -= {uid[p] for p in second}
        assert images(peer, study) == left

        # --instance of one MR; an unknown instance: exit 1, said so
        done = cli(peer, "--instance", uid[third[0]])
        assert done.returncode == 0 and "deleted 1 instance(s)" in done.stdout
        left.discard(uid[third[0]])
        assert images(peer, study) == left
        done = cli(peer, "--instance", "1.2.3.4.5.6.7")
        assert done.returncode == 1 and "not in the catalog" in done.stdout
        done = cli(peer, "--study", "1.02.3")                # not a UID
        assert done.returncode != 0 and "HTTP 400" in done.stderr
        wait_until(lambda: on_disk(peer) == left, 60, 0.5, "deleted files removed")

        # sent again: stored again
        storescu(peer.port, peer.ae_title, first + second)
        assert images(peer, study) == left | {uid[p] for p in first + second}
        d = get_json(peer)["deletions"]
        assert d["rejection_notes"] == 1 and d["purge_pending"] == 0, d
