"""Read what the catalog needs from a Part-10 file's header, never touching pixel data.

Also finds where the dataset starts after the File Meta Information, so that content
hashes cover exactly the bytes a sender sent (the file meta is rewritten by receivers).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
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
        ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_KEYWORDS)
        attrs = {}
        for kw in HEADER_KEYWORDS:
            if kw in ds and kw in STORED:
                attrs[kw] = _text(ds[kw])
        ts = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError,
            AttributeError, NotImplementedError) as e:
        raise BadDataset(f"cannot parse dataset: {type(e).__name__}: {e}") from e
    missing = [k for k in _REQUIRED if not attrs.get(k)]
    if missing:
        raise BadDataset(f"dataset lacks {', '.join(missing)}")
    return InstanceMeta(attrs["SOPInstanceUID"], attrs["SOPClassUID"], ts, attrs)


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
