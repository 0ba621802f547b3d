"""part10's check of RLE Lossless frames (PS3.5 Annex G) before pylibjpeg-rle decodes
them: a header that is not as G.5 says, or a segment decoding to more than Rows x Columns
bytes, is BadFile, so the decoder never sees a frame it would write past (a Rust panic,
its message and stack on stderr each time: test_hostile_rle). Real files of pydicom's
encoder pass and decode as before; random frames that pass never make the decoder panic.
"""
from __future__ import annotations

import io
import random
import struct

import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from rle.rle import decode_frame

from pacsp2p.dicom import part10
from pacsp2p.testing import datasets


def frame(*segments: bytes, count: int | None = None, offsets=None) -> bytes:
    if offsets is None:
        offsets, pos = [], 64
        for s in segments:
            offsets.append(pos)
            pos += len(s)
    count = len(segments) if count is None else count
    return struct.pack("<16I", count, *offsets, *[0] * (15 - len(offsets))) + b"".join(segments)


RUN = bytes([193, 7])            # 64 bytes of 7: an 8 x 8 plane
WRONG = {
    "no header": b"\x01\0\0\0",
    "no segment": frame(count=0, offsets=[]),
    "16 segments": frame(RUN, RUN, count=16),
    "count not the image's": frame(RUN, RUN, RUN),
    "first not at 64": frame(RUN, RUN, offsets=[66, 68]) + b"\0\0",
    "descending": frame(RUN, RUN, offsets=[64, 64]),
    "past the frame": frame(RUN, RUN, offsets=[64, 4000]),
    "an offset past the count": frame(RUN, RUN, count=1),
    "a segment too long": frame(RUN + RUN, RUN),
}


@pytest.mark.parametrize("why", sorted(WRONG))
def test_a_wrong_frame_is_bad_file(why):
    with pytest.raises(part10.BadFile):
        part10._check_rle(WRONG[why], 64, 2, True)


def test_runs_cut_short_by_the_end_and_no_ops_make_nothing():
    part10._check_rle(frame(RUN + b"\x80" * 5000 + b"\x05", RUN), 64, 2, True)
    part10._check_rle(frame(RUN + b"\xff", RUN + b"\x7f\1\2"), 64, 2, True)


def test_convert_refuses_an_overlong_16_bit_frame_before_the_decoder():
    ds = datasets.make_image("CT", size=8, seed=3, transfer_syntax=RLELossless)
    segment = bytes([129, 0]) * 64                    # 8,192 bytes a segment
    ds.PixelData = encapsulate([frame(segment, segment)])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    with pytest.raises(part10.BadFile, match="more than 64 bytes"):
        part10.convert(out, ExplicitVRLittleEndian)


def rgb(size: int):
    ds = datasets.make_image("US", size=size, seed=5)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = random.Random(5).randbytes(size * size * 3)
    return ds


@pytest.mark.parametrize("modality,size", [("CT", 64), ("MR", 32), ("RGB", 16)])
def test_real_rle_images_pass_and_decode_as_before(modality, size):
    def image():
        return rgb(size) if modality == "RGB" else datasets.make_image(modality, size=size,
                                                                        seed=5)
    ds = image()
    ds.compress(RLELossless, generate_instance_uid=False)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    out.seek(0)
    decoded = part10.convert(out, ExplicitVRLittleEndian).getvalue()
    assert image().PixelData in decoded


def test_random_frames_that_pass_never_make_the_decoder_panic():
    rnd, passed = random.Random(20261207), 0
    for _ in range(3000):
        bits, samples = rnd.choice([8, 16, 32]), rnd.choice([1, 3])
        rows, cols = rnd.randint(1, 12), rnd.randint(1, 12)
        segments = []
        for _s in range(samples * bits // 8):
            target, out, made = rows * cols + rnd.choice([-3, 0, 0, 1, 5, 40]), bytearray(), 0
            while made < target:
                if rnd.random() < 0.5:
                    n = rnd.randint(0, 127)
                    out += bytes([n]) + rnd.randbytes(n + 1)
                    made += n + 1
                else:
                    n = rnd.randint(2, 128)
                    out += bytes([257 - n, rnd.getrandbits(8)])
                    made += n
            if rnd.random() < 0.3:
                out += rnd.randbytes(1)
            segments.append(bytes(out) or b"\0\0")
        data = frame(*segments)
        try:
            part10._check_rle(data, rows * cols, len(segments), bits > 8)
        except part10.BadFile:
            continue
        passed += 1
        try:
            decode_frame(data, rows * cols, bits, ">")
        except ValueError:
            pass                        # refused by the decoder itself: no panic
    assert passed > 300
