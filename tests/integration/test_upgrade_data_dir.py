"""A data directory across releases (docs/upgrading.md), with real peers of this tree and
of an older commit of its history (``pacsp2p.testing.release``).

- upgrade: a data directory the first milestone wrote (f4c5aaf: catalog schema 1,
  archive files named after the UID) is opened by this release: the catalog migrated,
  the files renamed, every instance found and retrieved byte-identical;
- downgrade: a catalog of a newer schema, an embedded archive of a newer layout (what a
  newer release leaves behind) stop the peer with one line naming the file and the
  reason, and are left as they were (before: it started, set the schema number back
  and looked for the files where this layout puts them).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.catalog.schema import SCHEMA_VERSION
from pacsp2p.testing import Peer, dataset_sha256, datasets, findscu, storescu
from pacsp2p.testing.dcmtk import get_study_hashes
from pacsp2p.testing.release import release

FIRST_MILESTONE = "f4c5aaf9ecc0d411cb193ff66b4a483a75a3ddd0"


def _study(directory: Path) -> tuple[list[Path], str, dict]:
    files = datasets.make_study(directory, patient_id="UPG1",
                                series=(("CT", 2, ExplicitVRLittleEndian),
                                        ("MR", 3, ExplicitVRLittleEndian)))
    sent = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: dataset_sha256(f)
            for f in files}
    return files, dcmread(files[0], stop_before_pixels=True).StudyInstanceUID, sent


def _get(peer: Peer, study: str, out: Path) -> dict[str, str]:
    return get_study_hashes(peer.port, peer.ae_title, study, out)


def test_a_data_directory_of_the_first_milestone_is_upgraded(tmp_path):
    old = release(FIRST_MILESTONE, tmp_path / "release")
    files, study, sent = _study(tmp_path / "in")
    with Peer(tmp_path / "peer", twistd=old) as peer:
        storescu(peer.port, peer.ae_title, files)
    with Peer(tmp_path / "peer", port=peer.port) as peer:
        rows, _ = findscu(peer.port, peer.ae_title, {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study, "SOPInstanceUID": ""})
        assert sorted(r.SOPInstanceUID for r in rows) == sorted(sent)
        assert _get(peer, study, tmp_path / "got") == sent
        text = peer.log_path.read_text()
        assert "schema 1 -> " in text and "5 files renamed into the hashed layout" in text


def _refused(peer: Peer) -> list[str]:
    """Start *peer* expecting it to refuse; its 'cannot start' lines."""
    try:
        with pytest.raises(RuntimeError):
            peer.start()
    finally:
        peer.stop()                          # (by PID, if it started after all)
    text = peer.log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    return sorted({line for line in text.splitlines() if line.startswith("pacsp2p: ")})


@pytest.fixture
def stored(tmp_path):
    """A peer of this release that stored a study and stopped: (peer, study, sent)."""
    files, study, sent = _study(tmp_path / "in")
    with Peer(tmp_path / "peer") as peer:
        storescu(peer.port, peer.ae_title, files)
    return peer, study, sent


def test_a_catalog_of_a_newer_schema_is_refused_untouched(stored, tmp_path):
    peer, study, sent = stored
    catalog = peer.data_dir / "catalog.sqlite"
    with sqlite3.connect(catalog) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    lines = _refused(peer)
    assert len(lines) == 1 and str(catalog) in lines[0] and \
        "written by a newer pacsp2p release" in lines[0], lines
    with sqlite3.connect(catalog) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    with sqlite3.connect(catalog) as conn:                    # the newer release is back
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    with Peer(tmp_path / "peer", port=peer.port) as again:
        assert _get(again, study, tmp_path / "got") == sent


def test_an_archive_of_a_newer_layout_is_refused(stored):
    peer, _, _ = stored
    marker = peer.data_dir / "archives" / "local" / "objects" / "LAYOUT"
    assert marker.read_text() == "sha256-of-uid 1\n"
    marker.write_text("sha256-of-uid 2\n")
    lines = _refused(peer)
    assert len(lines) == 1 and str(marker) in lines[0] and \
        "written by a newer pacsp2p release" in lines[0], lines
    assert marker.read_text() == "sha256-of-uid 2\n"
