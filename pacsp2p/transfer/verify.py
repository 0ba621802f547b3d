"""Verified reads: a retrieval serves a copy only if its data set hashes to the SHA-256
the catalog holds for it; otherwise the copy is *damaged* and the instance fails over to
its next replica (``transfer.retrieve``), exactly as if that source had not had it.

Where the check happens, and why there. A retrieval's consumers (the C-MOVE relay's
Storage SCU, C-GET) stream an instance onto a DICOM association as P-DATA fragments;
once the first fragment of a data set is on the wire, a C-STORE cannot be taken back —
only an A-ABORT ends it, and that fails every other sub-operation queued on the
association and shows the destination an aborted association. Hashing *while sending*
and failing over at the end (holding back the last PDV) would therefore cost an abort
and a new association for every damaged copy, and could never be made clean. So the
copy is checked *before* it is handed to the consumer, at the cheapest point:

- a copy on another peer arrives over the bulk channel into memory (up to
  ``fetching.MEMORY`` bytes) or a temporary file; it is hashed on the way (``BulkClient``
  hashes the data set in the thread that examines the bytes or writes the file, as it
  does for replicas): no extra read, no extra pass, the check is a string comparison
  when the last byte is in;
- a copy on this peer's own archive is hashed in the ``verify`` thread pool before it is
  handed over. That is one more pass over the file, served from the page cache by the
  time the consumer reads it again, at SHA-256 speed (about 1 GB/s a core with the SHA
  extensions, measured on the 2-core test machine: ~0.5 ms for a 512 KB CT image). It runs inside the retrieval's fetch-ahead
  window, in parallel with the sending of the instances before it, so a delivery's
  per-instance speed is unchanged as long as hashing outruns the destination.

A copy the catalog has no hash for (crawled from a vendor archive: ``sha256`` empty) is
served only if it is a whole Part-10 file (every element's tag and length walked over a
memory map, values skipped: a truncated one is refused) whose Media Storage and data set
SOP Instance UIDs (0002,0003 and 0008,0018) are the one asked for: an archive that
answers with another instance, or relabels one, fails over like a source that does not
have it (``Mislabelled``; not reported as damaged: there is no good hash to restore
from). A deflated data set is judged by its Media Storage UID. A damaged copy is logged
with its instance UID and reported to the scrub (``Retrieval.on_damaged``), which
replaces it from a good replica.
"""

from __future__ import annotations

import io
import mmap
import os
import re

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from pydicom.uid import UID

from pacsp2p import threads
from pacsp2p.dicom.header import BadDataset, dataset_uid
from pacsp2p.dicom.part10 import BadFile, dataset_start, file_dataset_hash
from pacsp2p.validate import shown

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")


class Mislabelled(Exception):
    """A copy without a catalog hash that is not the instance asked for (another UID in
    its file meta or data set, or not a readable Part-10 file): not served."""


class Damaged(Exception):
    """A copy's data set does not hash to the catalog's SHA-256 (or is not readable as a
    Part-10 file): not served."""


def is_sha256(value) -> bool:
    return isinstance(value, str) and bool(_SHA256.match(value))


SMALL = 256 << 10       # a file up to this size is read whole by the hashing job
WHOLE = 1 << 20         # ... by a local archive's batch job (``read_many``): a CT image
                        # too; held at most a retrieval's window (64) of them at once


def _hash(f):
    """Thread: (the data set hash of the open file *f* ("" if *f* is not a Part-10
    file), the file to serve, rewound). A small file is read whole in this one job and
    closed; its bytes are served from memory (no further file reads, no further thread
    hop for a consumer that reads it at once)."""
    try:
        f.seek(0)
        size = _size(f)
        if size <= SMALL:
            data = f.read(size + 1)         # (not SMALL + 1: a 256 KB buffer each time)
            if len(data) <= size:
                _closed(f)
                f = io.BytesIO(data)
            else:               # grew meanwhile: hashed from the file
                f.seek(0)
        return file_dataset_hash(f), f
    except Exception:
        return "", f
    finally:
        if not f.closed:
            f.seek(0)


def _size(f) -> int:
    """Bytes in the file *f* (a large number if it cannot tell: not read whole)."""
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return SMALL + 1


def _closed(f):
    try:
        f.close()
    except Exception:
        pass


def checked(f, loc, reactor) -> defer.Deferred:
    """Deferred[*f*] (rewound) if the copy *loc* (a ``types.Location``) read into the
    open file *f* hashes to ``loc.sha256``; else *f* is closed and it fails with
    Damaged. A file the bulk channel hashed while receiving it carries ``sha256``. A
    file of at most ``SMALL`` bytes is read whole while it is hashed: what is served is
    then an ``io.BytesIO`` of its bytes (*f* closed)."""
    expected = loc.sha256
    if not is_sha256(expected):
        if isinstance(f, io.BytesIO):       # in memory: a few elements walked, no hop
            return defer.maybeDeferred(_named, f, loc)
        pool = threads.pool(reactor, "verify", 1, 4)
        return deferToThreadPool(reactor, pool, _named, f, loc)
    got = getattr(f, "sha256", None)
    if is_sha256(got):
        return defer.maybeDeferred(_compare, f, got, loc)
    pool = threads.pool(reactor, "verify", 1, 4)
    d = deferToThreadPool(reactor, pool, _hash, f)
    d.addCallback(lambda got: _compare(got[1], got[0], loc))
    return d


def _named(f, loc):
    """*f* (rewound) if it is a whole Part-10 file whose file meta and data set name
    ``loc.sop_instance_uid``; else *f* is closed and Mislabelled raised."""
    uid = loc.sop_instance_uid
    try:
        f.seek(0)
        ts, got = dataset_start(f)
        if (not got or got == uid) and not UID(ts).is_deflated:
            offset = f.tell()
            if isinstance(f, io.BytesIO):
                with f.getbuffer() as buf:
                    got = dataset_uid(buf, offset, ts)
            else:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    got = dataset_uid(buf, offset, ts)
        f.seek(0)
    except (BadFile, BadDataset, OSError, ValueError) as e:
        _closed(f)
        raise Mislabelled(f"the copy of {uid} on {loc.archive}@{loc.peer} is not a "
                          f"whole Part-10 file: {e}") from None
    if got == uid:
        return f
    _closed(f)
    raise Mislabelled(f"the copy of {uid} on {loc.archive}@{loc.peer} holds "
                      f"{shown(got) if got else 'no SOP Instance UID'}")


def _compare(f, got: str, loc):
    if got == loc.sha256:
        return f
    _closed(f)
    raise mismatch(loc, got)


def mismatch(loc, got: str) -> Damaged:
    """The error for the copy *loc* whose data set hashed to *got* ("": not readable)."""
    what = f"hashes to {got[:12]}" if got else "is not a readable Part-10 file"
    return Damaged(f"the copy of {loc.sop_instance_uid} on {loc.archive}@{loc.peer} {what}, "
                   f"the catalog's SHA-256 is {loc.sha256[:12]}")
