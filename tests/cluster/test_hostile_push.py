"""A peer holding a valid cluster certificate pushes copies whose header's catalog
attributes are not what any C-STORE could give (the push port of a real two-peer
cluster, ``transfer.pushport``; the AMP ``Replicate`` shares ``commands.check_meta``).

Before, the holder kept each copy and its COMMIT recorded whatever the opening said: a
60,000-character Patient Name (past ``validate.VALUE_MAX``, which the facade refuses),
a float or ``true`` as a name or date went into its catalog and on to every other peer
by sync; a dict, a list or a 10^30 integer failed in the catalog writer, a traceback in
the log each. Now each is refused ("invalid") at the opening, nothing is kept or
recorded, the connection goes on, and the next valid copy is kept and synced.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pacsp2p.overlay import threadtls, tls
from pacsp2p.overlay.commands import InvalidArgument, check_meta
from pacsp2p.testing.cluster import Cluster, get_json, members, patience, wait_until
from pacsp2p.testing.ports import free_port
from pacsp2p.transfer import pushport
from pacsp2p.transfer.pushport import COMMIT, DATA, END, HEAD, OPEN, _frame
from pacsp2p.validate import VALUE_MAX

CT = "1.2.840.10008.5.1.4.1.1.2"
HOSTILE = {"dict": {"PatientName": {"a": 1}}, "list": {"Modality": ["CT"] * 5},
           "bigint": {"PatientName": 10 ** 30}, "float": {"PatientName": 1e308},
           "long": {"PatientName": "N" * 60_000}, "true": {"StudyDate": True},
           "null": {"PatientName": None}}


def meta(uid: str, attrs: dict) -> dict:
    return {"sop_instance_uid": uid, "sop_class_uid": CT,
            "transfer_syntax_uid": "1.2.840.10008.1.2.1", "attributes": {
                "SOPInstanceUID": uid, "StudyInstanceUID": uid + ".1",
                "SeriesInstanceUID": uid + ".2", "PatientID": "PUSHX", **attrs}}


def connect(tls_dir: Path, port: int):
    ctx = threadtls.client_context(tls_dir, "intruder")
    ctx.check_hostname = False
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port),
                                                    timeout=patience(60)))
    sock.settimeout(patience(60))
    return sock


def push(sock, uid: str, attrs: dict) -> dict:
    opening = json.dumps({"archive": "local", "uid": uid,
                          "meta": json.dumps(meta(uid, attrs))}).encode()
    sock.sendall(_frame(OPEN, opening) + _frame(HEAD, b"HEAD") + _frame(DATA, b"x" * 100) +
                 _frame(END))
    got = json.loads(pushport._Reader(sock).payload(pushport.ANSWER, 1 << 16))
    if "sha256" in got:
        sock.sendall(_frame(COMMIT, json.dumps([["local", uid, got["sha256"]]]).encode()))
        got["commit"] = json.loads(pushport._Reader(sock).payload(pushport.ANSWER, 1 << 16))
    return got


def test_pushed_attributes_no_c_store_could_give_are_refused(tmp_path):
    fixed = free_port()
    c = Cluster(tmp_path / "c", config={"cluster": {"replicas": 2}})
    try:
        a = c.add("peera", overlay={"push_port": fixed})
        b = c.add("peerb")
        wait_until(lambda: members(a).get("peerb") == "alive" and
                   members(b).get("peera") == "alive", patience(120), 0.2, "both alive")
        tls.issue(c.ca_dir, "intruder", out=c.tls_dir)      # a valid cluster certificate
        sock = connect(c.tls_dir, fixed)
        try:
            answers = {name: push(sock, f"1.2.826.0.1.99.{i}", attrs)
                       for i, (name, attrs) in enumerate(HOSTILE.items(), 1)}
            valid = push(sock, "1.2.826.0.1.99.100", {"PatientName": "N" * VALUE_MAX})
        finally:
            sock.close()
        assert all(x.get("invalid") is True for x in answers.values()), answers
        assert valid["commit"]["seqs"][0], valid
        wait_until(lambda: get_json(b)["catalog"]["instances"] == 1, patience(120), 0.2,
                   "the valid copy synced")
        for p in (a, b):
            assert get_json(p)["catalog"]["instances"] == 1, p.name
        log = a.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
    finally:
        c.stop()


def test_a_value_of_several_past_the_bound_is_clipped_as_the_facade_clips_it():
    """80 Other Patient IDs (1,279 characters, valid LO VM 1-n) are kept, clipped at a
    backslash, as a C-STORE of them is (a forwarded copy carries them unclipped)."""
    ids = "\\".join(f"HOSPITAL{i:03d}-ABCD" for i in range(80))
    m = check_meta(meta("1.2.3", {"OtherPatientIDs": ids}), "1.2.3")
    kept = m["attributes"]["OtherPatientIDs"]
    assert len(kept) <= VALUE_MAX and ids.startswith(kept + "\\")
    with pytest.raises(InvalidArgument):
        check_meta(meta("1.2.3", {"PatientName": "N" * (VALUE_MAX + 1)}), "1.2.3")
