"""Read what the catalog needs from a Part-10 file's header, never touching pixel data.

Also finds where the dataset starts after the File Meta Information, so that content
hashes cover exactly the bytes a sender sent (the file meta is rewritten by receivers).
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from pacsp2p.catalog.attributes import HEADER_KEYWORDS, STORED
from pacsp2p.types import InstanceMeta


class BadDataset(ValueError):
    """The file is not a dataset we can understand (truncated, corrupt, no UIDs)."""


_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def _text(elem) -> str:
    value = elem.value
    if value is None:
        return ""
    if elem.VM > 1 and not isinstance(value, (str, bytes)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def read_meta(path: Path) -> InstanceMeta:
    """Header attributes of the Part-10 file at *path* (raises BadDataset)."""
    try:
        check_complete(path)
        ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_KEYWORDS)
        attrs = {}
        for kw in HEADER_KEYWORDS:
            if kw in ds and kw in STORED:
                attrs[kw] = _text(ds[kw])
        ts = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
            AttributeError, NotImplementedError, struct.error) as e:
        raise BadDataset(f"cannot parse dataset: {type(e).__name__}: {e}") from e
    missing = [k for k in _REQUIRED if not attrs.get(k)]
    if missing:
        raise BadDataset(f"dataset lacks {', '.join(missing)}")
    return InstanceMeta(attrs["SOPInstanceUID"], attrs["SOPClassUID"], ts, attrs,
                        Path(path).stat().st_size)


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
              b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def check_complete(path: Path) -> None:
    """Raise BadDataset unless every element of the data set ends inside the file and the
    last one ends exactly at its end (pydicom silently accepts a truncated last value).

    Walks tags and lengths only, descending into undefined-length sequences, items and
    encapsulated pixel data; values are never decoded. Deflated data sets are not walked.
    """
    path = Path(path)
    offset = dataset_offset(path)
    ts = UID(str(read_file_meta_info(path).get("TransferSyntaxUID", "")))
    if ts.is_deflated:
        return
    implicit, little = ts.is_implicit_VR, ts.is_little_endian
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == offset:
            raise BadDataset("the data set is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            end = _walk(buf, offset, size, implicit, little, None)
    if end != size:
        raise BadDataset(f"truncated: an element runs past the end of the file ({size} bytes)")


def _walk(buf, pos: int, size: int, implicit: bool, little: bool, stop) -> int:
    """Walk elements from *pos* to *size*, or past the delimiter tag *stop*; return the end
    (-1 if *stop* is not None and never came: a truncated sequence or item)."""
    e = "<" if little else ">"
    while pos + 8 <= size:
        group, elem = struct.unpack_from(e + "HH", buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE:                              # item / delimiters: no VR
            (length,) = struct.unpack_from(e + "I", buf, pos + 4)
            pos += 8
            if tag == stop:
                return pos
            if tag == _ITEM and length == _UNDEFINED:
                pos = _walk(buf, pos, size, implicit, little, _ITEM_END)
                if pos < 0:
                    return -1
                continue
        elif implicit:
            (length,) = struct.unpack_from(e + "I", buf, pos + 4)
            pos += 8
        elif buf[pos + 4:pos + 6] in _LONG_VRS:
            if pos + 12 > size:
                return -1
            (length,) = struct.unpack_from(e + "I", buf, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from(e + "H", buf, pos + 6)
            pos += 8
        if length == _UNDEFINED:                         # sequence or encapsulated pixels
            pos = _walk(buf, pos, size, implicit, little, _SEQ_END)
            if pos < 0:
                return -1
            continue
        if pos + length > size:
            return -1
        pos += length
    return -1 if stop is not None or pos != size else pos


def dataset_offset(path: Path) -> int:
    """Byte offset of the dataset after the File Meta Information."""
    return split_dataset(path)[1]


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
