"""nesting.depth: how deep sequences nest, without recursion (part10.convert refuses past
MAX_DEPTH before pydicom's recursion takes gigabytes: test_hostile_nesting)."""
from __future__ import annotations

import struct

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from pacsp2p.dicom import nesting
from pacsp2p.dicom.header import file_meta


def pydicom_depth(ds, level=0) -> int:
    deepest = level
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                deepest = max(deepest, pydicom_depth(item, level + 1))
    return deepest


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "reportsi.dcm",
                                  "nested_priv_SQ.dcm", "UN_sequence.dcm", "JPEG2000.dcm",
                                  "MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_depth_of_real_files_at_least_what_pydicom_reads(name):
    path = get_testdata_file(name)
    data = open(path, "rb").read()
    offset, ts = file_meta(data)
    syntax = UID(ts)
    found = nesting.depth(memoryview(data)[offset:], syntax.is_implicit_VR,
                          syntax.is_little_endian)
    assert pydicom_depth(dcmread(path)) <= found <= pydicom_depth(dcmread(path)) + 1


def sequences(depth: int, defined: bool) -> bytes:
    if not defined:
        return (struct.pack("<HHI", 0x0040, 0xA730, 0xFFFFFFFF) +
                struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)) * depth + (
            struct.pack("<HHI", 0xFFFE, 0xE00D, 0) +
            struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * depth
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HHI", 0x0040, 0xA730, len(item)) + item
    return inner


@pytest.mark.parametrize("defined", [True, False])
@pytest.mark.parametrize("depth", [1, 7, nesting.MAX_DEPTH, 5000])
def test_depth_of_nested_sequences_stops_counting_past_the_bound(depth, defined):
    after = struct.pack("<HHI", 0x7FE0, 0x0010, 4) + b"\0\0\0\0"
    found = nesting.depth(sequences(depth, defined) + after, True, True)
    assert found == min(depth, nesting.MAX_DEPTH + 1)


def test_fragments_are_not_walked_as_elements():
    fragment = sequences(3, True)           # bytes that look like sequences, in a fragment
    pixels = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) +
              struct.pack("<HHI", 0xFFFE, 0xE000, 0) +
              struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment +
              struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    assert nesting.depth(pixels, False, True) == 0
