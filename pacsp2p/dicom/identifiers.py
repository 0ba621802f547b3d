"""C-FIND/C-MOVE/C-GET identifiers <-> :class:`pacsp2p.types.Query` and result rows.

A response carries exactly the keys that were asked for (PS3.4 C.4.1.1.3.2), empty where
the cluster has no value, plus QueryRetrieveLevel and, when a value needs it, a
SpecificCharacterSet of ISO_IR 192 (UTF-8). The catalog keeps values as the archives sent
them; one its VR cannot carry (an IS "abc", a date with CJK characters) is sent empty,
never an exception in the middle of an answer (``encode_row``).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from pacsp2p.attributes import COMPUTED, LEVELS, STORED, UNIQUE
from pacsp2p.types import Query, is_pattern
from pacsp2p.validate import is_uid, shown


MAX_VALUES = 65536      # values of one identifier's keys in all (lists: PS3.4 C.2.2.2.2)
MAX_PATTERNS = 2000     # of them wildcards or ranges: each one is a term of an OR the
                        # catalog's SQLite plans in time growing faster than their number
                        # (8,000 date ranges: 8.5 s; equality values are one IN: 100,000
                        # in 0.6 s)


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


def check_retrieve(query: Query) -> None:
    """A C-MOVE/C-GET identifier names what it retrieves by the unique key of its level:
    one value or a list of them, none empty, no wildcard (PS3.4 C.4.2.1.4.1; at STUDY
    level an AccessionNumber instead, as Orthanc takes it); else ``IdentifierError``
    (0xA900, as dcmqrscp answers). Unique keys of the levels above may be given or not.
    Without it, an empty StudyInstanceUID moved every study the catalog held (up to
    the facade's 65,535 sub-operations) to the destination."""
    key = UNIQUE[query.level]
    value = query.keys.get(key, "")
    if query.level == "STUDY" and not value.strip() and \
            query.keys.get("AccessionNumber", "").strip():
        key, value = "AccessionNumber", query.keys["AccessionNumber"]
    values = value.split("\\")
    if not all(v.strip() for v in values):
        raise IdentifierError(f"a {query.level} level retrieve needs a {key} value "
                              "(unique key matching)")
    if any(is_pattern("UI", v) for v in values):
        raise IdentifierError(f"a retrieve's {key} holds a wildcard (unique keys are "
                              "matched by their values)")


def to_query(identifier: Dataset, root: str) -> tuple[Query, list[str]]:
    """(Query, requested return keys) from a decoded identifier."""
    try:
        level = str(identifier.QueryRetrieveLevel).strip().upper()
    except (AttributeError, ValueError) as e:
        raise IdentifierError("identifier has no usable QueryRetrieveLevel: "
                              f"{shown(str(e))}") from e
    if level not in LEVELS:
        raise IdentifierError(f"unsupported QueryRetrieveLevel {shown(level)}")
    keys: dict[str, str] = {}
    order: list[str] = []
    values = patterns = 0
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
            if elem.VR in ("DA", "TM") and any(v.count("-") > 1
                                               for v in keys[kw].split("\\")):
                # PS3.4 C.2.2.2.5: a range is <value1>-<value2> (DT keeps its UTC offset)
                raise IdentifierError(f"{kw}: not a date or time range: {shown(keys[kw])}")
            if elem.VR != "SQ":
                listed = keys[kw].split("\\")
                values += len(listed)
                patterns += sum(is_pattern(elem.VR, v) for v in listed)
                if values > MAX_VALUES or patterns > MAX_PATTERNS:
                    raise IdentifierError(
                        f"more than {MAX_VALUES} values, or {MAX_PATTERNS} wildcards and "
                        f"ranges, in one identifier")
    except IdentifierError:
        raise
    except Exception as e:  # a malformed identifier, whatever pydicom raises
        raise IdentifierError(f"cannot decode identifier: {shown(str(e), 200)}") from e
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


# -- the fast path: ASCII rows written directly (PS3.5 7.1.2, 7.1.3) ---------------------

# VRs whose ASCII value pydicom writes exactly as given (writing validation warns only);
# the value is then padded to even length (UI with NUL, the others with a space)
_VERBATIM = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UI", "UC", "UR", "UT"})
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                   "UV"})                      # explicit VR: 2 reserved bytes, 4-byte length
_PLAIN_IS = re.compile(r"(0|[1-9][0-9]{0,8})\Z")
_ASCII_TEXT = re.compile(r"[\x20-\x7e]*\Z")
_UNSEEN = object()
_layout: dict = {}          # keyword -> (tag, VR) | None (not written) | False (pydicom)


def _element_of(kw: str):
    """(tag, VR, written verbatim) of *kw* as ``to_dataset`` writes it, or None (unknown:
    not written); False for a VR the fast path leaves to pydicom (one of several VRs
    but US or SS, which pydicom writes empty as US). A VR not written verbatim is
    written here only empty: a requestor asking thousands of keys the catalog does not
    keep (Rows, Slice Thickness, ...) had every row made by pydicom, on the reactor
    (3,700 keys: 0.28 s a row)."""
    if kw in STORED:
        vr = STORED[kw].vr
    elif kw in COMPUTED:
        vr = COMPUTED[kw][1]
    else:
        try:
            vr = dictionary_VR(kw)
        except KeyError:
            return None
    if vr == "US or SS":
        vr = "US"
    if " or " in vr:
        return False
    tag = tag_for_keyword(kw)
    return (tag, vr, vr in _VERBATIM or vr == "IS") if tag is not None else False


_QR_LEVEL = 0x00080052
_CHARSET = 0x00080005


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise OverflowError
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def fast_identifier(row: dict[str, str], requested: list[str], level: str,
                    implicit: bool) -> bytes | None:
    """The response identifier of one catalog row in implicit or explicit VR little
    endian, written directly, byte for byte what pydicom writes for ``to_dataset``;
    None when the row needs pydicom (a value that is not plain ASCII: character sets;
    an IS that is not a plain number; a VR not written verbatim; a sequence)."""
    elements = [(_QR_LEVEL, "CS", level)]
    for kw in requested:
        layout = _layout.get(kw, _UNSEEN)
        if layout is _UNSEEN:
            layout = _layout[kw] = _element_of(kw)
        if layout is None:
            continue
        if layout is False:
            return None
        tag, vr, verbatim = layout
        value = row.get(kw, "")
        if value:
            if not verbatim or not value.isascii() or not _ASCII_TEXT.match(value):
                return None
            if vr == "IS" and not _PLAIN_IS.match(value):
                return None
        elements.append((tag, vr, value))
    try:
        elements.sort()
        out = []
        last = -1
        for tag, vr, value in elements:
            if tag == last:
                return None
            last = tag
            out.append(_element(tag, vr, value.encode("ascii"), implicit))
    except (OverflowError, struct.error):
        return None
    return b"".join(out)


def _valued_by_pydicom(row: dict[str, str], requested: list[str], level: str, encode,
                       implicit: bool) -> tuple[bytes | None, list[str]]:
    """A row ``fast_identifier`` leaves to pydicom (a non-ASCII value, ...) with many keys
    asked empty: pydicom writes the keys that have a value, the empty ones are written
    directly and put in tag order among them -- the same bytes, without pydicom's cost
    per key (3,700 keys: 0.076 CPU-s a row). (None, []) where it cannot be done so."""
    empty = [kw for kw in requested if not row.get(kw, "")]
    if len(empty) < 64:
        return None, []
    elements = {}
    for kw in empty:
        layout = _layout.get(kw, _UNSEEN)
        if layout is _UNSEEN:
            layout = _layout[kw] = _element_of(kw)
        if layout is False:
            return None, []
        if layout is not None:
            elements[layout[0]] = _element(layout[0], layout[1], b"", implicit)
    blanked: list[str] = []
    valued = [kw for kw in requested if row.get(kw, "")]
    data = encode(to_dataset(row, valued, level, blanked))
    pos = 0
    while data is not None and pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        head = 8
        if not implicit:
            vr = data[pos + 4:pos + 6].decode("latin-1")
            head, length = (12, struct.unpack_from("<I", data, pos + 8)[0]) if vr in _LONG \
                else (8, struct.unpack_from("<H", data, pos + 6)[0])
        if length == 0xFFFFFFFF or group << 16 | elem in elements:
            return None, []
        elements[group << 16 | elem] = data[pos:pos + head + length]
        pos += head + length
    if data is None or pos != len(data):
        return None, []
    return b"".join(elements[t] for t in sorted(elements)), blanked


def encode_row(row: dict[str, str], requested: list[str], level: str,
               encode: Callable[[Dataset], bytes | None],
               syntax: tuple[bool, bool, bool] | None = None) -> tuple[bytes, list[str]]:
    """(the encoded response identifier of one catalog row, the keywords sent empty
    because their VR cannot carry the stored value). *syntax* (implicit VR, little
    endian, deflated) of the transfer syntax: a plain ASCII row in implicit or explicit
    VR little endian is written directly (``fast_identifier``); otherwise *encode* is
    pynetdicom's (None when pydicom cannot write the data set: e.g. non-ASCII characters
    in a DA, TM, CS or UI); then each value is tried alone and the ones that cannot be
    written are left empty. Raises ValueError if the row cannot be encoded even so."""
    if syntax is not None and syntax[1] and not syntax[2]:
        data = fast_identifier(row, requested, level, syntax[0])
        if data is None:
            data, blanked = _valued_by_pydicom(row, requested, level, encode, syntax[0])
            if data is not None:
                return data, blanked
        if data is not None:
            return data, []
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
