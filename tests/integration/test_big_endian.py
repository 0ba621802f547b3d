"""Explicit VR Big Endian instances re-encoded for a retrieve keep their pixel values
(fourteenth hostile-input session: DCMTK clients with their odd options).

A modality sends with ``storescu -xb`` (Big Endian first): the peer keeps the data set
as sent. A C-GET requestor that accepts Little Endian only (``getscu``'s default) gets it
re-encoded by ``part10.convert``, which turned every number to the new byte order but
copied OW values (Pixel Data of 16 bits, an icon's pixels in a sequence) as they came:
every pixel had its two bytes swapped (-999 arrived as 6652). The same the other way:
a Little Endian instance to a requestor accepting Big Endian only. DCMTK's ``dcmconv``
(+te, +tb) of the sent file is the yardstick: the same content, pixels included.
"""
from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from pacsp2p.testing import Peer, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.dcmtk import dcmtk, storescu


def with_icon(ds: Dataset) -> Dataset:
    """*ds* with a 4 x 4 16-bit icon (OW pixels inside a sequence), as scanners add."""
    icon = Dataset()
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.Rows = icon.Columns = 4
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 16, 16, 15, 0
    icon.PixelData = bytes(range(1, 33))
    icon["PixelData"].VR = "OW"
    ds.IconImageSequence = [icon]
    return ds


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigendian-files")
    made = {}
    for i, name in enumerate(("big", "little")):
        ds = with_icon(datasets.make_image("CT", size=16, seed=i, PatientID=f"ENDIAN{i}",
                                           transfer_syntax=ExplicitVRLittleEndian))
        made[name] = datasets.write(ds, d / f"{name}-source.dcm")
    dcmtk("dcmconv", "+tb", made["big"], d / "big.dcm", check=True)
    dcmtk("dcmconv", "+te", d / "big.dcm", d / "big-as-little.dcm", check=True)
    dcmtk("dcmconv", "+tb", made["little"], d / "little-as-big.dcm", check=True)
    with Peer(tmp_path_factory.mktemp("bigendian"), name="bigendian") as peer:
        storescu(peer.port, peer.ae_title, [d / "big.dcm"], required=False,
                 extra=["-R", "-xb"])
        storescu(peer.port, peer.ae_title, [made["little"]], required=False,
                 extra=["-R", "-xe"])
        yield peer, d


def test_a_big_endian_instance_is_kept_as_sent(site):
    peer, d = site
    kept = dn.archive_files(peer.data_dir)
    assert ExplicitVRBigEndian in {dn.transfer_syntax(p) for p in kept}


def test_a_big_endian_instance_to_a_little_endian_c_get_keeps_its_pixels(site, tmp_path):
    peer, d = site
    study = str(dcmread(d / "big.dcm").StudyInstanceUID)
    proc = dn.getscu(peer.port, peer.ae_title, tmp_path, {"QueryRetrieveLevel": "STUDY",
                                                          "StudyInstanceUID": study})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    [got] = list(tmp_path.iterdir())
    assert dn.transfer_syntax(got) == ExplicitVRLittleEndian
    expected = dcmread(d / "big-as-little.dcm")
    received = dcmread(got)
    assert received.PixelData == expected.PixelData, received.PixelData[:8].hex()
    assert received.IconImageSequence[0].PixelData == \
        expected.IconImageSequence[0].PixelData
    assert dn.content_differences(got, d / "big-as-little.dcm") == []


def test_a_little_endian_instance_to_a_big_endian_c_get_keeps_its_pixels(site):
    peer, d = site
    expected = dcmread(d / "little-as-big.dcm")
    final, _, received = dn.get_study(peer, str(expected.StudyInstanceUID),
                                      str(expected.SOPClassUID), ExplicitVRBigEndian)
    assert final.Status == 0x0000 and len(received) == 1, (hex(final.Status), received)
    [got] = received
    assert got.PixelData == expected.PixelData, got.PixelData[:8].hex()
    assert got.IconImageSequence[0].PixelData == expected.IconImageSequence[0].PixelData
    assert got.RescaleIntercept == expected.RescaleIntercept
