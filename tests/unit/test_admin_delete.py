"""``POST /delete`` on the admin endpoint, and reading IOCM rejection notes.

The admin site is driven with twisted.web's DummyRequest and a stand-in cluster: a write
action is served only on a loopback-bound endpoint (403 otherwise), wants a JSON body
(415 otherwise), refuses GET (405) and a scope that is not one (400). Rejection notes are
built with pydicom: the four IOCM codes are recognised, another Key Object Selection
document is not one, a note without a valid reference is refused.
"""
from __future__ import annotations

import io
import json

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from pacsp2p.admin.web import is_loopback, site
from pacsp2p.dicom.rejection import KOS_SOP_CLASS, BadRejection, read_rejection
from pacsp2p.transfer.delete import DeleteError, check_scope
from pacsp2p.types import Scope


class FakeCluster:
    def __init__(self):
        self.calls = []

    status = digest = where = None

    def delete(self, scope, reason):
        check_scope(scope)
        self.calls.append((scope, reason))
        return defer.succeed(len(scope.uids))


def post(bind, body, ctype=b"application/json", client="127.0.0.1", method=b"POST"):
    cluster = FakeCluster()
    root = site(cluster, bind=bind).resource
    request = DummyRequest([b"delete"])
    request.method = method
    request.client = IPv4Address("TCP", client, 40000)
    request.content = io.BytesIO(json.dumps(body).encode() if not isinstance(body, bytes)
                                 else body)
    if ctype:
        request.requestHeaders.setRawHeaders(b"content-type", [ctype])
    resource = root.getChildWithDefault(b"delete", request)
    result = resource.render(request)
    if result is not server.NOT_DONE_YET:
        request.write(result)
        request.finish()
    code = request.responseCode or 200
    return code, json.loads(b"".join(request.written) or b"null"), cluster


STUDY = {"level": "STUDY", "uids": ["1.2.3.4"], "reason": "test"}


def test_delete_on_a_loopback_endpoint():
    code, body, cluster = post("127.0.0.1", STUDY)
    assert code == 200 and body["deleted"] == 1
    assert cluster.calls == [(Scope("STUDY", ("1.2.3.4",)), "test")]


@pytest.mark.parametrize("bind", ["0.0.0.0", "10.1.2.3", "::", "example.org"])
def test_delete_is_refused_when_the_endpoint_is_bound_elsewhere(bind):
    code, body, cluster = post(bind, STUDY)
    assert code == 403 and "loopback" in body["error"] and not cluster.calls


def test_delete_from_another_host_is_refused():
    code, _, cluster = post("127.0.0.1", STUDY, client="192.0.2.7")
    assert code == 403 and not cluster.calls


def test_delete_wants_json_and_post():
    assert post("127.0.0.1", STUDY, ctype=b"application/x-www-form-urlencoded")[0] == 415
    assert post("127.0.0.1", STUDY, ctype=None)[0] == 415
    assert post("127.0.0.1", STUDY, method=b"GET")[0] == 405


@pytest.mark.parametrize("body", [
    {"level": "STUDY", "uids": ["1.02.3"]},             # not a UID
    {"level": "PATIENT", "uids": ["1.2.3"]},            # no such level
    {"level": "STUDY", "uids": []},
    {"level": "STUDY", "uids": "1.2.3"},
    b"not json", b"[1, 2]"])
def test_a_scope_that_is_not_one_is_refused(body):
    code, answer, cluster = post("127.0.0.1", body)
    assert code == 400 and answer["error"] and not cluster.calls


def test_loopback_addresses():
    assert all(is_loopback(a) for a in ("127.0.0.1", "127.1.2.3", "::1", "localhost"))
    assert not any(is_loopback(a) for a in ("0.0.0.0", "", None, "::", "10.0.0.1", "x"))


def test_scope_checks():
    with pytest.raises(DeleteError):
        check_scope(Scope("STUDY", tuple(f"1.2.{i}" for i in range(10_001))))
    assert check_scope(Scope("IMAGE", ("1.2.3", "1.2.3"))) == ("SOPInstanceUID", ["1.2.3"])


# -- rejection notes ---------------------------------------------------------------------------

def kos(tmp_path, code="113001", scheme="DCM", refs=("1.2.3.1", "1.2.3.2"),
        sop_class=KOS_SOP_CLASS):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, "1.2.9.9"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.9"
    ds.Modality = "KO"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator = code, scheme
    concept.CodeMeaning = "x"
    ds.ConceptNameCodeSequence = Sequence([concept])
    items = []
    for uid in refs:
        r = Dataset()
        r.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        r.ReferencedSOPInstanceUID = uid
        items.append(r)
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.0"
    series.ReferencedSOPSequence = Sequence(items)
    study = Dataset()
    study.StudyInstanceUID = "1.2.3"
    study.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"kos-{code}-{len(refs)}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("code", ["113001", "113037", "113038", "113039"])
def test_the_four_rejection_codes(tmp_path, code):
    r = read_rejection(kos(tmp_path, code))
    assert r.code == code and r.instances == ("1.2.3.1", "1.2.3.2")
    assert r.studies == ("1.2.3",) and r.reason.startswith(code)


def test_other_documents_are_no_rejection(tmp_path):
    assert read_rejection(kos(tmp_path, "113000")) is None          # "Of Interest"
    assert read_rejection(kos(tmp_path, "113001", scheme="99X")) is None
    assert read_rejection(kos(tmp_path, sop_class="1.2.840.10008.5.1.4.1.1.88.22")) is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_note_without_a_valid_reference_is_refused(tmp_path):
    with pytest.raises(BadRejection):
        read_rejection(kos(tmp_path, refs=("1.02.3", "x")))
    r = read_rejection(kos(tmp_path, refs=("1.2.3.1", "bad", "1.2.9.9")))   # itself too
    assert r.instances == ("1.2.3.1",)
