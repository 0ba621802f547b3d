"""An instance sent to an archive that does not take its transfer syntax, as DCMTK's
dcmsend does (``--decompress-lossless``): decompressed, content and UIDs kept.

The facade keeps a lossless compressed data set as the modality sent it (RLE, JPEG
Lossless, JPEG-LS: ``contexts.storage_choice``), and placement puts its replicas on any
archive of the cluster. An archive reached over DIMSE takes what it accepts in
association negotiation (PS3.8 9.3.2.2, 9.3.3.2): a DCMTK dcmqrscp with its default
settings accepts no compressed syntax. So the ``dimse`` adapter proposes, for a data set
in any syntax but the uncompressed little endian ones, two presentation contexts: its own
syntax, and Explicit then Implicit VR Little Endian (``proposed``). If the archive accepts
the first, the bytes go unchanged; else the data set is decoded (pydicom with pylibjpeg,
``part10.convert``) and sent re-encoded in the accepted uncompressed syntax (``converted``),
in the adapter's thread pool. What it would take decoded is checked first: past the
archive's ``max_dataset`` it is refused before anything is decoded.

The archive then holds other bytes than the cluster was given: the copy is recorded with
the sha256 of what the archive holds (``Stored.sha256``; ``Stored.given``: of what it was
given, which the senders check), so a retrieval verifies it as any other copy. Conversion
is deterministic, so the copy the archive holds of a data set given again converts to the
same bytes: a duplicate, not a conflict (``held_is_converted``).
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from pacsp2p.dicom.incoming import file_meta
from pacsp2p.dicom.part10 import BadFile, convert, dataset_start

UNCOMPRESSED_LE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class NotConverted(Exception):
    """The data set cannot be sent in a syntax the archive accepts (too large decoded,
    or not decodable)."""


def proposed(sop_class: str, ts: str) -> list:
    """The presentation contexts of an association storing *sop_class* data sets kept in
    *ts*: *ts* alone, then (unless it is one) the uncompressed little endian syntaxes."""
    contexts = [build_context(sop_class, [ts])]
    if ts not in UNCOMPRESSED_LE:
        contexts.append(build_context(sop_class, list(UNCOMPRESSED_LE)))
    return contexts


def accepted(assoc, sop_class: str, ts: str) -> str | None:
    """The syntax to send a *ts* data set of *sop_class* in on *assoc*: *ts* if its
    context was accepted, else the uncompressed one accepted, else None."""
    taken = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
             if str(cx.abstract_syntax) == sop_class and cx.transfer_syntax}
    if ts in taken:
        return ts
    return next((t for t in UNCOMPRESSED_LE if t in taken), None)


def _encoded(path: Path, target: str, limit: int) -> bytes:
    try:
        return convert(open(path, "rb"), target, limit).getvalue()
    except BadFile as e:
        raise NotConverted(f"not decompressed to {UID(target).name}: {e}") from None
    except Exception as e:              # a pixel data the decoders refuse
        raise NotConverted(f"cannot be decompressed to {UID(target).name}: "
                           f"{type(e).__name__}: {e}") from None


def converted(path: Path, sop_class: str, uid: str, target, incoming: Path, limit: int):
    """(a Part-10 file of *path*'s data set in *target*, removed when closed; sha256 and
    size of its data set). NotConverted past *limit* bytes or if it cannot be decoded.
    Blocking: a thread pool's."""
    data = _encoded(path, target, limit)
    f = tempfile.NamedTemporaryFile(dir=incoming, prefix="converted-", suffix=".dcm")
    try:
        f.write(file_meta(sop_class, uid, target))
        f.write(data)
        f.flush()
    except BaseException:
        f.close()
        raise
    return f, hashlib.sha256(data).hexdigest(), len(data)


def held_is_converted(held, path: Path, ts: str, limit: int) -> str | None:
    """The sha256 of *path*'s data set converted to the syntax of *held* (an open
    Part-10 file the archive sent), if *held* is in another, uncompressed one than *ts*
    (the archive keeps a conversion); else None."""
    held.seek(0)
    try:
        held_ts, _ = dataset_start(held)
    except BadFile:
        return None
    if held_ts == ts or held_ts not in UNCOMPRESSED_LE:
        return None
    try:
        return hashlib.sha256(_encoded(path, held_ts, limit)).hexdigest()
    except NotConverted:
        return None
