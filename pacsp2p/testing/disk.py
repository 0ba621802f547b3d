"""A disk that fills up, for tests of what a full disk does: ``with tmpfs(path, "8m")``
mounts a tmpfs of that size there (root, as the tests run; unmounted after) and
``fill(directory)`` writes a file there until the file system has no room left."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "2m"):
    mountpoint = Path(mountpoint)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                   check=True, timeout=30)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], timeout=30)


def fill(directory: Path) -> Path:
    """A file in *directory* grown until the disk is full (its path: unlink it to free
    the room)."""
    filler = Path(directory) / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
