"""One peer per data directory: an advisory lock on ``DATA/peer.lock`` (fcntl.flock)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class Locked(Exception):
    """Another process holds the data directory."""


def acquire(data_dir: Path):
    """Take the lock (non-blocking); return the open file that holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / "peer.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise Locked(f"{data_dir} is in use by pid {holder}") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f
