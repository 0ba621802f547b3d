"""The embedded archive's blocking 'keep' path (the ingest's one-job path): files land
whole and durable, duplicates and conflicts are told apart, odd cases fail cleanly.

Runs the real archive on real files; ``os.fsync`` is only watched (a spy that calls the
real one), so the test can tell which files were made durable.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pacsp2p.adapters import embedded
from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.dicom.header import read_meta
from pacsp2p.testing import datasets

SHM = Path("/dev/shm")


class Fsynced(list):
    """Paths of the files fsynced meanwhile (``inodes``: their inode numbers)."""

    def __init__(self):
        super().__init__()
        self.inodes: set[int] = set()


@pytest.fixture
def fsynced(monkeypatch):
    seen = Fsynced()
    real = os.fsync

    def spy(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        seen.inodes.add(os.fstat(fd).st_ino)
        return real(fd)
    monkeypatch.setattr(embedded.os, "fsync", spy)
    return seen


def archive(root: Path) -> EmbeddedArchive:
    a = EmbeddedArchive("local", root, reactor=None)
    a._prepare()
    return a


def received(tmp_path: Path, name: str, seed: int = 1, **kw) -> Path:
    ds = datasets.make_image("CT", size=16, seed=seed,
                             SOPInstanceUID=datasets.uid("keep", name), **kw)
    return datasets.write(ds, tmp_path / "incoming" / f"{name}-{seed}.dcm")


def keep(a: EmbeddedArchive, path: Path):
    meta = read_meta(path)
    wait = a.begin_flush(path)
    stored = a.keep(path, meta)
    a.made_durable(meta, stored, wait)
    return meta, stored


def test_keep_links_the_received_file_into_place(tmp_path, fsynced):
    a = archive(tmp_path / "archive")
    path = received(tmp_path, "one")
    body = path.read_bytes()
    meta, stored = keep(a, path)
    target = a.path_for(meta.sop_instance_uid)
    assert target.read_bytes() == body and not path.exists()
    assert not (stored.duplicate or stored.conflict)
    assert target.stat().st_ino in fsynced.inodes       # the same inode, fsynced
    assert list(a.tmp.iterdir()) == []


def test_keep_across_file_systems_copies_durably(tmp_path, fsynced):
    assert os.stat(SHM).st_dev != os.stat(tmp_path).st_dev, \
        "this test needs /dev/shm (tmpfs) on another file system than the temp dir"
    root = SHM / f"pacsp2p-test-{os.getpid()}"
    try:
        a = archive(root)
        path = received(tmp_path, "across")
        body = path.read_bytes()
        meta, _ = keep(a, path)
        target = a.path_for(meta.sop_instance_uid)
        assert target.read_bytes() == body
        copies = [p for p in fsynced if p.startswith(str(a.tmp))]
        assert copies, fsynced                            # the copy was fsynced in tmp/
        assert list(a.tmp.iterdir()) == []                # then linked into place
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_same_bytes_again_is_a_duplicate_and_is_made_durable(tmp_path, fsynced):
    a = archive(tmp_path / "archive")
    first = received(tmp_path, "dup")
    again = tmp_path / "again.dcm"
    again.write_bytes(first.read_bytes())
    meta, _ = keep(a, first)
    fsynced.clear()
    _, stored = keep(a, again)
    assert stored.duplicate
    assert str(a.path_for(meta.sop_instance_uid)) in fsynced   # another C-STORE's copy


def test_other_bytes_or_an_unreadable_copy_give_a_conflict_kept_beside(tmp_path, fsynced):
    a = archive(tmp_path / "archive")
    one = received(tmp_path, "conf", seed=1)
    other = received(tmp_path, "conf", seed=2)            # same UID, other pixels
    meta, _ = keep(a, one)
    _, stored = keep(a, other)
    assert stored.conflict and a.path_for(meta.sop_instance_uid, stored.sha256).exists()
    a.path_for(meta.sop_instance_uid).write_bytes(b"")     # a copy lost in a power cut
    third = received(tmp_path, "conf", seed=3)
    _, stored = keep(a, third)
    assert stored.conflict and a.path_for(meta.sop_instance_uid, stored.sha256).exists()


def test_a_received_file_that_vanished_fails_cleanly(tmp_path):
    a = archive(tmp_path / "archive")
    path = received(tmp_path, "gone")
    meta = read_meta(path)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        a.keep(path, meta)


def test_two_archives_on_one_file_system_do_not_share_a_copys_blocks(tmp_path):
    # a peer with two archives on one disk (R=2 without other peers): the second one
    # linked the same received file, so both "replicas" were one inode — a damaged
    # block, an editor writing in place, and both copies were gone
    a1, a2 = archive(tmp_path / "a1"), archive(tmp_path / "a2")
    path = received(tmp_path, "twice")
    meta = read_meta(path)
    s1 = a1._store(*a1._store_args(path, meta))
    s2 = a2._store(*a2._store_args(path, meta))
    f1, f2 = a1.path_for(meta.sop_instance_uid), a2.path_for(meta.sop_instance_uid)
    assert s1.sha256 == s2.sha256 and f1.read_bytes() == f2.read_bytes() == path.read_bytes()
    assert f1.stat().st_ino == path.stat().st_ino      # the first is still a free link
    assert f2.stat().st_ino != f1.stat().st_ino and f2.stat().st_nlink == 1
    assert not list((tmp_path / "a2").rglob("*.part"))  # no temporary file left


def test_with_sync_directories_a_nameless_file_is_fsynced_after_its_link(tmp_path, fsynced):
    """``[storage] sync_directories``: a file kept from a descriptor with no name (O_TMPFILE,
    ``unnamed``) whose own fsync ran before its ``linkat`` is fsynced again once named,
    then its directory — so its link count is on disk before Success, not only the name
    (before: only the directory; on ext4 without a journal the inode could still read 0
    links after a power cut)."""
    from pacsp2p import unnamed
    a = EmbeddedArchive("local", tmp_path / "archive", reactor=None, sync_directories=True)
    a._prepare()
    body = received(tmp_path, "nameless").read_bytes()
    fd = unnamed.make(a.tmp)
    assert fd is not None, "O_TMPFILE is not supported on this file system"
    try:
        os.write(fd, body)
        meta = read_meta(unnamed.source(fd))
        name = tmp_path / "incoming" / "spare.dcm"      # a spare's name, never made
        a.flusher(name, fd)()                            # its fsync, before the link
        fsynced.clear()
        stored = a.keep(name, meta, fd=fd)
        a.made_durable(meta, stored, lambda: None)
    finally:
        os.close(fd)
    target = a.path_for(meta.sop_instance_uid)
    assert target.read_bytes() == body
    assert fsynced == [str(target), str(target.parent)], fsynced
