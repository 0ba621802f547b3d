"""Read what the catalog needs from a Part-10 file's header, never touching pixel data.

Also finds where the dataset starts after the File Meta Information, so that content
hashes cover exactly the bytes a sender sent (the file meta is rewritten by receivers).
A deflated data set (PS3.5 A.5) is inflated a chunk at a time, within bounds
(``dicom.deflate``), never whole.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import struct
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from pacsp2p.attributes import HEADER_KEYWORDS, STORED
from pacsp2p.dicom.deflate import Inflation, bound, inflated
from pacsp2p.types import InstanceMeta
from pacsp2p.validate import clipped


class BadDataset(ValueError):
    """The file is not a dataset we can understand (truncated, corrupt, no UIDs)."""


SMALL_READ = 256 << 10   # files up to this size are read whole, larger ones memory-mapped
MAX_INFLATED = 4 << 30   # a deflated data set inflating to more is refused (max_dataset's default)
MAX_DEFLATED_HEADER = 64 << 20  # inflated bytes kept to read a deflated data set's header


@contextlib.contextmanager
def _contents(f, size: int):
    """The bytes of the open file *f* (*size* bytes): one read for a small file (no
    mmap/munmap and page faults per file: a catalog rebuild reads millions), a read-only
    memory map for a large one."""
    if size <= SMALL_READ:
        f.seek(0)
        yield f.read(size)
        return
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def _opened(path: Path, content: bytes | None):
    """The file at *path*, open for reading — or nothing, if its *content* is given."""
    return open(path, "rb") if content is None else contextlib.nullcontext()


_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _text(elem) -> str:
    value = elem.value
    if value is None:
        return ""
    if elem.VM > 1 and not isinstance(value, (str, bytes)):
        return clipped("\\".join(str(v) for v in value))
    return str(value).strip()


# character sets whose bytes decode without ISO 2022 escapes
_SIMPLE_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1",
                    "ISO_IR 192": "utf-8", "ISO 2022 IR 6": "latin-1",
                    "ISO 2022 IR 100": "latin-1"}
_WANTED = {int(Tag(kw)): kw for kw in HEADER_KEYWORDS}
_CHARSET_TAG = 0x00080005


def read_meta(path: Path, sha256: str = "", data_size: int = 0,
              content: bytes | None = None, bounded: bool = False) -> InstanceMeta:
    """Header attributes, transfer syntax and content hash of the Part-10 file at *path*
    (*content*: its bytes, already in memory — the file just written — not read again).

    One pass over the file (read whole, or memory-mapped if large): the File Meta Information, then every
    element's tag and length — checking that the data set is complete — keeping the raw
    values of the attributes the catalog needs; the sha256 of the data set bytes is taken
    on the way, unless the writer of the file hashed them already (*sha256* of
    *data_size* bytes). Values are decoded only for those few attributes (pydicom is used
    for data sets in ISO 2022 character sets). *bounded* (a C-STORE): a deflated data set
    inflating past ``deflate.bound`` of its size is refused, not inflated to 4 GiB (8.5
    CPU-s for 4 MB sent), and so is one of odd length (PS3.5 7.1: DCMTK's SCPs abort the
    association that sends one); as it is, what an archive already holds is still read
    (rebuild). Raises BadDataset.
    """
    path = Path(path)
    try:
        with _opened(path, content) as f:
            size = f.seek(0, 2) if content is None else len(content)
            if size < 144:
                raise BadDataset("not a DICOM Part-10 file (too short)")
            with _contents(f, size) if content is None else \
                    contextlib.nullcontext(content) as buf:
                offset, ts = file_meta(buf)
                if offset == size:
                    raise BadDataset("the data set is empty")
                deflated, implicit, little = _syntax(ts)
                found: dict = {}
                if deflated:
                    limit = bound(size - offset, MAX_INFLATED) if bounded else MAX_INFLATED
                    head = _deflated_header(buf, offset, found, limit, bounded)
                else:
                    head = None
                    end = _walk(buf, offset, size, implicit, little, None, found,
                                strict=bounded)
                    if end != size:
                        raise BadDataset(f"truncated: an element runs past the end of "
                                         f"the file ({size} bytes)")
                    if bounded and (size - offset) & 1:
                        raise BadDataset(f"a data set of odd length ({size - offset} "
                                         f"bytes)")
                sha = sha256 if sha256 and data_size == size - offset else \
                    hashlib.sha256(memoryview(buf)[offset:]).hexdigest()
    except (OSError, ValueError, struct.error, RecursionError) as e:
        if isinstance(e, BadDataset):
            raise
        raise BadDataset(f"cannot parse dataset: {type(e).__name__}: {e}") from e
    attrs = _decode(found)
    if attrs is None:                   # an ISO 2022 character set: pydicom decodes
        meta = _read_meta_pydicom(path, size, head)
        return InstanceMeta(meta.sop_instance_uid, meta.sop_class_uid, ts, meta.attributes,
                            size, sha, size - offset)
    _check_required(attrs)
    return InstanceMeta(attrs["SOPInstanceUID"], attrs["SOPClassUID"], ts, attrs, size, sha,
                        size - offset)


def _decode(found: dict) -> dict | None:
    """{keyword: text} of the raw values *found*; None for an ISO 2022 character set."""
    charset = found.get(_CHARSET_TAG, b"").decode("latin-1").strip(" \0")
    encoding = _SIMPLE_CHARSETS.get(charset.split("\\")[-1].strip() if charset else "")
    if encoding is None:
        return None
    return {_WANTED[tag]: clipped(raw.decode(encoding, "replace").strip(" \0"))
            for tag, raw in found.items() if _WANTED[tag] in STORED}


_PIXELS = 0x7FE00000        # (7FE0,xxxx): pixel data and what follows it


def sniff(prefix, transfer_syntax: str, complete: bool = False) -> dict | None:
    """The catalog attributes of a data set from its first bytes, while the rest is still
    arriving: None while the prefix ends before the pixel data (send more; with
    *complete*, the prefix is the whole data set: objects without pixel data); raises
    BadDataset when it cannot be done this way (deflated, ISO 2022 character set, not a
    data set) — the caller then waits for the whole file and ``read_meta``."""
    deflated, implicit, little = _syntax(transfer_syntax)
    if deflated:
        raise BadDataset("deflated data sets are read whole")
    found: dict = {}
    try:
        end = _walk(prefix, 0, len(prefix), implicit, little, None, found, until=_PIXELS)
    except (struct.error, RecursionError) as e:
        raise BadDataset(f"cannot parse dataset: {type(e).__name__}") from e
    if end < 0 or (end == len(prefix) and not complete):
        return None
    attrs = _decode(found)
    if attrs is None:
        raise BadDataset("ISO 2022 character sets are read whole")
    _check_required(attrs)
    return attrs


def dataset_uid(buf, offset: int, transfer_syntax: str) -> str:
    """The SOP Instance UID (0008,0018) of the data set at *offset* of the bytes *buf* of
    a whole Part-10 file (not deflated), every element's tag and length walked (values
    skipped): BadDataset if it is truncated or names none."""
    deflated, implicit, little = _syntax(transfer_syntax)
    if deflated:
        raise BadDataset("deflated data sets are read whole")
    found: dict = {}
    try:
        end = _walk(buf, offset, len(buf), implicit, little, None, found)
    except (struct.error, RecursionError) as e:
        raise BadDataset(f"cannot parse dataset: {type(e).__name__}") from e
    if end != len(buf):
        raise BadDataset(f"truncated: an element runs past the end of the file "
                         f"({len(buf)} bytes)")
    raw = found.get(_SOP_INSTANCE_UID)
    if not raw:
        raise BadDataset("dataset lacks SOPInstanceUID")
    return raw.decode("ascii", "replace").strip(" \0")


_SOP_INSTANCE_UID = 0x00080018


@functools.lru_cache(maxsize=64)
def _syntax(transfer_syntax: str) -> tuple[bool, bool | None, bool | None]:
    """(deflated, implicit VR, little endian) of a transfer syntax UID (the last two None
    when deflated), as pydicom's ``UID`` says — made once per syntax, not per data set
    (a ``UID`` costs ~10 µs: a tenth of a small instance's header read); raises what it
    raises (not kept)."""
    syntax = UID(transfer_syntax)
    if syntax.is_deflated:
        return True, None, None
    return False, syntax.is_implicit_VR, syntax.is_little_endian


def _check_required(attrs) -> None:
    missing = [k for k in _REQUIRED if not attrs.get(k)]
    if missing:
        raise BadDataset(f"dataset lacks {', '.join(missing)}")


def _deflated_header(buf, offset: int, found: dict, limit: int = MAX_INFLATED,
                     strict: bool = False) -> bytes:
    """The inflated bytes of the deflated data set at *offset* of *buf* up to its pixel data (all of them if
    it has none; at most MAX_DEFLATED_HEADER), with the raw values of the wanted
    attributes put in *found*. The rest is inflated and dropped, a chunk at a time, to
    check that the stream is whole and inflates to at most *limit* bytes."""
    prefix, end, attempt = bytearray(), -1, 64 << 10
    chunks = inflated(buf, limit, offset)
    try:
        for chunk in chunks:
            prefix += chunk
            if len(prefix) > MAX_DEFLATED_HEADER:
                raise BadDataset(f"the header of the deflated data set is larger than "
                                 f"{MAX_DEFLATED_HEADER} bytes")
            if len(prefix) >= attempt:          # walk again once the prefix has doubled
                attempt = 2 * len(prefix)
                found.clear()
                end = _walk(prefix, 0, len(prefix), False, True, None, found, until=_PIXELS,
                            strict=strict)
                if 0 <= end < len(prefix):
                    break                        # the pixel data starts in the prefix
        else:
            found.clear()
            end = _walk(prefix, 0, len(prefix), False, True, None, found, until=_PIXELS,
                        strict=strict)
            if end < 0:
                raise BadDataset("truncated: an element runs past the end of the "
                                 "deflated data set")
        for _ in chunks:
            pass
    except Inflation as e:
        raise BadDataset(str(e)) from e
    finally:
        chunks.close()
    return bytes(prefix[:end])


def _read_meta_pydicom(path: Path, size: int, head: bytes | None = None) -> InstanceMeta:
    """The slow path (ISO 2022 character sets): pydicom decodes; *head*: the inflated
    header of a deflated data set (``_deflated_header``), decoded instead of the file."""
    try:
        if head is None:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_KEYWORDS)
            ts = str(ds.file_meta.TransferSyntaxUID)
        else:
            ds = read_dataset(BytesIO(head), False, True, specific_tags=list(_WANTED))
            ts = DeflatedExplicitVRLittleEndian
        attrs = {kw: _text(ds[kw]) for kw in HEADER_KEYWORDS if kw in ds and kw in STORED}
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
            AttributeError, NotImplementedError, struct.error, RecursionError) as e:
        raise BadDataset(f"cannot parse dataset: {type(e).__name__}: {e}") from e
    _check_required(attrs)
    return InstanceMeta(attrs["SOPInstanceUID"], attrs["SOPClassUID"], ts, attrs, size)


def file_meta(buf) -> tuple[int, str]:
    """(offset of the data set, transfer syntax UID) of a Part-10 file's bytes *buf*.

    The end of group 0002 is found by walking its elements (always explicit VR little
    endian), not by trusting its group length.
    """
    if buf[128:132] != b"DICM":
        raise BadDataset("not a DICOM Part-10 file (no 'DICM' after the preamble)")
    pos, size, ts = 132, len(buf), None
    while pos + 8 <= size:
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        if buf[pos + 4:pos + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<I", buf, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        if start + length > size:
            raise BadDataset("file meta information ends early")
        if elem == 0x0010:
            ts = bytes(buf[start:start + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    if not ts:
        raise BadDataset("file meta information has no transfer syntax")
    return pos, ts


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
              b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


_MISPLACED = {None: "outside a sequence", _SEQ_END: "in a sequence, not an item",
              _ITEM_END: "in an item, not its end"}


def _may_be_undefined(tag: int, vr: bytes | None) -> bool:
    """A value of undefined length is a sequence (SQ; UN, PS3.5 6.2.2) or encapsulated
    pixel data (OB, OW); in Implicit VR, by the dictionary (a private or unknown tag: any
    -- DCMTK reads it as a sequence)."""
    if vr is not None:
        return vr in (b"SQ", b"UN", b"OB", b"OW")
    if tag >> 16 & 1:
        return True
    try:
        return dictionary_VR(tag) in ("SQ", "UN", "OB", "OW", "OB or OW", "OW or OB")
    except KeyError:
        return True


_STRUCTS = {little: (struct.Struct(e + "HHI"), struct.Struct(e + "HH2sH"), struct.Struct(e + "I"))
            for little, e in ((True, "<"), (False, ">"))}


def _walk(buf, pos: int, size: int, implicit: bool, little: bool, stop,
          found: dict | None = None, until: int | None = None, strict: bool = False) -> int:
    """Walk elements from *pos* to *size*, or past the delimiter tag *stop*; return the end
    (-1 if *stop* is not None and never came: a truncated sequence or item). Raw values
    of the top-level elements in ``_WANTED`` are put in *found* (tag -> bytes); one of
    them twice (a SOP Instance UID that DCMTK and pydicom read differently) raises
    BadDataset. With
    *until*, stop before the first top-level element whose tag is at least *until*.
    *strict* (a C-STORE: ``read_meta(bounded=True)``): items, delimiters and values of
    undefined length where no sequence is raise BadDataset; else they are skipped, as
    before 3e18d84, so that what an archive already holds is still read (rebuild, crawl,
    the copies repair, hand-off, drain and scrub make, a retrieval's check)."""
    implicit_head, explicit_head, long_length = _STRUCTS[little]
    while pos + 8 <= size:
        if implicit:
            group, elem, length = implicit_head.unpack_from(buf, pos)
            vr = None
        else:
            group, elem, vr, length = explicit_head.unpack_from(buf, pos)
        tag = group << 16 | elem
        if until is not None and tag >= until:
            return pos
        if group == 0xFFFE:                              # item / delimiters: no VR
            (length,) = long_length.unpack_from(buf, pos + 4)
            pos += 8
            if tag == stop:
                return pos
            if strict and (tag != _ITEM or stop != _SEQ_END):   # (DCMTK reads no further)
                raise BadDataset(f"(FFFE,{elem:04X}) {_MISPLACED[stop]}")
            if tag == _ITEM and length == _UNDEFINED:
                pos = _walk(buf, pos, size, implicit, little, _ITEM_END, strict=strict)
                if pos < 0:
                    return -1
                continue
        elif strict and stop == _SEQ_END:
            raise BadDataset(f"({group:04X},{elem:04X}) in a sequence, outside its items")
        elif vr is None:
            pos += 8
        elif vr in _LONG_VRS:
            if pos + 12 > size:
                return -1
            (length,) = long_length.unpack_from(buf, pos + 8)
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED:                         # sequence or encapsulated pixels
            if strict and not _may_be_undefined(tag, vr):
                raise BadDataset(f"({group:04X},{elem:04X}) of undefined length is not a "
                                 f"sequence")
            if vr == b"UN":             # a UN sequence's items: implicit VR LE (PS3.5 6.2.2)
                pos = _walk(buf, pos, size, True, True, _SEQ_END, strict=strict)
            else:
                pos = _walk(buf, pos, size, implicit, little, _SEQ_END, strict=strict)
            if pos < 0:
                return -1
            continue
        if pos + length > size:
            return -1
        if found is not None and tag in _WANTED:
            if tag in found:        # readers differ: DCMTK keeps the first, pydicom the last
                raise BadDataset(f"({group:04X},{elem:04X}) {_WANTED[tag]} is in the data "
                                 f"set twice")
            found[tag] = bytes(buf[pos:pos + length])
        pos += length
    return -1 if stop is not None or pos != size else pos


def dataset_offset(path: Path) -> int:
    """Byte offset of the dataset after the File Meta Information."""
    with open(path, "rb") as f:
        if f.seek(0, 2) < 144:
            raise BadDataset("not a DICOM Part-10 file (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return file_meta(buf)[0]


def content_hash(path: Path) -> tuple[str, int]:
    """(sha256 hex of the dataset bytes after the file meta, size of those bytes)."""
    offset = dataset_offset(path)
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
