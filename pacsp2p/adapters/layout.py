"""Where the embedded archive keeps an instance: a name made from a hash, never from input.

An instance's file is ``objects/<k[:2]>/<k>.dcm`` where ``k`` is the hex SHA-256 of its
SOP Instance UID; a second version with other bytes (a conflict) sits beside it as
``<k>.<sha256 of its data set, 16 hex>.dcm``. Only hex digits ever reach a file name, and
every path is checked to resolve inside the archive's ``objects/`` directory before it
is used (defence in depth: the UID is validated by PS3.5 §9.1 first anyway).

Archives written before this layout named files after the UID itself
(``objects/<2 hex of sha1(uid)>/<uid>.dcm``). ``migrate`` renames such files into this
layout once (the file ``objects/LAYOUT`` records that it is done); a file whose data set
cannot be read, or whose UID is not a valid UID, is moved aside into ``invalid/``. A marker
naming another layout (a newer release's: a downgrade) stops the archive (``NewerLayout``).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import uuid
from pathlib import Path
from typing import Iterator

from pacsp2p.dicom.header import BadDataset, content_hash, read_meta
from pacsp2p.validate import check_uid, is_uid, shown

VERSION = "sha256-of-uid 1\n"
MARKER = "LAYOUT"
_NAME = re.compile(r"([0-9a-f]{64})(?:\.[0-9a-f]{16})?\.dcm\Z", re.ASCII)
_SHA = re.compile(r"[0-9a-f]{16,64}\Z", re.ASCII)


class NewerLayout(Exception):
    """``objects/LAYOUT`` names a layout this release does not know (a downgrade)."""


class OutsideRoot(ValueError):
    """A path that would resolve outside the archive's directory (never used)."""


def key(uid: str) -> str:
    """The hex SHA-256 of a valid *uid* (InvalidUID otherwise): its file's name."""
    return hashlib.sha256(check_uid(uid, "SOP Instance UID").encode("ascii")).hexdigest()


def is_sha(value) -> bool:
    """True if *value* is hex enough to name a conflicting version (16-64 hex digits)."""
    return isinstance(value, str) and _SHA.match(value) is not None


def relative(uid: str, sha256: str | None = None) -> str:
    """``<k[:2]>/<k>.dcm`` (or ``<k>.<sha256[:16]>.dcm``, a conflicting version)."""
    k = key(uid)
    if sha256 is None:
        return f"{k[:2]}/{k}.dcm"
    if not is_sha(sha256):
        raise ValueError(f"not a SHA-256 (hex): {shown(sha256)}")
    return f"{k[:2]}/{k}.{sha256[:16]}.dcm"


class Contained:
    """Paths under one directory, each checked to stay inside it: no empty, ``.`` or
    ``..`` component; every directory on the way resolves inside (checked once per
    directory, cached: a symlink planted there is refused); the file itself is not a
    symlink. Raises OutsideRoot, naming no path."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._real: str | None = None
        self._checked: set[str] = set()          # relative directories seen inside

    def __call__(self, rel: str, new: bool = False) -> Path:
        """*new*: a path only ever made with ``os.link`` (which fails on anything there,
        a symlink too, and never follows it): the file itself is not looked at."""
        parts = rel.split("/")
        if any(p in ("", ".", "..") or os.sep in p or "\0" in p for p in parts):
            raise OutsideRoot(f"refused: {shown(rel)} is not a plain relative path")
        for i in range(1, len(parts)):
            self._check_dir("/".join(parts[:i]))
        path = self.directory.joinpath(*parts)
        if new:
            return path
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                raise OutsideRoot(f"refused: {shown(rel)} is a symbolic link")
        except FileNotFoundError:
            pass
        return path

    def _check_dir(self, rel: str) -> None:
        """A directory checked inside (its parents are, first): a real directory there
        is (one ``lstat``); a symbolic link is resolved."""
        if rel in self._checked:
            return
        directory = self.directory / rel
        try:
            mode = os.lstat(directory).st_mode
        except FileNotFoundError:
            return                              # made later, by us, as a directory
        if not stat.S_ISDIR(mode):
            if self._real is None:              # resolved once (may be a symlink)
                self._real = os.path.realpath(self.directory)
            if not os.path.realpath(directory).startswith(self._real + os.sep):
                raise OutsideRoot(f"refused: {shown(rel)} resolves outside the archive")
        self._checked.add(rel)


def fanout_dirs(objects: Path) -> Iterator[Path]:
    """The fan-out directories of *objects* (``<2 hex>/``, or any other directory there),
    one at a time: ``os.scandir``, never a list of them all."""
    try:
        top = os.scandir(objects)
    except FileNotFoundError:                    # nothing stored yet
        return
    with top:
        for entry in top:
            if entry.is_dir():
                yield Path(entry.path)


def files(objects: Path) -> Iterator[Path]:
    """Every ``*/*.dcm`` under *objects*, in directory order (unsorted), as a generator:
    memory stays bounded whatever the number of files (``os.scandir`` reads a directory
    a buffer at a time; sorting, or ``sorted(glob(...))``, would hold every path -- some
    3.9 GB at 10M instances)."""
    for directory in fanout_dirs(objects):
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.endswith(".dcm"):
                        yield Path(entry.path)
        except FileNotFoundError:                # removed meanwhile
            continue


def is_current(path: Path) -> bool:
    """True if *path* is named as this layout names files (and sits in its fan-out dir)."""
    m = _NAME.match(path.name)
    return m is not None and path.parent.name == m.group(1)[:2]


def migrate(objects: Path, invalid: Path, place, log=None, sync: bool = False) -> int:
    """Blocking: rename the files of the old layout in *objects* into this one, once.

    ``place(uid, sha256_or_None) -> Path`` gives a file's new path. Returns the number of
    files moved. Safe to run again after a crash half-way: files already renamed are
    recognised by their names, and a file whose new name is taken by the same bytes is
    simply removed.
    """
    marker = objects / MARKER
    if marker.exists():
        said = marker.read_text(errors="replace")[:64]
        if said != VERSION:             # a newer release's layout: a downgrade
            raise NewerLayout(f"embedded archive {objects.parent}: layout {said.strip()!r} "
                              f"({marker}) was written by a newer pacsp2p release (this one "
                              f"knows {VERSION.strip()!r}): run that release, or restore the "
                              f"data directory saved before the upgrade (docs/upgrading.md)")
        return 0
    moved, touched = 0, set()
    for path in _old_files(objects):
        target = _new_path(path, place)
        if target is None:
            invalid.mkdir(parents=True, exist_ok=True)
            aside = invalid / f"{uuid.uuid4().hex}.dcm"
            os.rename(path, aside)
            if log is not None:
                log(f"embedded archive: {shown(path.name)} set aside as {aside.name} "
                    "(unreadable, or not a valid SOP Instance UID)")
        else:
            _move(path, target, place)
            touched.add(target.parent)
        touched.add(path.parent)
        moved += 1
    if sync:
        if invalid.exists():
            touched.add(invalid)
        for directory in touched:
            _fsync(directory)
    tmp = objects / f".{MARKER}.{uuid.uuid4().hex}"
    tmp.write_text(VERSION)
    if sync:
        _fsync(tmp)
    os.replace(tmp, marker)
    if sync:
        _fsync(objects)
    if moved and log is not None:
        log(f"embedded archive: {moved} files renamed into the hashed layout")
    return moved


def _old_files(objects: Path) -> Iterator[Path]:
    """The files of the old layout, one fan-out directory at a time: the names of one
    directory are listed before any is moved (renaming while a directory is read may
    show an entry twice), so memory is bounded by the largest directory, not the archive."""
    for directory in fanout_dirs(objects):
        with os.scandir(directory) as entries:
            old = [Path(e.path) for e in entries
                   if e.name.endswith(".dcm") and not is_current(Path(e.path))]
        old.sort()
        yield from old


def _new_path(path: Path, place) -> Path | None:
    """Where an old-layout file goes (None: set it aside). Its UID comes from its header,
    never from its name."""
    try:
        uid = read_meta(path).sop_instance_uid
    except (BadDataset, OSError, ValueError):
        return None
    if not is_uid(uid):
        return None
    if path.name == f"{uid}.dcm":
        return place(uid, None)
    return place(uid, content_hash(path)[0])


def _move(path: Path, target: Path, place) -> None:
    """Rename *path* to *target*, never over another file: if *target* holds other
    bytes, keep *path* as a conflicting version beside it; if the same, drop *path*."""
    target.parent.mkdir(exist_ok=True)
    if _link(path, target):
        return
    mine = content_hash(path)[0]
    try:
        held = content_hash(target)[0]
    except BadDataset:
        held = ""
    if held != mine:
        beside = place(read_meta(path).sop_instance_uid, mine)
        if beside != target and _link(path, beside):
            return
    os.unlink(path)


def _link(path: Path, target: Path) -> bool:
    """Move *path* to *target* unless *target* exists (then False, *path* left)."""
    try:
        os.link(path, target)
    except FileExistsError:
        return False
    except OSError:                     # no hard links here: rename, never over a file
        if target.exists():
            return False
        os.rename(path, target)
        return True
    os.unlink(path)
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
