"""C-FIND/C-MOVE/C-GET identifiers <-> :class:`pacsp2p.types.Query` and result rows.

A response carries exactly the keys that were asked for (PS3.4 C.4.1.1.3.2), empty where
the cluster has no value, plus QueryRetrieveLevel and, when a value needs it, a
SpecificCharacterSet of ISO_IR 192 (UTF-8). The catalog keeps values as the archives sent
them; one its VR cannot carry (an IS "abc", a date with CJK characters) is sent empty,
never an exception in the middle of an answer (``encode_row``).
"""

from __future__ import annotations

from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag

from pacsp2p.attributes import COMPUTED, LEVELS, STORED
from pacsp2p.types import Query
from pacsp2p.validate import is_uid, shown


class IdentifierError(ValueError):
    """The identifier cannot be used (no or bad QueryRetrieveLevel, undecodable)."""


def _raw(elem) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip()
    if elem.VM > 1 and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


def to_query(identifier: Dataset, root: str) -> tuple[Query, list[str]]:
    """(Query, requested return keys) from a decoded identifier."""
    try:
        level = str(identifier.QueryRetrieveLevel).strip().upper()
    except (AttributeError, ValueError) as e:
        raise IdentifierError(f"identifier has no usable QueryRetrieveLevel: {e}") from e
    if level not in LEVELS:
        raise IdentifierError(f"unsupported QueryRetrieveLevel {level!r}")
    keys: dict[str, str] = {}
    order: list[str] = []
    try:
        for elem in identifier:
            kw = elem.keyword or keyword_for_tag(elem.tag)
            if not kw or kw in ("QueryRetrieveLevel", "SpecificCharacterSet") or \
                    elem.tag.group in (0x0000, 0x0002):
                continue
            order.append(kw)
            if elem.VR != "SQ":
                keys[kw] = _raw(elem)
            if elem.VR == "UI" and keys[kw]:
                bad = [u for u in keys[kw].split("\\") if not is_uid(u) and u != "*"]
                if bad:
                    raise IdentifierError(f"{kw}: not a valid UID: {shown(bad[0])}")
    except IdentifierError:
        raise
    except Exception as e:  # a malformed identifier, whatever pydicom raises
        raise IdentifierError(f"cannot decode identifier: {e}") from e
    return Query(level, keys, root), order


def to_dataset(row: dict[str, str], requested: list[str], level: str,
               blanked: list[str] | None = None) -> Dataset:
    """The response identifier for one catalog row. A value pydicom refuses for its VR
    (an IS "abc") is left empty and its keyword appended to *blanked*."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    utf8 = False
    for kw in requested:
        value = row.get(kw, "")
        if kw in STORED:
            vr = STORED[kw].vr
        elif kw in COMPUTED:
            vr = COMPUTED[kw][1]
        else:
            try:
                vr = dictionary_VR(kw)
            except KeyError:
                continue
        if vr == "SQ":
            setattr(ds, kw, [])
            continue
        try:
            ds.add_new(kw, vr, value if value != "" else None)
        except (ValueError, TypeError, OverflowError):
            ds.add_new(kw, vr, None)
            if blanked is not None:
                blanked.append(kw)
            continue
        if value and not value.isascii():
            utf8 = True
    if utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def encode_row(row: dict[str, str], requested: list[str], level: str,
               encode: Callable[[Dataset], bytes | None]) -> tuple[bytes, list[str]]:
    """(the encoded response identifier of one catalog row, the keywords sent empty
    because their VR cannot carry the stored value). *encode* is pynetdicom's (None when
    pydicom cannot write the data set: e.g. non-ASCII characters in a DA, TM, CS or UI);
    then each value is tried alone and the ones that cannot be written are left empty.
    Raises ValueError if the row cannot be encoded even so."""
    blanked: list[str] = []
    data = encode(to_dataset(row, requested, level, blanked))
    if data is not None:
        return data, blanked
    clean = dict(row)
    for kw in requested:
        value = row.get(kw, "")
        if value and kw not in blanked and \
                encode(to_dataset({kw: value}, [kw], level)) is None:
            clean[kw] = ""
            blanked.append(kw)
    data = encode(to_dataset(clean, requested, level))
    if data is None:
        raise ValueError("the response identifier cannot be encoded")
    return data, blanked
