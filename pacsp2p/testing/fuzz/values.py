"""Hostile values: path-like UIDs aimed at a canary directory (``Canary``), invalid UIDs
and AE titles."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path
from typing import Iterable
from pacsp2p.testing.fuzz.wire import INJECTED



# -- path-like UIDs ------------------------------------------------------------------------

class Canary:
    """Path-like UIDs that all point into *directory* (of the test's own, outside the
    peer's data directory): absolute ones, and relative ones climbing out of
    ``objects_dir/<fan>/`` with ``../``; the relative ones end so that the
    sha1(uid)[:2] fan-out directory the embedded archive used to pick exists (an
    attacker's move: ``../`` resolves only through a directory that exists).
    ``tried`` lists every UID made; ``leaked()`` the files that exist where they point."""

    def __init__(self, directory: Path, objects_dir: Path, fans: Iterable[str] = ()):
        self.directory = Path(directory)
        self.objects_dir = Path(objects_dir)
        self.fans = sorted(set(fans))
        self.tried: list[str] = []
        self._lock = threading.Lock()

    def uid(self, rng: random.Random, tag: str) -> str:
        name = f"{tag}-{rng.getrandbits(32):08x}"
        form = rng.randrange(4)
        if form == 0:
            uid = f"{self.directory}/{name}"
        elif form == 1:                                    # a subdirectory: mkdir'ed?
            uid = f"{self.directory}/sub-{rng.randrange(4)}/{name}"
        else:
            base = self.objects_dir / "00"
            rel = os.path.relpath(self.directory, base)
            if form == 3:                                  # from the root: ../../../..
                rel = "../" * (len(base.parts) + rng.randrange(3)) + str(self.directory)[1:]
            uid = f"{rel}/{name}"
            if self.fans:
                for k in range(4096):
                    cand = f"{uid}{k}"
                    if hashlib.sha1(cand.encode()).hexdigest()[:2] in self.fans:
                        uid = cand
                        break
        with self._lock:
            self.tried.append(uid)
        return uid

    def targets(self) -> list[Path]:
        """Where the tried UIDs point: the path itself and with ``.dcm``."""
        out = []
        base = self.objects_dir / "00"
        for uid in self.tried:
            where = Path(uid) if uid.startswith("/") else Path(os.path.normpath(base / uid))
            out += [where, where.with_name(where.name + ".dcm")]
        return out

    def leaked(self) -> list[Path]:
        """Files that exist at the targets, or anywhere under the directory."""
        found = {p for p in self.targets() if p.exists() or p.is_symlink()}
        if self.directory.exists():
            found |= {p for p in self.directory.rglob("*") if not p.is_dir()}
        return sorted(found)


# -- hostile values --------------------------------------------------------------------------

def bad_uid(rng: random.Random, canary: Canary | None = None) -> bytes:
    """A UID that breaks PS3.5 9.1 (bytes as they go on the wire)."""
    choice = rng.randrange(17)
    if choice == 16:
        return b"1.2\n" + INJECTED + b" 1.2"
    if choice == 0:
        return b"1.2.3." + bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 9)))
    if choice == 1:
        return "1.2.٣.٤".encode("utf-8")
    if choice == 2:
        return b"1." + b"2" * 63                              # 65 characters
    if choice == 3:
        return b"1.2." + b"3" * rng.randrange(61, 400)        # longer
    if choice == 4:
        return b"1.02.3"                                      # leading zero
    if choice == 5:
        return rng.choice([b"", b" ", b"  ", b"\0\0"])
    if choice == 6:
        return b"1.2. 3"
    if choice == 7:
        return rng.choice([b"1..2", b".1.2", b"1.2.", b"1.2.3a", b"abc", b"-1.2", b"1,2"])
    if choice == 8:
        return b"1.2\x003.4"
    if choice == 9:
        return b"1.2\r\n3\x01\x1b[2J"
    if choice == 10:
        return b"%2F..%2F..%2Fetc%2Fpasswd"
    if choice == 11:
        return b"1.2.3\\4.5"
    if choice == 12:
        return b"1.2." + b"9" * rng.randrange(2, 20) + b"." * rng.randrange(1, 4)
    if choice == 13 and canary is not None:
        return canary.uid(rng, "bad").encode()
    if choice == 14:
        return b"1.2.3" * rng.randrange(50, 2000)             # a few KiB
    return b".." if canary is None else canary.uid(rng, "dots").encode()


def bad_ae(rng: random.Random) -> bytes:
    choice = rng.randrange(10)
    return [
        bytes(rng.randrange(0x80, 0x100) for _ in range(16)),
        b"\0" * 16,
        b" " * 16,
        b"A\\B",
        "ÄRZTE-ÜBERWEISER".encode("utf-8")[:16],
        b"\x01\x02\x1b[31m",
        b"../../etc/passwd",
        bytes(rng.randrange(256) for _ in range(16)),
        b"",
        b"X\n" + INJECTED,
    ][choice]
