"""Files made without a name (Linux ``O_TMPFILE``) and named once kept (``linkat``).

A received instance's file is made with no name in ``incoming``, written and fsynced
through its descriptor, and its one name is the one it is kept under (``objects/...``):
one directory entry per instance where a named spare took three (made in ``incoming``,
linked into place, unlinked), and its fsync no longer writes ``incoming``'s directory
too (ext4 without a journal syncs the directory of a file's new name with the file:
``ext4_sync_parent``). A file never named is gone once its descriptor is closed: a refused
data set, a crash leave nothing behind. Where the file system cannot (no ``O_TMPFILE``, no
``/proc``), ``make`` says so and the caller makes a named file as before.
"""

from __future__ import annotations

import os

_PROC = "/proc/self/fd"


def make(directory) -> int | None:
    """A new, empty file with no name on *directory*'s file system, open for writing
    (its descriptor, which the caller closes); None where that cannot be done."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir(_PROC):
        return None
    try:
        return os.open(directory, flag | os.O_WRONLY | os.O_CLOEXEC, 0o644)
    except OSError:
        return None


def source(fd: int) -> str:
    """A path that opens the file of *fd* (while *fd* is open)."""
    return f"{_PROC}/{fd}"


def link(fd: int, target) -> None:
    """Give the file open as *fd* the name *target*, never over an existing file
    (FileExistsError; OSError EXDEV on another file system)."""
    # (an absolute source: the directory descriptor is not used, but it makes os.link
    # call linkat with AT_SYMLINK_FOLLOW, which links the file, not the /proc link)
    os.link(source(fd), target, src_dir_fd=fd, follow_symlinks=True)
