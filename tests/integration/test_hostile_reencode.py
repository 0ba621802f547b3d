"""Data sets kept as sent that a real peer later decodes whole (twelfth hostile-input
session): deflate and JPEG-LS bombs, and a value pydicom's writer cannot re-encode.

A C-STORE in Deflated Explicit VR Little Endian (PS3.5 A.5) of about 1 MB whose pixel
data is 1 GiB of zeros is valid DICOM. Before, it was kept as sent (its header read from
a bounded prefix, the rest inflated a chunk at a time and dropped: 8.5 CPU-s for 4 MB
inflating to 4 GiB); now one inflating past ``deflate.bound`` of its size (32 times, at
least 64 MiB) is refused 0xC000 once that much is inflated. One kept before (or by a
release before this one: here put in the archive behind the peer's back and found by
``pacsp2p catalog rebuild``) was then decoded whole by two paths:

- a C-GET proposing only Explicit VR Little Endian makes the peer re-encode it
  (``part10.convert``): it inflated it twice in memory, pydicom read and wrote it again
  (GBs for 1 MB sent); now it is inflated to at most ``deflate.bound``: the
  sub-operation fails, the rest is sent;
- an IOCM rejection note (a Key Object Selection document) is read by pydicom at store
  time (``rejection.read_rejection``), which inflated the whole data set in memory before
  it stopped at the pixel data (+2 GB); now such a note is refused as any deflate bomb,
  and a note is read from its first 64 MiB inflated only, as the header read.

A C-STORE in JPEG-LS Lossless of 2.9 KB (DCMTK's dcmcjpls of a 16384 x 16384 image of
zeros: 512 MiB decoded) is kept as sent; a C-GET proposing only Explicit VR Little
Endian made the peer decode it (+2.5 GB RSS, 512 MB sent); now compressed pixel data is
decoded only within the same bound (``deflate.bound`` of the file's size). The same
bomb whose Rows and Columns say 8 x 8 went round that: libjpeg makes the image its frame's
header says (+1.5 GB, then pydicom's shape error); now a JPEG or JPEG-LS frame larger
than the data set says fails its sub-operation before it is decoded.

A C-STORE in Explicit VR Little Endian carrying a US value of 3 bytes (a header walk
passes it: tags and lengths) is kept as sent; a C-GET proposing only Implicit VR Little
Endian made the peer re-encode it, pynetdicom's ``encode`` failed (it returns None) and
the sub-operation sent an EMPTY data set, counted completed; now it fails.

The peer runs under an address-space limit of its size at start + 3 GiB, so the host is
spared if it grows as before.
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless)
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_STORE

from pacsp2p.adapters import layout
from pacsp2p.dicom.header import BadDataset, file_meta, read_meta
from pacsp2p.testing import Peer, datasets, echo
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import wait_until
from pacsp2p.testing.fuzz.watch import RssPeak, cap_address_space
from pacsp2p.testing.iocm import KOS_SOP_CLASS

MIB = 1 << 20
BOMB_MIB = 1024             # inflated pixel data of a bomb: 512 x 512 x 16 bits x 2048 frames
HEADROOM = 3 << 30          # address space the peer may take past its size at start
GROWTH_KIB = 300 * 1024     # what the peer's RSS may grow by meanwhile (sampled: 20/s)


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    with Peer(tmp_path_factory.mktemp("deflate"), name="deflate") as p:
        cap_address_space(p.pid, HEADROOM)
        yield p


def deflated(head: bytes, zeros_mib: int = 0) -> bytes:
    """*head*, then a Pixel Data (OW) element of *zeros_mib* MiB of zeros if any, as one
    raw DEFLATE stream, padded to an even length."""
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(head)]
    if zeros_mib:
        length = (zeros_mib * MIB).to_bytes(4, "little")
        out.append(z.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + length))
        zeros = bytes(MIB)
        out += [z.compress(zeros) for _ in range(zeros_mib)]
    data = b"".join(out) + z.flush()
    return data + b"\0" * (len(data) % 2)


def bomb_image(study: str, n: int) -> Dataset:
    ds = datasets.make_image("CT", size=8, seed=n, PatientID="DEFLATEBOMB",
                             StudyInstanceUID=study, InstanceNumber=n,
                             SeriesInstanceUID=datasets.uid("deflate-bomb-series", study),
                             SOPInstanceUID=datasets.uid("deflate-bomb", study, n))
    if n == 2:
        del ds.PixelData
        ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, BOMB_MIB * MIB // (512 * 512 * 2)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    return ds


def store(peer, sop_class: str, uid: str, data: bytes,
          syntax: str = DeflatedExplicitVRLittleEndian) -> list:
    req = C_STORE()
    req.MessageID, req.Priority = 7, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, uid
    req.DataSet = io.BytesIO(data)
    with dn.association(peer.port, peer.ae_title, [build_context(sop_class, [syntax])],
            timeout=300) as assoc:
        return dn.send_request(assoc, req, assoc.accepted_contexts[0].context_id)


def held(peer) -> set:
    """The SOP Instance UIDs of the files in the peer's archive (one that a rejection
    note's deletion removes while they are read is not held)."""
    out = set()
    for path in dn.archive_files(peer.data_dir):
        try:
            out.add(read_meta(path).sop_instance_uid)
        except BadDataset:
            if path.exists():
                raise
    return out


def log_is_clean(peer) -> None:
    log = peer.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Unhandled" not in log


def get(peer, study: str, syntax: str) -> tuple:
    """(final C-GET response, its identifier, data sets received) of the study, CT
    proposed in *syntax*."""
    return dn.get_study(peer, study, CTImageStorage, syntax)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_deflate_bomb_is_refused_once_past_its_bound(peer):
    study = datasets.uid("deflate-refused-study")
    bomb = bomb_image(study, 2)
    bomb.SOPInstanceUID = datasets.uid("deflate-refused", 4000)
    bomb.NumberOfFrames = 4000 * MIB // (512 * 512 * 2)
    data = deflated(datasets.explicit_le(bomb), 4000)        # 4 MB inflating to 4,000 MiB
    before = cpu_seconds(peer.pid)
    with RssPeak(peer.pid) as rss:
        assert store(peer, CTImageStorage, bomb.SOPInstanceUID, data) == [0xC000]
    used = cpu_seconds(peer.pid) - before
    assert used < 3.0, f"{used:.1f} CPU-s for one C-STORE"      # all of it: 8.5
    assert rss.peak - rss.first < GROWTH_KIB
    assert bomb.SOPInstanceUID not in held(peer)
    assert "inflates past" in peer.log_path.read_text(errors="replace")
    assert echo(peer.port, peer.ae_title)


def kept_behind_its_back(peer, uid: str, data: bytes) -> None:
    """Stop *peer*, put the deflated CT data set *data* in its embedded archive as a
    release before this one kept it, rebuild its catalog (``pacsp2p catalog rebuild``,
    which reads what an archive holds whole), start it again under the address-space
    limit."""
    peer.stop()
    meta = Dataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    path = peer.data_dir / "archives" / "local" / "objects" / layout.relative(uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(128) + b"DICM" + fp.getvalue() + data)
    rebuilt = subprocess.run([str(Path(sys.executable).parent / "pacsp2p"), "catalog",
                              "rebuild", "--config", str(peer.config_path)],
                             capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr
    peer.restart()
    cap_address_space(peer.pid, HEADROOM)


def test_a_stored_deflate_bomb_fails_its_c_get_sub_operation_in_bounded_memory(tmp_path):
    study = datasets.uid("deflate-bomb-study")
    small, bomb = bomb_image(study, 1), bomb_image(study, 2)
    data = deflated(datasets.explicit_le(bomb), BOMB_MIB)
    assert len(data) < 2 * MIB
    with Peer(tmp_path / "kept", name="kept") as peer:
        assert store(peer, CTImageStorage, small.SOPInstanceUID,
                     deflated(datasets.explicit_le(small))) == [0]
        kept_behind_its_back(peer, bomb.SOPInstanceUID, data)
        assert {small.SOPInstanceUID, bomb.SOPInstanceUID} <= held(peer)
        with RssPeak(peer.pid) as rss:
            final, _, received = get(peer, study, ExplicitVRLittleEndian)
        grown = rss.peak - rss.first
        assert grown < GROWTH_KIB, f"the peer grew by {grown} KiB"
        assert final.Status == 0xB000, hex(final.Status)
        assert (final.NumberOfCompletedSuboperations,
                final.NumberOfFailedSuboperations) == (1, 1)
        assert [str(d.SOPInstanceUID) for d in received] == [small.SOPInstanceUID]
        assert received[0].PixelData == small.PixelData
        assert echo(peer.port, peer.ae_title)
        log_is_clean(peer)


def rejection_note(study: str, rejected: Dataset) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = KOS_SOP_CLASS, datasets.uid("deflate-kos", study)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, datasets.uid("deflate-kos-series")
    ds.PatientID, ds.PatientName, ds.Modality = "DEFLATEBOMB", "BOMB", "KO"
    ds.SeriesNumber, ds.InstanceNumber, ds.ValueType = 99, 1, "CONTAINER"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113001", "DCM"
    code.CodeMeaning = "Rejected for Quality Reasons"
    ds.ConceptNameCodeSequence = Sequence([code])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = (CTImageStorage,
                                                               rejected.SOPInstanceUID)
    series = Dataset()
    series.SeriesInstanceUID = rejected.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([ref])
    evidence = Dataset()
    evidence.StudyInstanceUID = study
    evidence.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    return ds


def test_a_deflated_rejection_note_with_a_gigabyte_of_pixels_is_refused_in_bounded_memory(
        peer):
    study = datasets.uid("deflate-kos-study")
    image = bomb_image(study, 1)
    packed = deflated(datasets.explicit_le(image))
    assert store(peer, CTImageStorage, image.SOPInstanceUID, packed) == [0]
    note = rejection_note(study, image)
    data = deflated(datasets.explicit_le(note), BOMB_MIB)
    with RssPeak(peer.pid) as rss:
        statuses = store(peer, KOS_SOP_CLASS, note.SOPInstanceUID, data)
    grown = rss.peak - rss.first
    assert grown < GROWTH_KIB, f"the peer grew by {grown} KiB"
    assert statuses == [0xC000]
    assert note.SOPInstanceUID not in held(peer)
    assert image.SOPInstanceUID in held(peer)             # nothing rejected by it
    small = rejection_note(study, image)                  # the same note, no pixels
    assert store(peer, KOS_SOP_CLASS, small.SOPInstanceUID,
                 deflated(datasets.explicit_le(small))) == [0]
    wait_until(lambda: image.SOPInstanceUID not in held(peer), 60,   # the rejection
               what="the rejected image deleted")                  # was acted on
    assert echo(peer.port, peer.ae_title)
    log_is_clean(peer)


def test_a_value_pydicom_cannot_re_encode_fails_its_sub_operation_not_sent_empty(peer):
    study = datasets.uid("reencode-study")
    good, odd = bomb_image(study, 1), bomb_image(study, 3)
    for ds in (good, odd):
        ds.SOPInstanceUID = datasets.uid("reencode", ds.InstanceNumber)
    raw = datasets.explicit_le(odd)
    pixels = raw.rindex(b"\xe0\x7f\x10\x00")
    private = (b"\x09\x00\x10\x00LO\x04\x00ODD " +        # (0009,0010) creator
               b"\x09\x00\x01\x10US\x03\x00\x01\x02\x03" +  # (0009,1001) US of 3 bytes
               b"\x09\x00\x02\x10US\x03\x00\x04\x05\x06")   # and one more: a data set
    #                          of even length (one of odd length is refused since 7708c2b)
    raw = raw[:pixels] + private + raw[pixels:]
    assert raw.index(private) > raw.index(b"\x08\x00\x18\x00")   # after SOP Instance UID
    for ds, data in ((good, datasets.explicit_le(good)), (odd, raw)):
        assert store(peer, CTImageStorage, ds.SOPInstanceUID, data,
                     ExplicitVRLittleEndian) == [0]
    final, identifier, received = get(peer, study, ImplicitVRLittleEndian)
    assert [str(d.SOPInstanceUID) for d in received] == [good.SOPInstanceUID]
    assert final.Status == 0xB000, hex(final.Status)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert odd.SOPInstanceUID in str(identifier.FailedSOPInstanceUIDList)
    assert echo(peer.port, peer.ae_title)
    log_is_clean(peer)


def jpeg_ls_bomb(directory, study: str, side: int = 16384) -> bytes:
    """The data set of a *side* x *side* 16-bit image of zeros in JPEG-LS Lossless, made
    by DCMTK's dcmcjpls from a file written a MiB at a time (removed)."""
    ds = bomb_image(study, 4)
    for key in ("PixelData", "NumberOfFrames"):
        if key in ds:
            delattr(ds, key)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    meta = Dataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (CTImageStorage,
                                                                     ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    plain, packed = directory / "plain.dcm", directory / "jls.dcm"
    with open(plain, "wb") as f:
        f.write(bytes(128) + b"DICM" + fp.getvalue() + datasets.explicit_le(ds))
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, side * side * 2))
        zeros = bytes(MIB)
        for _ in range(side * side * 2 // MIB):
            f.write(zeros)
    subprocess.run(["/usr/bin/dcmcjpls", str(plain), str(packed)], check=True, timeout=600)
    plain.unlink()
    data = packed.read_bytes()
    offset, ts = file_meta(data)
    assert ts == JPEGLSLossless
    return data[offset:]


@pytest.mark.parametrize("rows", [16384, 8])
def test_a_stored_jpeg_ls_bomb_fails_its_c_get_sub_operation_in_bounded_memory(peer,
                                                                               tmp_path,
                                                                               rows):
    study = datasets.uid("jls-bomb-study", rows)
    small = bomb_image(study, 1)
    data = jpeg_ls_bomb(tmp_path, study)
    for elem in (0x0010, 0x0011):                    # Rows, Columns: what they say
        tag = struct.pack("<HH2sH", 0x0028, elem, b"US", 2)
        data = data.replace(tag + struct.pack("<H", 16384), tag + struct.pack("<H", rows))
    assert len(data) < 64 << 10
    bomb_uid = datasets.uid("deflate-bomb", study, 4)
    assert store(peer, CTImageStorage, small.SOPInstanceUID, datasets.explicit_le(small),
                 ExplicitVRLittleEndian) == [0]
    assert store(peer, CTImageStorage, bomb_uid, data, JPEGLSLossless) == [0]   # kept
    with RssPeak(peer.pid) as rss:
        final, _, received = get(peer, study, ExplicitVRLittleEndian)
    grown = rss.peak - rss.first
    assert grown < GROWTH_KIB, f"the peer grew by {grown} KiB"
    assert final.Status == 0xB000, hex(final.Status)
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert [str(d.SOPInstanceUID) for d in received] == [small.SOPInstanceUID]
    assert echo(peer.port, peer.ae_title)
    log_is_clean(peer)
