"""Self-checks of pacsp2p.testing's synthetic DICOM, meta-skipping hash and TOML writer."""
from __future__ import annotations

import tomllib

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from pacsp2p.testing import dataset_sha256, toml
from pacsp2p.testing import datasets


def test_sample_files_are_valid_and_typed(tmp_path):
    files = datasets.sample_files(tmp_path)
    ts = {name: dcmread(p).file_meta.TransferSyntaxUID for name, p in files.items()}
    assert ts["ct"] == ExplicitVRLittleEndian
    assert ts["ct_implicit"] == ImplicitVRLittleEndian
    assert ts["rle"] == RLELossless
    ct = dcmread(files["ct"])
    assert (ct.Rows, ct.Columns, ct.BitsAllocated) == (512, 512, 16)
    assert len({dcmread(p).SOPInstanceUID for p in files.values()}) == len(files)


def test_rle_is_lossless(tmp_path):
    raw = datasets.make_image("CT", size=64, seed=7)
    rle = datasets.make_image("CT", size=64, seed=7, transfer_syntax=RLELossless)
    path = datasets.write(rle, tmp_path / "rle.dcm")
    assert np.array_equal(dcmread(path).pixel_array, raw.pixel_array)
    assert dcmread(path).SOPInstanceUID == raw.SOPInstanceUID


def test_private_tags_present(tmp_path):
    path = datasets.write(datasets.make_image("MR", size=16, private=True), tmp_path / "p.dcm")
    ds = dcmread(path)
    block = ds.private_block(0x0009, datasets.PRIVATE_CREATOR)
    assert block[0x01].value == "private text value"
    assert block[0x02].value == 4242
    assert len(block[0x05].value) == 1


def test_make_study_and_determinism(tmp_path):
    a = datasets.make_study(tmp_path / "a", series=[("CT", 2, ExplicitVRLittleEndian),
                                                     ("MR", 1, ImplicitVRLittleEndian)], size=16)
    b = datasets.make_study(tmp_path / "b", series=[("CT", 2, ExplicitVRLittleEndian),
                                                     ("MR", 1, ImplicitVRLittleEndian)], size=16)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert len({dcmread(p).StudyInstanceUID for p in a}) == 1
    assert [dcmread(p).Modality for p in a] == ["CT", "CT", "MR"]


def test_find_corpus_shape(tmp_path):
    corpus = datasets.make_find_corpus(tmp_path)
    assert len(corpus.paths) == len(corpus.records) > 50
    assert len(corpus.patients()) == 12
    modalities = {r["Modality"] for r in corpus.records}
    assert {"CT", "MR", "US", "CR", "PT"} <= modalities
    multi = [s for s in corpus.studies()
             if len({r["Modality"] for r in corpus.records if r["StudyInstanceUID"] == s}) > 1]
    assert multi, "a study spread over several modalities"
    again = datasets.make_find_corpus(tmp_path / "again")
    assert again.records == corpus.records


def test_dataset_sha256_ignores_file_meta(tmp_path):
    ds = datasets.make_image("MR", size=16)
    one = datasets.write(ds, tmp_path / "one.dcm")
    ds.file_meta.ImplementationVersionName = "OTHER_NAME_1"
    two = datasets.write(ds, tmp_path / "two.dcm")
    assert one.read_bytes() != two.read_bytes()
    assert dataset_sha256(one) == dataset_sha256(two)
    ds.PatientName = "CHANGED"
    three = datasets.write(ds, tmp_path / "three.dcm")
    assert dataset_sha256(three) != dataset_sha256(one)


def test_toml_roundtrip():
    data = {"peer": {"name": "a b", "data_dir": "/x/\"q\""},
            "facade": {"port": 1, "allowed_calling_aes": [], "on": True},
            "destinations": {"STORESCP": "127.0.0.1:1"},
            "archives": [{"name": "o", "weight": 1.5}, {"name": "e"}]}
    assert tomllib.loads(toml.dumps(data)) == data


def test_uid_is_injective_and_valid():
    """Issue 19.8: the parts were joined without a separator, so uid("x", 1, 2, 15) ==
    uid("x", 12, 1, 5) and a 20k-instance test set had 580 colliding UIDs."""
    from pacsp2p.validate import is_uid
    assert datasets.uid("x", 1, 2, 15) != datasets.uid("x", 12, 1, 5)
    assert datasets.uid("ab", "c") != datasets.uid("a", "bc") != datasets.uid("abc")
    assert datasets.uid("x", 1, 2) == datasets.uid("x", 1, 2)        # deterministic
    assert datasets.uid("x", 7) == datasets.uid("x", "7")            # parts by their str()
    # every split of the same digits, as the 20k-instance set made them: no collision
    parts = [("s", a, b, c) for a in range(40) for b in range(40) for c in range(20)]
    uids = {datasets.uid(*p) for p in parts}
    assert len(uids) == len(parts)
    assert all(is_uid(u) for u in uids)
