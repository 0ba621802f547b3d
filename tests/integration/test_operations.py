"""Operations (issue 16.2, 16.3): ``/metrics``, ``/health`` and the audit trail of a real
peer under real DCMTK traffic (storescu, findscu, getscu, movescu, echoscu; TCP_NODELAY=1).

- ``/metrics`` parses with ``prometheus_client.parser``; the C-STORE success counter
  equals the instances sent, the instances-in counter too, C-FIND/C-GET/C-MOVE are
  counted, latency histograms and the state families (catalog size, archives) are there;
- ``/health`` is 200 while the peer serves, 503 with a reason once the catalog file no
  longer opens (moved away: the test runs as root, for whom chmod 000 changes nothing),
  200 again once it is back;
- ``<data_dir>/audit.log`` has one JSON record per association and per operation (a
  C-STORE each, one C-FIND, one C-GET, one C-MOVE — never one per sub-operation) with the
  calling and called AE, the patient and the study UID; and the refused associations
  (an undeclared calling AE, a wrong called AE).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pacsp2p.testing import Peer, StoreSCP, dcmtk, echo, findscu, storescu
from pacsp2p.testing.datasets import make_study

PATIENT = "AUDIT-PID-7"
WAIT = 60.0                     # seconds at most for a record or a state to show up


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample of the exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    """The sum of the samples of *name* whose labels include *labels*."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def _records(peer) -> list[dict]:
    path = peer.data_dir / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_records(peer, pred, n: int = 1) -> list[dict]:
    deadline = time.monotonic() + WAIT
    while True:
        found = [r for r in _records(peer) if pred(r)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _ext(r: dict) -> dict:
    return r.get("pacsp2p", {})


def _objects(r: dict, id_type: str) -> list[str]:
    return [o["ParticipantObjectID"] for o in r.get("ParticipantObjectIdentification", [])
            if o["ParticipantObjectIDTypeCode"]["csd-code"] == id_type]


def _users(r: dict) -> dict:
    return {p["UserID"]: p for p in r["ActiveParticipant"]}


def test_metrics_health_and_audit_trail(tmp_path):
    files = make_study(tmp_path / "study", patient_id=PATIENT, patient_name="AUDIT^ME",
                       series=(("CT", 4, "1.2.840.10008.1.2.1"),
                               ("MR", 3, "1.2.840.10008.1.2.1")))
    from pydicom import dcmread
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    scp = StoreSCP(tmp_path / "received", ae_title="MOVEDEST").start()
    try:
        with Peer(tmp_path / "peer", destinations={"MOVEDEST": f"127.0.0.1:{scp.port}"},
                  config={"audit": {"max_bytes": 1 << 20, "backups": 2}}) as peer:
            _run(peer, files, study_uid, tmp_path)
    finally:
        scp.stop()


def _run(peer, files, study_uid, tmp_path):
    # -- traffic: C-STORE x7, C-FIND, C-GET, C-MOVE, C-ECHO ------------------------------
    storescu(peer.port, peer.ae_title, [tmp_path / "study"], aet="MODALITY1")
    found, _ = findscu(peer.port, peer.ae_title,
                       {"QueryRetrieveLevel": "STUDY", "PatientID": PATIENT,
                        "StudyInstanceUID": ""}, aet="VIEWER1")
    assert [str(d.StudyInstanceUID) for d in found] == [study_uid]
    got = tmp_path / "got"
    got.mkdir()
    proc = dcmtk("getscu", "-S", "-aet", "VIEWER1", "-aec", peer.ae_title, "-od", got,
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                 "127.0.0.1", peer.port)
    assert proc.returncode == 0, proc.stderr
    assert len(list(got.iterdir())) == len(files)
    proc = dcmtk("movescu", "-S", "-aet", "VIEWER1", "-aec", peer.ae_title, "-aem",
                 "MOVEDEST", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", peer.port)
    assert proc.returncode == 0, proc.stderr
    # refused associations: a wrong called AE title (check_called_ae is on by default)
    assert not echo(peer.port, "NOTTHEPEER", aet="INTRUDER")

    # -- /metrics -----------------------------------------------------------------------
    status, text = _get(peer.admin_url + "/metrics")
    assert status == 200
    s = _samples(text)
    n = len(files)
    assert _value(s, "pacsp2p_dimse_operations_total", service="C-STORE",
                  status="success") == n
    assert _value(s, "pacsp2p_instances_total", direction="in", service="C-STORE") == n
    assert _value(s, "pacsp2p_bytes_total", direction="in", service="C-STORE") > 0
    assert _value(s, "pacsp2p_dimse_operations_total", service="C-FIND",
                  status="success") == 1
    assert _value(s, "pacsp2p_dimse_operations_total", service="C-GET",
                  status="success") == 1
    assert _value(s, "pacsp2p_instances_total", direction="out", service="C-GET") == n
    assert _value(s, "pacsp2p_instances_total", direction="out", service="C-MOVE") == n
    assert _value(s, "pacsp2p_dimse_operation_seconds_count", service="C-STORE") == n
    assert _value(s, "pacsp2p_store_quorum_wait_seconds_count") == n
    assert _value(s, "pacsp2p_associations_total", outcome="rejected") >= 1
    assert _value(s, "pacsp2p_catalog_rows", table="instances") == n
    assert _value(s, "pacsp2p_catalog_rows", table="studies") == 1
    assert _value(s, "pacsp2p_archive_up", archive="local") == 1
    assert _value(s, "pacsp2p_archive_free_bytes", archive="local") > 0
    assert _value(s, "pacsp2p_hinted_handoffs_owed") == 0
    assert _value(s, "pacsp2p_up") == 1
    assert ("pacsp2p_scrub_running", frozenset()) in s          # scrub progress exported
    assert _value(s, "pacsp2p_scrub_copies_total", outcome="damaged") == 0
    assert ("pacsp2p_associations_open", frozenset()) in s

    # -- the audit trail ----------------------------------------------------------------
    stores = _wait_records(peer, lambda r: _ext(r).get("service") == "C-STORE", n)
    assert len(stores) == n, "one record per C-STORE"
    for r in stores:
        assert r["EventIdentification"]["EventID"]["csd-code"] == "110104"
        assert r["EventIdentification"]["EventActionCode"] == "C"
        assert r["EventIdentification"]["EventOutcomeIndicator"] == 0
        users = _users(r)
        assert users["MODALITY1"]["UserIsRequestor"] is True
        assert users["MODALITY1"]["NetworkAccessPointID"] == "127.0.0.1"
        assert users[peer.ae_title]["UserIsRequestor"] is False
        assert _objects(r, "2") == [PATIENT]
        assert _objects(r, "110180") == [study_uid]
        assert _ext(r)["calling_ae"] == "MODALITY1"
        assert _ext(r)["called_ae"] == peer.ae_title
    assert len({_ext(r)["instance"] for r in stores}) == n

    finds = _wait_records(peer, lambda r: _ext(r).get("service") == "C-FIND")
    assert len(finds) == 1
    f = finds[0]
    assert f["EventIdentification"]["EventID"]["csd-code"] == "110112"
    assert "VIEWER1" in _users(f)
    assert _objects(f, "2") == [PATIENT]
    assert _objects(f, "110181") == ["1.2.840.10008.5.1.4.1.2.2.1"]     # Study Root FIND
    assert _ext(f)["matches"] == 1

    gets = _wait_records(peer, lambda r: _ext(r).get("service") == "C-GET")
    assert len(gets) == 1, "one record per C-GET, not one per sub-operation"
    g = gets[0]
    assert g["EventIdentification"]["EventActionCode"] == "R"
    assert _ext(g)["counts"]["completed"] == n
    assert _objects(g, "110180") == [study_uid]
    assert _objects(g, "2") == [PATIENT]        # looked up: the identifier has no PatientID
    assert _users(g)["VIEWER1"]["RoleIDCode"][0]["csd-code"] == "110152"

    moves = _wait_records(peer, lambda r: _ext(r).get("service") == "C-MOVE")
    assert len(moves) == 1
    m = moves[0]
    assert _ext(m)["destination"] == "MOVEDEST"
    assert _ext(m)["counts"]["completed"] == n
    assert _users(m)["MOVEDEST"]["RoleIDCode"][0]["csd-code"] == "110152"
    assert _users(m)["VIEWER1"]["UserIsRequestor"] is True
    assert _objects(m, "110180") == [study_uid]

    assocs = _wait_records(peer, lambda r: _ext(r).get("kind") == "association" and
                           _ext(r).get("outcome") == "released" and
                           _ext(r).get("calling_ae") in ("MODALITY1", "VIEWER1"), 4)
    by_ae = {}
    for r in assocs:
        by_ae.setdefault(_ext(r)["calling_ae"], []).append(_ext(r))
    assert len(by_ae["MODALITY1"]) == 1                   # storescu: one association
    assert by_ae["MODALITY1"][0]["operations"] == {"C-STORE": n}
    assert len(by_ae["VIEWER1"]) == 3                     # findscu, getscu, movescu

    refused = _wait_records(peer, lambda r: _ext(r).get("outcome") == "rejected")
    assert len(refused) == 1
    rj = refused[0]
    assert rj["EventIdentification"]["EventOutcomeIndicator"] == 8
    assert _ext(rj)["calling_ae"] == "INTRUDER"
    assert _ext(rj)["called_ae"] == "NOTTHEPEER"
    assert "called AE title" in rj["EventIdentification"]["EventOutcomeDescription"]

    # -- /health ------------------------------------------------------------------------
    assert _get(peer.admin_url + "/health") == (200, "ok\n")
    catalog = peer.data_dir / "catalog.sqlite"
    away = peer.data_dir / "catalog.sqlite.away"
    os.rename(catalog, away)        # root reads a mode-000 file: make it unopenable
    try:
        code, text = _get(peer.admin_url + "/health")
        assert code == 503
        assert "catalog" in text and "does not open" in text
        status, metrics_text = _get(peer.admin_url + "/metrics")
        assert _value(_samples(metrics_text), "pacsp2p_up") == 0
    finally:
        os.rename(away, catalog)
    assert _get(peer.admin_url + "/health") == (200, "ok\n")


def test_refused_undeclared_calling_ae_is_audited(tmp_path):
    """allow_unknown = []: an AE title not under [modalities] is refused at association,
    and the audit trail says who, from where and why."""
    with Peer(tmp_path / "peer", config={"facade": {"allow_unknown": []},
                                         "modalities": {"KNOWN1": {}, "ECHOSCU": {}}}) as peer:
        assert not echo(peer.port, peer.ae_title, aet="STRANGER")
        assert echo(peer.port, peer.ae_title, aet="KNOWN1")
        refused = _wait_records(peer, lambda r: _ext(r).get("outcome") == "rejected")
        assert len(refused) == 1
        ext = _ext(refused[0])
        assert ext["calling_ae"] == "STRANGER" and ext["called_ae"] == peer.ae_title
        assert ext["peer"].startswith("127.0.0.1:")
        assert "not declared" in refused[0]["EventIdentification"]["EventOutcomeDescription"]
        echoes = _wait_records(peer, lambda r: _ext(r).get("service") == "C-ECHO" and
                               _ext(r).get("calling_ae") == "KNOWN1")
        assert len(echoes) == 1


def test_admin_delete_is_audited(tmp_path):
    """POST /delete (pacsp2p delete) writes one audit record: DICOM Study Deleted
    (110105), action D, who asked (the admin client's address) and the study."""
    files = make_study(tmp_path / "study", patient_id="DEL-1",
                       series=(("CT", 2, "1.2.840.10008.1.2.1"),))
    from pydicom import dcmread
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    with Peer(tmp_path / "peer") as peer:
        storescu(peer.port, peer.ae_title, [tmp_path / "study"])
        body = json.dumps({"level": "STUDY", "uids": [study_uid],
                           "reason": "wrong patient"}).encode()
        request = urllib.request.Request(peer.admin_url + "/delete", data=body,
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            assert json.load(r)["deleted"] == 2
        deletes = _wait_records(peer, lambda r: _ext(r).get("action") == "delete")
        assert len(deletes) == 1
        d = deletes[0]
        assert d["EventIdentification"]["EventID"]["csd-code"] == "110105"
        assert d["EventIdentification"]["EventActionCode"] == "D"
        assert d["EventIdentification"]["EventOutcomeIndicator"] == 0
        assert d["EventIdentification"]["EventOutcomeDescription"] == "wrong patient"
        assert _objects(d, "110180") == [study_uid]
        assert _ext(d)["result"] == 2
        requestor = [p for p in d["ActiveParticipant"] if p["UserIsRequestor"]]
        assert requestor[0]["NetworkAccessPointID"] == "127.0.0.1"
