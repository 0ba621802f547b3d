"""A peer marks its data directory and its embedded archive's ``objects/`` with ext4's
FS_TOPDIR_FL (``pacsp2p.spread``): their new subdirectories (``incoming``, the fan-out
directories) are spread over the file system's block groups, away from the crowded group
of a busy parent (``/tmp``), so a received instance's file is made where an inode is
cheap to find. Real peer (twistd), real storescu; the flag read back with the ioctl."""
from __future__ import annotations

import fcntl
import os
import struct

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p import spread
from pacsp2p.testing import datasets
from pacsp2p.testing.dcmtk import findscu
from pacsp2p.testing.dcmtk import storescu


def flags(path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, spread.FS_IOC_GETFLAGS,
                                              struct.pack("i", 0)))[0]
    finally:
        os.close(fd)


def test_mark_sets_the_flag_and_keeps_the_others(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    before = flags(d)
    assert not before & spread.FS_TOPDIR_FL
    assert spread.mark(d)
    assert flags(d) == before | spread.FS_TOPDIR_FL
    assert spread.mark(d)                           # again: no change, no error
    assert flags(d) == before | spread.FS_TOPDIR_FL


def test_mark_of_what_is_not_a_directory_is_refused_quietly(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert not spread.mark(f)
    assert not spread.mark(tmp_path / "missing")
    assert not spread.mark(link)                    # never through a symlink
    assert not flags(tmp_path) & spread.FS_TOPDIR_FL


def test_a_peer_spreads_its_data_directory_and_archive(make_peer, tmp_path):
    peer = make_peer()
    objects = peer.data_dir / "archives" / "local" / "objects"
    assert flags(peer.data_dir) & spread.FS_TOPDIR_FL
    assert flags(objects) & spread.FS_TOPDIR_FL
    files = datasets.make_study(tmp_path / "study", patient_id="SPREAD1", size=16,
                                series=[("MR", 5, ExplicitVRLittleEndian)])
    storescu(peer.port, peer.ae_title, [tmp_path / "study"])
    rows, _ = findscu(peer.port, peer.ae_title, {"QueryRetrieveLevel": "IMAGE",
                                                  "PatientID": "SPREAD1",
                                                  "StudyInstanceUID": dcmread(
                                                      files[0]).StudyInstanceUID,
                                                  "SeriesInstanceUID": dcmread(
                                                      files[0]).SeriesInstanceUID,
                                                  "SOPInstanceUID": ""})
    assert len(rows) == len(files) == 5
    assert sum(1 for _ in objects.rglob("*.dcm")) == 5
