"""How deep sequences nest in a data set, found without recursion and without decoding.

pydicom reads and writes nested sequences by recursion: a data set of a few KB whose
sequences nest a few hundred deep (valid DICOM, refused by no receiver) made
``part10.convert`` (pydicom's writer, via pynetdicom's ``encode``) grow a peer by
gigabytes a second until the kernel killed it (300 deep: 19 GB in 60 s). ``depth`` walks
every element's tag and length only — a loop and a list, no call per level — so the
callers can refuse such a data set before pydicom sees it.
"""

from __future__ import annotations

import struct

MAX_DEPTH = 100        # nested sequences pydicom is given (it wrote 200 in 0.05 s, 250 never)

_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def depth(data, implicit: bool, little: bool, stop_past: int = MAX_DEPTH) -> int:
    """The deepest nesting of sequences in the data set *data* (bytes of its elements):
    0 with none, 1 for a sequence at the top level, ...; counting stops past *stop_past*.
    A value of defined length is looked into when it is an SQ, or, whatever its VR, when
    it starts with an item tag (a UN or implicit VR sequence that a reader may decode).
    Encapsulated pixel data is skipped fragment by fragment. Malformed bytes end the walk
    (the depth seen so far): this bounds depth, it does not validate."""
    e = "<" if little else ">"
    head, u32 = struct.Struct(e + "HHI"), struct.Struct(e + "I")
    explicit_head = struct.Struct(e + "HH2sH")
    item_tag = struct.pack(e + "HH", 0xFFFE, 0xE000)
    size = len(data)
    # open sequences and items: (end, or None if undefined; 1 for a sequence; its
    # contents in implicit VR) -- a UN sequence's are (PS3.5 6.2.2)
    ends: list = []
    level = deepest = pos = 0
    while pos + 8 <= size and deepest <= stop_past:
        while ends and ends[-1][0] is not None and pos >= ends[-1][0]:
            level -= ends.pop()[1]
        inner = ends[-1][2] if ends else implicit
        group, elem, length = head.unpack_from(data, pos)
        if group == 0xFFFE:
            pos += 8
            if elem == 0xE000:
                ends.append((None if length == _UNDEFINED else pos + length, 0, inner))
            elif ends and ends[-1][0] is None:          # a delimiter closes the innermost
                level -= ends.pop()[1]
            continue
        vr = None
        if inner:
            pos += 8
        else:
            _, _, vr, length = explicit_head.unpack_from(data, pos)
            if vr in _LONG_VRS:
                if pos + 12 > size:
                    break
                (length,) = u32.unpack_from(data, pos + 8)
                pos += 12
            else:
                pos += 8
        if length == _UNDEFINED:
            if vr in (b"OB", b"OW") or (group, elem) == (0x7FE0, 0x0010):
                pos = _skip_fragments(data, pos, head)
                if pos < 0:
                    break
                continue
            ends.append((None, 1, inner or vr == b"UN"))
        elif pos + length > size:
            break
        elif vr == b"SQ" or data[pos:pos + 4] == item_tag:
            ends.append((pos + length, 1, inner or vr != b"SQ"))
        else:
            pos += length
            continue
        level += 1
        deepest = max(deepest, level)
    return deepest


def _skip_fragments(data, pos: int, head: struct.Struct) -> int:
    """The position after the sequence delimiter of the fragments at *pos*, or -1."""
    while pos + 8 <= len(data):
        group, elem, length = head.unpack_from(data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return pos
        if group != 0xFFFE or length == _UNDEFINED:
            return -1
        pos += length
    return -1
