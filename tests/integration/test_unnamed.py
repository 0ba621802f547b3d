"""A lone peer's received files have no name until they are kept (``pacsp2p.unnamed``):
made ahead with O_TMPFILE, written and fsynced through their descriptor and linked once,
into ``objects/`` — nothing is made, renamed or removed in ``incoming``, where the
spares were named files before. A data set whose header pydicom must read (ISO 2022
character sets) is read through the descriptor; one written in several jobs (a CT
larger than a write job) is named in ``incoming`` first and kept as before. Real peer
(twistd), real storescu and findscu; every copy byte-identical."""
from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.dicom.header import content_hash
from pacsp2p.testing import charsets, dataset_sha256, datasets
from pacsp2p.testing.dcmtk import findscu, storescu


def test_a_lone_peer_keeps_files_made_with_no_name(make_peer, tmp_path):
    peer = make_peer()
    sent = charsets.write_all(tmp_path / "send" / "charsets")
    sent += datasets.make_study(tmp_path / "send" / "mr", patient_id="UNNAMED1", size=16,
                                series=[("MR", 20, ExplicitVRLittleEndian)])
    sent += datasets.make_study(tmp_path / "send" / "ct", patient_id="UNNAMED2", size=512,
                                series=[("CT", 2, ExplicitVRLittleEndian)])
    assert sum(p.stat().st_size for p in sent[-2:]) > 2 * (256 << 10)   # several jobs each
    storescu(peer.port, peer.ae_title, [tmp_path / "send"])
    objects = peer.data_dir / "archives" / "local" / "objects"
    kept = {content_hash(p)[0]: p for p in objects.rglob("*.dcm")}
    assert sorted(kept) == sorted(dataset_sha256(p) for p in sent)
    assert all(p.stat().st_nlink == 1 for p in kept.values())
    # no spare, no received file by name in incoming (before: the named spares)
    assert [p.name for p in (peer.data_dir / "incoming").iterdir()] == []
    rows, _ = findscu(peer.port, peer.ae_title, {"QueryRetrieveLevel": "PATIENT",
                                                  "PatientID": "JIS-YAMADA-T",
                                                  "PatientName": ""}, model="P")
    assert [str(r.PatientName) for r in rows] == [charsets.BY_PID["JIS-YAMADA-T"].name]
