"""Part-10 files (PS3.10 7.1) as stored: find where the data set starts, re-encode one.

``dataset_start`` walks the File Meta Information (group 0002) of a stored file without
decoding the data set, so sending it costs no parsing; ``convert`` decodes and re-encodes
a data set (decompressed if needed, content and UIDs kept) for a receiver that did not
accept its stored transfer syntax.
"""

from __future__ import annotations

import array
import hashlib
import io
import re
import struct

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (UID, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom.dsutils import encode
from twisted.logger import Logger

from pacsp2p.dicom import deflate, nesting

log = Logger()

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
             b"UR", b"UT", b"UV"}
_HEAD = 16384
MAX_INFLATED = 4 << 30    # a deflated data set inflating to more is not re-encoded


class BadFile(Exception):
    """A stored file that is not a DICOM Part-10 file we can send."""


def dataset_start(f) -> tuple[str, str]:
    """Position *f* at the data set after the File Meta Information (group 0002);
    return (transfer syntax UID, media storage SOP instance UID). The end of group 0002
    is found by walking its elements and checked against its group length."""
    head = f.read(_HEAD)
    if len(head) < 144 or head[128:132] != b"DICM":
        raise BadFile("not a DICOM Part-10 file (no 'DICM' after the preamble)")
    pos, values, group_length, meta_start = 132, {}, None, 0
    for _ in range(10000):
        if pos + 8 > len(head):
            more = f.read(_HEAD)
            if not more:
                break
            head += more
            continue
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                more = f.read(_HEAD)
                if not more:
                    raise BadFile("file meta information ends early")
                head += more
                continue
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        while start + length > len(head):
            more = f.read(max(_HEAD, start + length - len(head)))
            if not more:
                raise BadFile("file meta information ends early")
            head += more
        values[elem] = head[start:start + length]
        if elem == 0 and length == 4:
            group_length = struct.unpack_from("<I", head, start)[0]
            meta_start = start + 4
        pos = start + length
    if group_length is not None and meta_start + group_length != pos:
        log.warn("file meta group length {gl} disagrees with its elements ({n}): "
                 "using the elements", gl=group_length, n=pos - meta_start)
    ts = values.get(0x0010, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if not ts:
        raise BadFile("file meta information has no transfer syntax")
    f.seek(pos)
    return ts, values.get(0x0003, b"").rstrip(b"\0 ").decode("ascii", "replace")


class Part10Bytes(io.BytesIO):
    """A whole Part-10 file read into memory, its File Meta Information walked already
    (``examine``): ``offset`` of the data set, ``transfer_syntax``, ``media_uid`` (Media
    Storage SOP Instance UID). A sender takes ``data()`` as it is: no parsing, no file
    read, no thread hop."""

    def __init__(self, data: bytes, offset: int, transfer_syntax: str, media_uid: str):
        super().__init__(data)
        self._bytes = data
        self.offset, self.transfer_syntax, self.media_uid = offset, transfer_syntax, media_uid

    def data(self) -> memoryview:
        """The data set's bytes (after the File Meta Information), not copied."""
        return memoryview(self._bytes)[self.offset:]


def examine(data: bytes) -> tuple[int, str, str, str]:
    """(data set offset, transfer syntax UID, media storage SOP instance UID, sha256 hex
    of the data set) of the Part-10 file *data*; BadFile if it is not one. Run it in a
    thread: sha256 gives the GIL up while it hashes."""
    f = io.BytesIO(data)
    ts, uid = dataset_start(f)
    offset = f.tell()
    return offset, ts, uid, hashlib.sha256(memoryview(data)[offset:]).hexdigest()


class TooLarge(BadFile):
    """A data set that would take more than the bound given once decompressed."""


def decoded_size(ds) -> int:
    """Bytes the pixel data of *ds* takes once decoded (0 without pixel data)."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as e:
        raise BadFile(f"image attributes are not numbers: {e}") from None
    if min(rows, cols, samples, bits, frames) < 0:
        raise BadFile("negative image attributes")
    return rows * cols * samples * frames * max(1, bits // 8)


def convert(f, target: str, limit: int | None = None) -> io.BytesIO:
    """The data set of Part-10 file *f* re-encoded in uncompressed *target* (decompressed
    first if needed; the SOP Instance UID is kept). Closes *f*. *limit*: TooLarge if
    the file with its pixel data decoded would take more bytes (checked before). A
    deflated data set is inflated once, and compressed pixel data decoded, only within
    ``deflate.bound`` of the file's size (else TooLarge: a stored bomb of a few KB or MB
    is not decoded to GB)."""
    with f:
        size = f.seek(0, io.SEEK_END)
        if limit is not None and size > limit:
            raise TooLarge(f"{size} bytes, over {limit}")
        f.seek(0)
        ts = UID(dataset_start(f)[0])
        data = f.read()
        if ts.is_deflated:
            try:
                data = deflate.inflate(data, deflate.bound(len(data), limit or MAX_INFLATED))
            except deflate.Inflation as e:
                raise TooLarge(f"deflated data set: {e}") from None
        _check_nesting(data, ts)
        if ts.is_deflated:
            ds = read_dataset(io.BytesIO(data), False, True)
        else:
            del data
            f.seek(0)
            ds = dcmread(f)
    if ts.is_compressed:               # a bomb too: 3 KB of JPEG-LS decode to 512 MiB
        bound = deflate.bound(size, limit or MAX_INFLATED)
        if (need := size + decoded_size(ds)) > bound:
            raise TooLarge(f"{need} bytes once decompressed, over {bound}")
        _check_frames(ds, ts)
        ds.decompress(generate_instance_uid=False)
    target = UID(target)
    if target.is_little_endian != ts.is_little_endian:     # (compressed ones: little)
        try:
            _swap_words(correct_ambiguous_vr(ds, ts.is_little_endian))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise BadFile(f"cannot be re-encoded in {target.name}: {e}") from None
    encoded = encode(ds, target.is_implicit_VR, target.is_little_endian)
    if encoded is None:                 # pydicom's writer failed (pynetdicom logged why)
        raise BadFile(f"cannot be re-encoded in {target.name}")
    return io.BytesIO(encoded)


_WORDS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(ds: Dataset) -> None:
    """The values of *ds* that pydicom keeps as bytes but whose words have a byte order
    (OW, OF, OL, OD, OV: Pixel Data of more than 8 bits, LUTs, overlays, waveforms), byte
    by byte reversed in each word, in sequences too. pydicom's writer turns numbers to the
    target's byte order but copies these as they came: Big Endian pixels re-encoded as
    Little (or the other way) were sent with every word's bytes swapped."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or ():
                _swap_words(item)
        elif (width := _WORDS.get(elem.VR)) and isinstance(elem.value, bytes):
            if len(elem.value) % width:
                raise BadFile(f"{elem.tag} ({elem.VR}) of {len(elem.value)} bytes")
            words = array.array({2: "H", 4: "I", 8: "Q"}[width], elem.value)
            words.byteswap()
            elem.value = words.tobytes()


def _check_nesting(data: bytes, ts: UID) -> None:
    """BadFile if the data set *data* (in *ts*, inflated) nests sequences past
    ``nesting.MAX_DEPTH``: pydicom's recursion would take gigabytes for it
    (``dicom.nesting``)."""
    implicit, little = (False, True) if ts.is_deflated else (ts.is_implicit_VR,
                                                            ts.is_little_endian)
    found = nesting.depth(data, implicit, little)
    if found > nesting.MAX_DEPTH:
        raise BadFile(f"sequences nested over {nesting.MAX_DEPTH} deep: not re-encoded")


_JPEG = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
         JPEGLSLossless, JPEGLSNearLossless}


def _check_frames(ds, ts: UID) -> None:
    """BadFile if a JPEG or JPEG-LS frame's own header (SOF) says more rows, columns or
    components than the data set, or cannot be read: libjpeg makes the image its header
    says (16384 x 16384 under Rows = Columns = 8: 1.5 GB, then pydicom's shape error), so
    ``decoded_size`` bounds nothing unless they agree. RLE frames: ``_check_rle``."""
    if ts not in _JPEG and ts != RLELossless:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples, frames = int(ds.get("SamplesPerPixel") or 1), int(ds.get("NumberOfFrames") or 1)
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            if ts == RLELossless:
                _check_rle(frame, rows * cols, samples * max(1, int(ds.BitsAllocated) // 8),
                           int(ds.BitsAllocated) > 8)
                continue
            p = _get_jpg_parameters(frame)
            if not p or p["height"] > rows or p["width"] > cols or \
                    p["components"] > samples:
                raise BadFile(f"a frame of {p.get('height')} x {p.get('width')} x "
                              f"{p.get('components')} in a {rows} x {cols} x {samples} image")
    except (AttributeError, KeyError, TypeError, ValueError, struct.error) as e:
        raise BadFile(f"compressed pixel data not understood: {type(e).__name__}") from None


def _check_rle(frame: bytes, pixels: int, segments: int, walk: bool) -> None:
    """BadFile unless the RLE frame's header is as PS3.5 G.5 says (*segments* of them,
    1-15: one a byte of a sample; the first at 64; offsets ascending inside the frame;
    none past the count) and, if *walk*, no segment decodes to more than *pixels* bytes.
    pylibjpeg-rle bounds its writes by the frame's length, not the plane's stride, so a
    longer segment of a 16-bit image wrote past the frame: a Rust panic, caught, but
    its message and stack (RUST_BACKTRACE) on stderr each time. With one byte a sample
    its own check holds, and the walk (a Python loop a run) is not needed."""
    if len(frame) < 64:
        raise BadFile(f"an RLE frame of {len(frame)} bytes: no 64-byte header")
    count, *offsets = struct.unpack_from("<16I", frame)
    ends = offsets[:count] + [len(frame)]
    if not 1 <= count <= 15 or count != segments or offsets[0] != 64 or \
            any(offsets[count:]) or any(a >= b for a, b in zip(ends, ends[1:])):
        raise BadFile(f"an RLE header of {count} segments at {offsets[:count]} in "
                      f"{len(frame)} bytes ({segments} expected)")
    for start, end in zip(ends, ends[1:]) if walk else ():
        pos, made = start, 0                # runs cut short by the end are not made
        while pos < end and made <= pixels:
            n = frame[pos]
            if n == 128:                    # no-ops: skipped at once, not one a turn
                pos = _NO_OPS.match(frame, pos, end).end()
                continue
            pos += n + 2 if n < 128 else 2
            if pos <= end:
                made += n + 1 if n < 128 else 257 - n
        if made > pixels:
            raise BadFile(f"an RLE segment decoding to more than {pixels} bytes")


_NO_OPS = re.compile(rb"\x80+")
_PIXELS = {0x7FE00010, 0x7FE00009, 0x7FE00008}


def read_header(path, length: int) -> Dataset:
    """The data set of the Part-10 file at *path* up to its pixel data (pydicom). A
    deflated one is inflated only as far as *length* bytes: pydicom inflates all of it in
    memory first (a few MB stored that inflate to GB, after a short header)."""
    with open(path, "rb") as f:
        ts = UID(dataset_start(f)[0])
        if not ts.is_deflated:
            f.seek(0)
            return dcmread(f, stop_before_pixels=True)
        data = deflate.head(f.read(), length)
    return read_dataset(io.BytesIO(data), False, True,
                        stop_when=lambda tag, vr, length: tag in _PIXELS)


def file_dataset_hash(f) -> str:
    """sha256 of the data set (after the file meta) of the open Part-10 file *f*."""
    f.seek(0)
    dataset_start(f)
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()
