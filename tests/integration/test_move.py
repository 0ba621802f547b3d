"""C-MOVE through the native SCU (pacsp2p.dicom.move + transfer.deliver): a destination
that does not accept a stored syntax gets the same content converted, an unreachable
destination and a bad identifier give failure statuses, a large instance arrives intact.
"""
from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import build_context
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from pacsp2p.testing import StoreSCP, dataset_sha256, datasets, free_port
from pacsp2p.testing import dicomnet as dn

STUDY = datasets.uid("move-study")


def study_files(directory: Path) -> list[Path]:
    out = []
    for i, (ts, size) in enumerate([(ExplicitVRLittleEndian, 64), (RLELossless, 64),
                                    (ImplicitVRLittleEndian, 64),
                                    (ExplicitVRLittleEndian, 1100)], 1):   # 2.4 MB
        ds = datasets.make_image("CT", size=size, transfer_syntax=ts, seed=i,
                                 StudyInstanceUID=STUDY, PatientID="MV0001",
                                 SeriesInstanceUID=datasets.uid("move-series", i),
                                 SOPInstanceUID=datasets.uid("move-sop", i), InstanceNumber=i)
        out.append(datasets.write(ds, directory / f"{i}.dcm"))
    return out


def move(peer, dest_ae: str, keys=None):
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for k, v in (keys or {"StudyInstanceUID": STUDY}).items():
        setattr(query, k, v)
    with dn.association(peer.port, peer.ae_title, [build_context(MOVE)]) as a:
        return list(a.send_c_move(query, dest_ae, MOVE))


def test_unaccepted_syntax_is_converted_and_the_rest_byte_identical(make_peer, tmp_path):
    files = study_files(tmp_path / "study")
    # "+x=" after the helper's "+xa": storescp accepts uncompressed syntaxes only
    with StoreSCP(tmp_path / "in", extra=["+x="]) as dest:
        peer = make_peer(destinations={"STORESCP": dest.address})
        dn.store_unconverted(peer.port, peer.ae_title, files)
        responses = move(peer, "STORESCP")
        final = responses[-1][0]
        assert final.Status == 0x0000, hex(final.Status)
        assert final.NumberOfCompletedSuboperations == len(files)
        got = dn.by_sop_uid(dest.files())
    assert sorted(got) == sorted(dn.by_sop_uid(files))
    for path in files:
        uid = dn.sop_uid(path)
        if dn.transfer_syntax(path) == RLELossless:
            assert dn.transfer_syntax(got[uid]) != RLELossless
            assert dn.content_differences(path, got[uid]) == []
        else:
            assert dn.transfer_syntax(got[uid]) == dn.transfer_syntax(path)
            assert dataset_sha256(got[uid]) == dataset_sha256(path)
    log = peer.log_path.read_text()
    assert "destination did not accept" in log and "C-MOVE 4 instances" in log


def test_unreachable_destination_is_refused(make_peer, tmp_path):
    files = study_files(tmp_path / "study")[:1]
    peer = make_peer(destinations={"GONE": f"127.0.0.1:{free_port()}"})
    dn.store_unconverted(peer.port, peer.ae_title, files)
    responses = move(peer, "GONE")
    assert [s.Status for s, _ in responses] == [0xA801]
    assert "cannot connect to GONE" in peer.log_path.read_text()


def test_identifier_with_an_unknown_level_does_not_match(make_peer, tmp_path):
    with StoreSCP(tmp_path / "in") as dest:
        peer = make_peer(destinations={"STORESCP": dest.address})
        query = Dataset()
        query.QueryRetrieveLevel = "FRAME"
        query.StudyInstanceUID = STUDY
        with dn.association(peer.port, peer.ae_title, [build_context(MOVE)]) as a:
            responses = list(a.send_c_move(query, "STORESCP", MOVE))
    assert [s.Status for s, _ in responses] == [0xA900]
