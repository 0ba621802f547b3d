"""No input ever becomes a path in the embedded archive (issue 11).

Real archive, real files: hostile SOP Instance UIDs are refused at every entry (store,
store_unsynced, keep, sync, open, discard) and no file appears anywhere; paths are made
of hex digits only and checked to resolve inside ``objects/`` (a symlink planted there
is refused); an archive of the older UID-named layout is renamed into the hashed one at
start and by the rebuild's crawl; the example folder adapter refuses them too.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest

from pacsp2p.adapters import layout
from pacsp2p.adapters.embedded import EmbeddedArchive
from pacsp2p.dicom.header import content_hash, read_meta
from pacsp2p.testing import datasets
from pacsp2p.types import InstanceMeta, Stored
from pacsp2p.validate import InvalidUID

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "folder_archive.py"
HEX_NAME = re.compile(r"[0-9a-f]{64}(\.[0-9a-f]{16})?\.dcm\Z")


def hostile(tmp: Path) -> list[str]:
    return [f"{tmp}/escape/x", "../../x", "1.2.3/../../x", "1." + "2" * 63, "1.02.3",
            "1.2.\u00e93", "", "1.2.3\x00", "1.2.3 ", "..", "."]


def archive(root: Path, fsync: bool = False) -> EmbeddedArchive:
    a = EmbeddedArchive("local", root, reactor=None, fsync=fsync)
    a._prepare()
    return a


def failure_of(d) -> BaseException:
    """The exception a Deferred failed with at once (the entry checks need no reactor)."""
    caught = []
    d.addErrback(lambda f: caught.append(f.value))
    assert caught, "expected an immediate failure"
    return caught[0]


def walk(a: EmbeddedArchive):
    """Every copy held, as ``catalog rebuild`` lists them (``walk``; ``crawl`` before)."""
    return list((getattr(a, "walk", None) or a.crawl)())


def every_file(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()}


def test_paths_are_hex_under_objects(tmp_path):
    a = archive(tmp_path / "a")
    uid = "1.2.840.10008.1.2.3.4"
    k = hashlib.sha256(uid.encode()).hexdigest()
    assert a.path_for(uid) == a.objects / k[:2] / f"{k}.dcm"
    assert a.path_for(uid, "ab" * 32) == a.objects / k[:2] / f"{k}.{'ab' * 8}.dcm"
    with pytest.raises(ValueError):
        a.path_for(uid, "../../etc/passwd")


@pytest.mark.parametrize("index", range(11))
def test_hostile_uids_are_refused_at_every_entry(tmp_path, index):
    a = archive(tmp_path / "a")
    bad = hostile(tmp_path)[index]
    src = datasets.write(datasets.make_image("CT", size=8), tmp_path / "in" / "x.dcm")
    meta = InstanceMeta(bad, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    before = every_file(tmp_path)
    with pytest.raises(InvalidUID):
        a.path_for(bad)
    for d in (a.store(src, meta), a.store_unsynced(src, meta),
              a.open(bad), a.open(bad, "ab" * 32), a.discard(bad, "ab" * 32)):
        assert isinstance(failure_of(d), InvalidUID)
    a.fsync = True
    assert isinstance(failure_of(a.sync(bad, Stored("local", "ab" * 32, 1))), InvalidUID)
    with pytest.raises(InvalidUID):
        a.keep(src, meta)
    assert every_file(tmp_path) == before
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "x.dcm").exists() and not (tmp_path / "a" / "x.dcm").exists()


def test_a_symlink_planted_in_objects_is_not_followed_out(tmp_path):
    a = archive(tmp_path / "a")
    uid = "1.2.3.4.5"
    k = layout.key(uid)
    outside = tmp_path / "outside"
    outside.mkdir()
    (a.objects / k[:2]).rmdir()                    # made empty at start: planted over
    (a.objects / k[:2]).symlink_to(outside, target_is_directory=True)
    src = datasets.write(datasets.make_image("CT", size=8, SOPInstanceUID=uid),
                         tmp_path / "in" / "x.dcm")
    with pytest.raises(layout.OutsideRoot) as e:
        a.keep(src, read_meta(src))
    assert str(outside) not in str(e.value)        # the message names no path
    assert list(outside.iterdir()) == []


def test_a_file_that_is_a_symlink_is_not_followed(tmp_path):
    a = archive(tmp_path / "a")
    uid = "1.2.3.4.6"
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"not yours")
    rel = layout.relative(uid)
    (a.objects / rel).parent.mkdir(exist_ok=True)
    (a.objects / rel).symlink_to(secret)
    with pytest.raises(layout.OutsideRoot):
        a.path_for(uid)
    with pytest.raises(layout.OutsideRoot):
        layout.Contained(a.objects)("../secret.dcm")


def test_keeping_over_a_file_that_is_a_symlink_neither_follows_nor_reads_it(tmp_path):
    """The copy is linked into place without looking at the file there first (a link
    never goes through a symlink); only then, to compare, is the path checked."""
    a = archive(tmp_path / "a")
    secret = tmp_path / "secret.dcm"
    secret.write_bytes(b"not yours")
    src = datasets.write(datasets.make_image("CT", size=8, SOPInstanceUID="1.2.3.4.7"),
                         tmp_path / "in" / "x.dcm")
    (a.objects / layout.relative("1.2.3.4.7")).symlink_to(secret)
    with pytest.raises(layout.OutsideRoot):
        a.keep(src, read_meta(src))
    assert secret.read_bytes() == b"not yours"


def test_a_symlinked_root_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    a = archive(tmp_path / "link")
    src = datasets.write(datasets.make_image("CT", size=8), tmp_path / "in" / "x.dcm")
    meta = read_meta(src)
    stored = a.keep(src, meta)
    assert not stored.conflict
    assert (real / "objects" / a.path_for(meta.sop_instance_uid).relative_to(a.objects)).exists()


def old_layout(objects: Path, path: Path, name: str | None = None) -> Path:
    """Put *path* where the older layout kept it (``<2 hex of sha1(uid)>/<uid>.dcm``)."""
    uid = read_meta(path).sop_instance_uid
    target = objects / hashlib.sha1(uid.encode()).hexdigest()[:2] / (name or f"{uid}.dcm")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def test_an_archive_of_the_old_layout_is_renamed_once(tmp_path):
    root = tmp_path / "a"
    objects = root / "objects"
    made = [datasets.write(datasets.make_image("CT", size=8, seed=i,
                                               SOPInstanceUID=datasets.uid("mig", i)),
                           tmp_path / "src" / f"{i}.dcm") for i in range(5)]
    other = datasets.write(datasets.make_image("CT", size=8, seed=99,
                                               SOPInstanceUID=datasets.uid("mig", 0)),
                           tmp_path / "src" / "other.dcm")
    bad = datasets.write(datasets.make_image("CT", size=8, SOPInstanceUID="1.02.3"),
                         tmp_path / "src" / "bad.dcm")
    for path in made:
        old_layout(objects, path)
    uid0 = read_meta(made[0]).sop_instance_uid
    other_sha = content_hash(other)[0]
    old_layout(objects, other, f"{uid0}.{other_sha[:16]}.dcm")     # a conflicting version
    old_layout(objects, bad)
    (objects / "00").mkdir(exist_ok=True)
    (objects / "00" / "1.2.3.dcm").write_bytes(b"not DICOM")       # unreadable

    a = archive(root, fsync=True)
    assert (objects / layout.MARKER).read_text() == layout.VERSION
    files = sorted(p for p in objects.glob("*/*.dcm"))
    assert all(HEX_NAME.match(p.name) and layout.is_current(p) for p in files), files
    assert len(files) == 6
    for path in made:
        meta = read_meta(path)
        assert a.path_for(meta.sop_instance_uid).read_bytes() == path.read_bytes()
    assert a.path_for(uid0, other_sha).read_bytes() == other.read_bytes()
    assert len(list((root / "invalid").iterdir())) == 2         # the bad UID, not DICOM
    crawled = {(m.sop_instance_uid, s.conflict) for m, s in walk(a)}
    assert crawled == {(read_meta(p).sop_instance_uid, False) for p in made} | {(uid0, True)}
    # once: a file of the old layout appearing later is not renamed again
    late = old_layout(objects, datasets.write(
        datasets.make_image("CT", size=8, SOPInstanceUID=datasets.uid("late")),
        tmp_path / "src" / "late.dcm"))
    archive(root)
    assert late.exists()


def test_the_rebuild_crawl_renames_an_old_archive_first(tmp_path):
    root = tmp_path / "a"
    src = datasets.write(datasets.make_image("CT", size=8), tmp_path / "src" / "x.dcm")
    old_layout(root / "objects", src)
    a = EmbeddedArchive("local", root, reactor=None, fsync=False)   # as `catalog rebuild`
    [(meta, stored)] = walk(a)
    assert not stored.conflict and a.path_for(meta.sop_instance_uid).exists()


def test_a_half_done_migration_finishes(tmp_path):
    """A crash between linking the new name and unlinking the old leaves both: the
    next start drops the old one."""
    root = tmp_path / "a"
    src = datasets.write(datasets.make_image("CT", size=8), tmp_path / "src" / "x.dcm")
    old = old_layout(root / "objects", src)
    new = EmbeddedArchive("local", root, None).path_for(read_meta(src).sop_instance_uid)
    new.parent.mkdir(parents=True, exist_ok=True)
    os.link(old, new)
    a = archive(root)
    assert not old.exists() and new.exists()
    assert [s.conflict for _, s in walk(a)] == [False]


def load_folder_archive():
    spec = importlib.util.spec_from_file_location(f"folder_{uuid.uuid4().hex}", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FolderArchive


@pytest.mark.parametrize("index", range(11))
def test_the_folder_adapter_refuses_hostile_uids(tmp_path, index):
    folder = tmp_path / "folder"
    folder.mkdir()
    a = load_folder_archive()("f", folder, reactor=None)
    bad = hostile(tmp_path)[index]
    assert isinstance(failure_of(a.open(bad)), InvalidUID)


def test_the_folder_adapter_skips_invalid_uids_and_files_outside(tmp_path):
    folder = tmp_path / "folder"
    good = datasets.write(datasets.make_image("CT", size=8), folder / "good.dcm")
    datasets.write(datasets.make_image("CT", size=8, SOPInstanceUID="1.02.3"),
                   folder / "bad.dcm")
    outside = datasets.write(datasets.make_image("CT", size=8, SOPInstanceUID="1.2.3.9"),
                             tmp_path / "outside.dcm")
    (folder / "link.dcm").symlink_to(outside)
    a = load_folder_archive()("f", folder, reactor=None)
    items = a._read_page(a._list())
    uids = {m.sop_instance_uid for m, _ in items}
    assert read_meta(good).sop_instance_uid in uids and "1.02.3" not in uids
    with a._open(read_meta(good).sop_instance_uid) as f:
        assert f.read() == good.read_bytes()
    with pytest.raises(PermissionError):
        a._open("1.2.3.9")                      # a symlink out of the folder
    with pytest.raises(KeyError):
        a._open("1.2.3.4.5.6")
