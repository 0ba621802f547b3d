"""The example adapter (plugins/folder_archive.py), loaded from its file by a real peer.

A directory of Part-10 files (two series, two transfer syntaxes, nested folders, one
stray non-DICOM file) is the peer's only archive, named in the config as
``adapter = "<relative path>/folder_archive.py:FolderArchive"``. The peer crawls it;
findscu at the peer finds every instance; movescu brings them back byte-identical (data
set sha256); after ``pacsp2p catalog rebuild`` the folder is crawled again. A bad
adapter path, or a directory that is not there, stops the peer at start-up with one
line naming the archive.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsp2p.testing import Peer, StoreSCP, findscu, free_port
from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, patience, wait_until
from pacsp2p.testing.peer import twistd_path

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "folder_archive.py"


def test_folder_archive_crawled_found_and_moved(tmp_path):
    folder = tmp_path / "folder"
    files = datasets.make_study(folder / "a", patient_id="FOLDER01", seed=3, size=32,
                                series=(("CT", 3, ExplicitVRLittleEndian),
                                        ("MR", 2, ImplicitVRLittleEndian)))
    files += datasets.make_study(folder / "b" / "deeper", patient_id="FOLDER02", seed=4,
                                 size=16)
    (folder / "README.txt").write_text("not DICOM\n")
    want = dn.dataset_hashes(files)
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    adapter = f"{os.path.relpath(PLUGIN, peer_dir)}:FolderArchive"   # relative to config
    assert not Path(adapter).is_absolute()
    with StoreSCP(tmp_path / "out", ae_title="STORESCP") as scp:
        with Peer(peer_dir, destinations={"STORESCP": scp.address}, config={
                "archives": [{"name": "exports", "adapter": adapter, "path": str(folder),
                              "page": 3}]}) as peer:
            wait_until(lambda: get_json(peer)["crawls"][0]["finished"], 60,
                       what="crawl finished")
            crawl = get_json(peer)["crawls"][0]
            assert crawl["done"] == len(files), crawl
            assert crawl["error"] is None
            assert get_json(peer)["archives"]["exports"]["up"] is True
            rows, proc = findscu(peer.port, peer.ae_title, {
                "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "", "SOPInstanceUID": "",
                "PatientID": ""})
            assert proc.returncode == 0, proc.stderr
            assert sorted(str(r.SOPInstanceUID) for r in rows) == sorted(want)
            for patient in ("FOLDER01", "FOLDER02"):
                proc = dn.movescu(peer.port, peer.ae_title, "STORESCP", {
                    "QueryRetrieveLevel": "PATIENT", "PatientID": patient})
                assert proc.returncode == 0, proc.stdout + proc.stderr
            assert dn.dataset_hashes(scp.files()) == want
            # the folder itself is untouched: the peer kept no copy of its own
            assert dn.dataset_hashes(files) == want
            assert not list((peer.data_dir).glob("archives/*/objects/*/*.dcm"))
            # a rebuilt catalog (peer stopped) leaves the folder to be crawled again
            peer.stop()
            proc = subprocess.run([str(twistd_path().parent / "pacsp2p"), "--config",
                                   str(peer.config_path), "catalog", "rebuild"],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert "archive exports: crawled again when the peer starts" in proc.stderr
            peer.restart()
            wait_until(lambda: get_json(peer)["crawls"][0]["finished"], 60,
                       what="crawl after rebuild")
            rows, _ = findscu(peer.port, peer.ae_title, {
                "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "", "SOPInstanceUID": ""})
            assert sorted(str(r.SOPInstanceUID) for r in rows) == sorted(want)


def _refused(tmp_path: Path, block: str) -> list[str]:
    cfg = tmp_path / "peer.toml"
    cfg.write_text(f'[peer]\nname = "bad"\ndata_dir = "{tmp_path / "data"}"\n'
                   f'[facade]\nbind = "127.0.0.1"\nport = {free_port()}\n'
                   f'[admin]\nport = {free_port()}\n'
                   f'[[archives]]\nname = "north-pacs"\n{block}\n')
    t0 = time.monotonic()
    proc = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=patience(30),
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < patience(30)     # refused, not hung (a busy machine
                                                    # takes long to start Python)
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("block, says", [
    ('adapter = "plugins/no_such_file.py:FolderArchive"\npath = "/tmp"', "no file"),
    (f'adapter = "{PLUGIN}:NoSuchClass"\npath = "/tmp"', "defines no 'NoSuchClass'"),
    (f'adapter = "{PLUGIN}:FolderArchive"\npath = "/tmp"\ncolour = "red"',
     "archives[0].colour: unknown key"),
    (f'adapter = "{PLUGIN}:FolderArchive"\npath = "/nonexistent/exports"',
     "is not a directory"),
], ids=["missing-file", "missing-class", "unknown-key", "missing-directory"])
def test_bad_folder_archive_stops_the_peer_naming_it(tmp_path, block, says):
    lines = _refused(tmp_path, block)
    assert len(lines) == 1, lines
    assert "north-pacs" in lines[0] or "archives[0]." in says, lines[0]
    assert says in lines[0], lines[0]
