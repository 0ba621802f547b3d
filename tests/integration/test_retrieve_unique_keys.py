"""A C-MOVE or C-GET names what it retrieves by the unique key of its level (PS3.4
C.4.2.1.4.1), against a real peer, DCMTK storescp as the destination and getscu.

The facade resolved a retrieve's identifier as a C-FIND's: a C-MOVE at STUDY level with
an empty StudyInstanceUID (or "*", or only a PatientName) moved every study the catalog
held — up to the facade's 65,535 sub-operations — to the destination; dcmqrscp refuses
it, Orthanc moves nothing. Now it is refused 0xA900 (Identifier does not match SOP
Class) and nothing is sent; a list of UIDs, keys of the levels above left out, and an
AccessionNumber at STUDY level (as Orthanc takes it) still retrieve what they name.
"""
from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from pacsp2p.testing import Peer, StoreSCP, datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import patience


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    dest_dir = tmp_path_factory.mktemp("unique-dest")
    with StoreSCP(dest_dir) as dest, \
            Peer(tmp_path_factory.mktemp("unique"), name="unique",
                 destinations={"STORESCP": dest.address}) as peer:
        studies = []
        ctx = [build_context(CTImageStorage, ImplicitVRLittleEndian)]
        with dn.association(peer.port, peer.ae_title, ctx) as a:
            for i in range(3):
                ds = datasets.make_image("CT", size=8, seed=i, PatientID=f"UNIQ{i}",
                                         PatientName="UNIQUE^KEYS",
                                         AccessionNumber=f"ACC{i}",
                                         transfer_syntax=ImplicitVRLittleEndian)
                assert a.send_c_store(ds).Status == 0
                studies.append(ds)
        yield peer, dest, studies


def move(peer, level="STUDY", **keys):
    query = Dataset()
    query.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(query, k, v)
    with dn.association(peer.port, peer.ae_title, [build_context(MOVE)],
                        timeout=patience(120)) as a:
        return [s for s, _ in a.send_c_move(query, "STORESCP", MOVE)]


def received(dest) -> set[str]:
    got = {dn.sop_uid(p) for p in dest.files()}
    dn.clear(dest.directory)
    return got


@pytest.mark.parametrize("keys", [
    {"StudyInstanceUID": ""},
    {"StudyInstanceUID": "*"},
    {"StudyInstanceUID": "", "PatientName": "UNIQUE*"},
    {"PatientName": "UNIQUE^KEYS"},
    {"StudyInstanceUID": "", "AccessionNumber": "ACC*"},
])
def test_a_study_move_without_its_unique_key_is_refused_and_moves_nothing(site, keys):
    peer, dest, _ = site
    received(dest)
    statuses = move(peer, **keys)
    assert [s.Status for s in statuses] == [0xA900], [hex(s.Status) for s in statuses]
    assert received(dest) == set()


@pytest.mark.parametrize("level, keys", [
    ("SERIES", {"StudyInstanceUID": "", "SeriesInstanceUID": ""}),
    ("IMAGE", {"SOPInstanceUID": ""}),
    ("SERIES", {"SeriesInstanceUID": "1.2.3\\"}),            # an empty value in a list
])
def test_a_lower_level_move_without_its_unique_key_is_refused(site, level, keys):
    peer, dest, _ = site
    received(dest)
    assert [s.Status for s in move(peer, level, **keys)] == [0xA900]
    assert received(dest) == set()


def test_what_names_its_instances_is_still_moved(site):
    peer, dest, studies = site
    received(dest)
    two = "\\".join(ds.StudyInstanceUID for ds in studies[:2])
    assert move(peer, StudyInstanceUID=two)[-1].Status == 0x0000
    assert received(dest) == {ds.SOPInstanceUID for ds in studies[:2]}
    assert move(peer, AccessionNumber="ACC2")[-1].Status == 0x0000      # as Orthanc
    assert received(dest) == {studies[2].SOPInstanceUID}
    third = studies[2]
    assert move(peer, "SERIES", SeriesInstanceUID=third.SeriesInstanceUID)[-1].Status == 0
    assert received(dest) == {third.SOPInstanceUID}


def test_a_get_without_its_unique_key_is_refused_by_getscu(site, tmp_path):
    peer, _, studies = site
    out = tmp_path / "got"
    refused = dn.getscu(peer.port, peer.ae_title, out, {"QueryRetrieveLevel": "STUDY",
                                                        "StudyInstanceUID": ""})
    said = (refused.stdout + refused.stderr).lower()
    assert "datasetdoesnotmatchsopclass" in said, said             # DCMTK's name of 0xA900
    assert not list(out.glob("*"))
    named = dn.getscu(peer.port, peer.ae_title, out, {
        "QueryRetrieveLevel": "STUDY", "StudyInstanceUID": studies[0].StudyInstanceUID})
    assert named.returncode == 0, named.stdout + named.stderr
    assert {dn.sop_uid(p) for p in out.glob("*")} == {studies[0].SOPInstanceUID}
