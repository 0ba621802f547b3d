"""RLE Lossless images a real peer decodes for a C-GET (thirteenth hostile-input session).

A C-STORE in RLE Lossless is kept as sent. A C-GET proposing only Explicit VR Little
Endian makes the peer decode it (``part10.convert``, pydicom with pylibjpeg-rle). An
image of 16 bits whose RLE segments hold more than Rows x Columns bytes made the decoder
write past its frame: a Rust panic, caught (the sub-operation failed), but its message
and, with RUST_BACKTRACE set, some 50 lines of stack went to the peer's stderr each
time, with no rate limit: a requestor repeating the C-GET filled the log (and its disk).
Now the frame's RLE header (PS3.5 G.5) and its segments' decoded lengths are checked
before the decoder is called: the sub-operation fails with one rate-limited line.
Frames whose header is wrong in other ways (segment count, offsets) are refused by the
same check; the decoder refused them before too, without a panic (unit-tested in
tests/unit/test_rle_frames.py).
"""
from __future__ import annotations

import io
import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_STORE

from pacsp2p.testing import Peer, datasets, echo
from pacsp2p.testing import dicomnet as dn

REPEATS = 20             # C-GETs of the bad image
LOG_BYTES = 20_000       # what the log may grow by over them (one panic: ~4 KB of stack)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("rle"), name="rle") as p:
        yield p


def overlong_rle(study: str) -> Dataset:
    """A 16-bit 8 x 8 CT whose two RLE segments each decode to 8,192 bytes (64 runs
    of 128 zeros): 128 times what Rows x Columns say."""
    ds = datasets.make_image("CT", size=8, seed=2, PatientID="RLEBOMB",
                             StudyInstanceUID=study, InstanceNumber=2,
                             SeriesInstanceUID=datasets.uid("rle-series", study),
                             SOPInstanceUID=datasets.uid("rle-bomb", study))
    assert ds.BitsAllocated == 16
    segment = bytes([129, 0]) * 64
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *[0] * 13)
    ds.PixelData = encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    return ds


def store(peer, ds: Dataset) -> list:
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
    req.DataSet = io.BytesIO(datasets.explicit_le(ds))
    with dn.association(peer.port, peer.ae_title,
                        [build_context(CTImageStorage, [RLELossless])], timeout=120) as assoc:
        return dn.send_request(assoc, req, assoc.accepted_contexts[0].context_id)


def test_an_overlong_rle_segment_fails_its_sub_operation_and_writes_no_panic(peer):
    study = datasets.uid("rle-study")
    good = datasets.make_image("CT", size=8, seed=1, PatientID="RLEBOMB",
                               StudyInstanceUID=study, InstanceNumber=1,
                               SeriesInstanceUID=datasets.uid("rle-series", study),
                               SOPInstanceUID=datasets.uid("rle-good", study),
                               transfer_syntax=RLELossless)
    bad = overlong_rle(study)
    assert store(peer, good) == [0] and store(peer, bad) == [0]      # kept as sent
    before = peer.log_path.stat().st_size
    for _ in range(REPEATS):
        final, _, received = dn.get_study(peer, study, CTImageStorage,
                                          ExplicitVRLittleEndian, timeout=120)
        assert final.Status == 0xB000, hex(final.Status)
        assert (final.NumberOfCompletedSuboperations,
                final.NumberOfFailedSuboperations) == (1, 1)
        assert [str(d.SOPInstanceUID) for d in received] == [good.SOPInstanceUID]
    with open(peer.log_path, "rb") as f:
        f.seek(before)
        grown = f.read()
    assert b"panicked" not in grown and b"PanicException" not in grown
    assert len(grown) < LOG_BYTES, f"the log grew by {len(grown)} bytes"
    good.decompress()
    assert received[0].PixelData == good.PixelData
    assert echo(peer.port, peer.ae_title)
    text = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "Unhandled" not in text
