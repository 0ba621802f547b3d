"""Requests a careless or hostile requestor sends on an association a real peer
accepted: a query/retrieve request on a presentation context of another SOP class, or
naming a SOP class other than its context's (PS3.7 9.1.2.1: the Affected SOP Class UID
is the context's abstract syntax). Refused 0x0122, as C-STORE already was, rather than
served with whatever information model the peer guessed.
"""
from __future__ import annotations

import io

import pytest
from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PatientFind,
)
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as StudyMove

from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn

STUDY = datasets.uid("odd-requests-study")


def send(assoc, req, cx_class: str) -> list:
    """Send *req* on the accepted context of *cx_class*: the statuses of its responses."""
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == cx_class)
    return dn.send_request(assoc, req, cx.context_id)


def request(kind, sop_class: str):
    req = kind()
    req.MessageID, req.Priority, req.AffectedSOPClassUID = 7, 2, sop_class
    if kind is C_MOVE:
        req.MoveDestination = "STORESCP"
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", STUDY
    req.Identifier = io.BytesIO(encode(query, False, True))
    return req


@pytest.mark.parametrize("kind, sop_class, on", [
    (C_FIND, StudyFind, StudyGet),          # a C-FIND on the C-GET context
    (C_FIND, StudyFind, CTImageStorage),    # ... on a storage context
    (C_FIND, PatientFind, StudyFind),       # patient root named on the study root context
    (C_MOVE, StudyMove, StudyFind),         # a C-MOVE on the C-FIND context
    (C_GET, StudyGet, StudyMove),           # a C-GET on the C-MOVE context
])
def test_query_retrieve_on_a_context_of_another_class_is_refused(make_peer, tmp_path, kind,
                                                                 sop_class, on):
    peer = make_peer(destinations={"STORESCP": "127.0.0.1:9"})
    ds = datasets.make_image("CT", size=8, StudyInstanceUID=STUDY, PatientID="ODD1")
    storescu(peer.port, peer.ae_title, [datasets.write(ds, tmp_path / "one.dcm")])
    syntaxes = ["1.2.840.10008.1.2"]
    with dn.association(peer.port, peer.ae_title, [
            build_context(c, syntaxes) for c in
            (StudyFind, StudyGet, StudyMove, CTImageStorage)]) as assoc:
        assert send(assoc, request(kind, sop_class), on) == [0x0122]
        # the same association still answers a request made right
        assert send(assoc, request(C_FIND, StudyFind), StudyFind) == [0xFF00, 0x0000]


def test_invalid_values_are_not_each_a_pydicom_warning(peer):
    """Every distinct invalid value pydicom decoded was a UserWarning with the value in
    it: a log line with a URL, and an entry of the warnings registry kept for ever
    (3,000 C-FINDs: +0.9 MB RSS, +1.5 MB log). The peer's own refusal line stays, at
    most 10 of them per 10 s (``Operation.warn``)."""
    import pydicom.config
    n = 200
    with dn.association(peer.port, peer.ae_title, [build_context(StudyFind)]) as assoc:
        mode = pydicom.config.settings.writing_validation_mode
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
        try:
            for i in range(n):
                query = Dataset()
                query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", f"1.2.{i}.*"
                statuses = [s.Status for s, _ in assoc.send_c_find(query, StudyFind)]
                assert statuses == [0xA900]
        finally:
            pydicom.config.settings.writing_validation_mode = mode
    log = peer.log_path.read_text()
    assert 0 < log.count("not a valid UID") < n
    assert "UserWarning" not in log


def test_a_series_uid_held_in_another_study_is_refused(peer):
    """A series UID names one series of one study (PS3.3 C.7.3.1). An instance of
    another patient's study reusing it (a modality's bug, a careless anonymiser) was
    kept, and moved the series — every instance stored before — into its study: the first
    patient vanished from C-FIND. Now it is refused and what was held stays put."""
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind
    series = datasets.uid("reused-series")

    def image(tag, patient, study, series_uid=series):
        return datasets.make_image("CT", size=8, PatientID=patient, PatientName=patient,
                                   StudyInstanceUID=datasets.uid(study),
                                   SeriesInstanceUID=series_uid,
                                   SOPInstanceUID=datasets.uid("reused", tag))

    def held(assoc, patient):
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientID = "IMAGE", patient
        query.StudyInstanceUID = query.SeriesInstanceUID = query.SOPInstanceUID = ""
        return sorted((r.StudyInstanceUID, r.SOPInstanceUID) for _, r in assoc.send_c_find(
            query, PatientRootQueryRetrieveInformationModelFind) if r is not None)

    first, second = image(1, "FIRST", "study-1"), image(2, "FIRST", "study-1")
    stranger = image(3, "SECOND", "study-2")
    with dn.association(peer.port, peer.ae_title, [
            build_context(CTImageStorage),
            build_context(PatientRootQueryRetrieveInformationModelFind)]) as assoc:
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(stranger).Status == 0xC000
        assert assoc.send_c_store(second).Status == 0x0000   # its own study: kept
        stranger.SeriesInstanceUID = datasets.uid("its-own-series")
        assert assoc.send_c_store(stranger).Status == 0x0000
        assert held(assoc, "FIRST") == sorted(
            (str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)) for ds in (first, second))
        assert held(assoc, "SECOND") == [(str(stranger.StudyInstanceUID),
                                          str(stranger.SOPInstanceUID))]
    assert "is held in another study" in peer.log_path.read_text()
