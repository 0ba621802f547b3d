"""Directories whose new subdirectories ext4 spreads over its block groups (``chattr +T``).

A new file's inode is taken from the block group of its directory; on ext4 without a
journal, each allocation first steps over every inode of that group freed in the last
one to six minutes (``recently_deleted``: a buffer look-up each). A data directory in a
busy part of the disk (a ``/tmp`` shared with test suites and benches, which make and
remove thousands of files a minute) paid 64-870 µs of CPU for each new file, in the same
group as every other file made there: the spare file of each received instance.

``mark`` sets ``FS_TOPDIR_FL`` on a directory we own (the data directory, an archive's
``objects/``): ext4's Orlov allocator then places each new subdirectory of it (``incoming``,
the fan-out directories) in a group with more free inodes and blocks than the average, as
it does for the directories at the root of a file system, and the files made in them take
their inodes there. Best effort: on a file system without the flag (xfs, tmpfs, ...) or a
directory we may not change, nothing happens. Directories made before are not moved.
"""

from __future__ import annotations

import fcntl
import os
import struct

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000


def mark(directory) -> bool:
    """Set ``FS_TOPDIR_FL`` on *directory* (an existing directory); whether it is set."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        if not flags & FS_TOPDIR_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_TOPDIR_FL))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
