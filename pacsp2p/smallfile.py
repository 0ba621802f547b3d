"""Reading a file a config names (a TLS certificate, key or CA; the config itself):
a regular file only, and at most ``FILE_MAX`` bytes of it.

A FIFO would block the reader for ever (the open does not wait for its writer here), a
device such as ``/dev/zero`` fill its memory: a TLS file named so took 2.6 GB in 2 s
before, then a MemoryError traceback instead of the config's one line.
"""

from __future__ import annotations

import errno
import os
import stat

FILE_MAX = 4 << 20        # bytes of a file a config names, or of the config itself


def read_small(path, limit: int = FILE_MAX) -> bytes:
    """The bytes of the regular file *path* (symlinks followed), at most *limit* of them;
    OSError, its strerror saying why, for anything else (a FIFO, a device, a directory,
    a larger file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data
