"""Deflated data sets (PS3.5 A.5, Deflated Explicit VR Little Endian) inflated with a bound.

The data set is a raw DEFLATE stream (RFC 1951). It is inflated a chunk at a time, never
whole: a few hundred kilobytes of zeros inflate to gigabytes, so every reader of a
deflated data set that came from the network (a C-FIND/C-MOVE/C-GET identifier, a
C-STORE data set's header) says how many inflated bytes it takes at most.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

CHUNK = 1 << 20
RATIO = 32              # a data set decoded whole inflates to at most RATIO times its size
FLOOR = 64 << 20        # ... or this many bytes, whichever is more (real ones: 1.2-3.4 times)


class Inflation(ValueError):
    """The stream is corrupt, ends early, or inflates past its bound."""


def inflated(data, limit: int, start: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
    """The raw DEFLATE stream in *data* (bytes or an mmap, sliced a chunk at a time: no
    buffer export outlives a step) from *start* inflated, a chunk of at most *chunk* bytes
    at a time; raises Inflation past *limit* inflated bytes, on a corrupt stream or one
    that ends before its last block. Bytes after the stream's end (a pad byte to an even
    length) are ignored."""
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    pos, total = start, 0
    try:
        while not z.eof:
            if z.unconsumed_tail:
                source = z.unconsumed_tail
            elif pos < len(data):
                source = data[pos:pos + chunk]
                pos += len(source)
            else:
                raise Inflation("the deflated data set ends early")
            out = z.decompress(source, chunk)
            total += len(out)
            if total > limit:
                raise Inflation(f"the deflated data set inflates past {limit} bytes")
            if out:
                yield out
    except zlib.error as e:
        raise Inflation(f"the deflated data set is corrupt: {e}") from e


def bound(deflated: int, ceiling: int) -> int:
    """Inflated bytes a deflated data set of *deflated* bytes may take when decoded whole:
    RATIO times its size, at least FLOOR, at most *ceiling* (``part10.convert`` holds a
    file of compressed pixel data decoded to the same bound)."""
    return min(ceiling, max(FLOOR, RATIO * deflated))


def head(data, length: int) -> bytes:
    """About the first *length* inflated bytes of the raw DEFLATE stream *data* (all of
    them if it inflates to fewer; at most a CHUNK more): the rest is never inflated."""
    out, total = [], 0
    chunks = inflated(data, 1 << 62)
    try:
        for chunk in chunks:
            out.append(chunk)
            total += len(chunk)
            if total >= length:
                break
    finally:
        chunks.close()
    return b"".join(out)


def inflate(data, limit: int) -> bytes:
    """The whole raw DEFLATE stream *data* inflated (at most *limit* bytes, else Inflation)."""
    return b"".join(inflated(data, limit))
