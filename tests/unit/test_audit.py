"""The audit trail's writer and format (issue 16.3): rotation by size and count, a
bounded queue that drops (and counts) rather than block the reactor, the DICOM audit
message XML a collector makes of a line (PS3.15 A.5.1), and the status classes."""

from __future__ import annotations

import json
import subprocess
import sys
from xml.etree import ElementTree as ET

from pacsp2p import audit, metrics


def _record(i: int = 0) -> dict:
    return audit.message(
        audit.EVENT_TRANSFERRED, "C", audit.SUCCESS,
        [audit.participant("CT1", True, audit.ROLE_SOURCE, "10.1.2.3"),
         audit.participant("PACSP2P", False, audit.ROLE_DESTINATION)], "peera",
        [audit.patient("PID1"), audit.study("1.2.3", {"1.2.840.10008.5.1.4.1.1.2": 4},
                                            "ACC1")],
        extension={"kind": "operation", "service": "C-STORE", "i": i})


def test_rotation_by_size_and_count(tmp_path):
    trail = audit.AuditTrail(tmp_path / "audit.log", max_bytes=4096, backups=2)
    trail.start()
    for i in range(200):
        trail.emit(_record(i))
    trail.stop()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 4096
        for line in p.read_text().splitlines():
            json.loads(line)                       # whole lines, never cut
    last = json.loads((tmp_path / "audit.log").read_text().splitlines()[-1])
    assert last["pacsp2p"]["i"] == 199
    assert trail.written == 200 and trail.dropped == 0


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path):
    dropped = []
    trail = audit.AuditTrail(tmp_path / "audit.log", queue_size=10,
                             on_drop=dropped.append)
    for i in range(25):                 # the writer is not started: nothing drains
        trail.emit(_record(i))
    assert trail.dropped == 15 and sum(dropped) == 15
    trail.start()
    trail.stop()
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 10


def test_a_line_becomes_a_dicom_audit_message():
    root = ET.fromstring(audit.to_xml(_record()))
    assert root.tag == "AuditMessage"
    ev = root.find("EventIdentification")
    assert ev.get("EventActionCode") == "C" and ev.get("EventOutcomeIndicator") == "0"
    assert ev.find("EventID").get("csd-code") == "110104"
    parts = root.findall("ActiveParticipant")
    assert [p.get("UserID") for p in parts] == ["CT1", "PACSP2P"]
    assert parts[0].get("UserIsRequestor") == "true"
    assert parts[0].get("NetworkAccessPointID") == "10.1.2.3"
    assert parts[0].find("RoleIDCode").get("csd-code") == "110153"
    src = root.find("AuditSourceIdentification")
    assert src.get("AuditSourceID") == "peera"
    objs = root.findall("ParticipantObjectIdentification")
    assert objs[0].get("ParticipantObjectID") == "PID1"
    assert objs[0].find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
    assert objs[1].find("SOPClass").get("NumberOfInstances") == "4"
    assert objs[1].find("Accession").get("Number") == "ACC1"
    assert root.find(".//pacsp2p") is None            # the extension stays in the JSON


def test_the_collector_command(tmp_path):
    log = tmp_path / "audit.log"
    log.write_text("\n".join(json.dumps(_record(i)) for i in range(3)) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pacsp2p.audit", str(log)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(ET.fromstring(x).tag == "AuditMessage" for x in lines)


def test_status_classes_and_outcomes():
    assert metrics.status_class(0x0000) == "success"
    assert metrics.status_class(0xB000) == "warning"
    assert metrics.status_class(0xFE00) == "cancel"
    assert metrics.status_class(0x0124) == "refused"
    assert metrics.status_class(0xA801) == "refused"
    assert metrics.status_class(0xA700) == "failure"
    assert metrics.status_class(0xC001) == "failure"
    assert audit.outcome_of(0) == 0 and audit.outcome_of(0xB000) == 4
    assert audit.outcome_of(0xA700) == 8 and audit.outcome_of(0x0124) == 8
