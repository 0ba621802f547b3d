"""A deleted study sent again is stored again on a peer whose wall clock was stepped back
after it learned the deletion.

A holder refuses to commit a copy made before it learned of the instance's deletion (a
late push, ``tombstones.late_copy``/``delete.pushed_before``). Both times were read from
the wall clock: peerb's stepped back an hour after the delete, every copy of the study
sent again was "made before" for that hour: refused ("deleted from the cluster after
this copy was made: not kept"), its hinted hand-off refused every 5 s, one copy of each
instance for the hour. Now both are times of the process's monotonic clock. Two real
peers, peerb's wall clock stepped back 4 min by libfaketime (``pacsp2p.testing.faketime``;
the cluster's certificates, issued now, are valid from 5 min ago: a longer step would
also refuse them).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import datasets
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, wait_until
from pacsp2p.testing.dcmtk import storescu
from pacsp2p.testing.faketime import SteppedClock

N = 6
PACSP2P = Path(sys.executable).parent / "pacsp2p"
REFUSED = "deleted from the cluster after this copy was made"


def _copies(peer, study: str) -> dict:
    return {r["instance"]: sorted(x["peer"] for x in r["replicas"] if x["available"])
            for r in get_json(peer, f"where?study={study}")}


def test_a_study_sent_again_after_a_delete_and_a_step_back_is_stored_twice(cluster,
                                                                            tmp_path):
    clock = SteppedClock(tmp_path / "faketime")
    cluster.config = {"cluster": {"write_quorum": 1}}   # (a probe lost on a loaded host:
    a = cluster.add("peera")                             # the copy is handed off after)
    b = cluster.add("peerb", env=clock.env())
    cluster.wait_mesh()
    files = datasets.make_study(tmp_path / "study", patient_id="STEPDELETE", size=16,
                                series=[("CT", N, ExplicitVRLittleEndian)])
    study = dn.study_of(files)
    twice = {dn.sop_uid(f): ["peera", "peerb"] for f in files}
    storescu(a.port, a.ae_title, files, timeout=300)
    wait_until(lambda: _copies(b, study) == twice, 60, 0.5, "the study at both peers")
    done = subprocess.run([str(PACSP2P), "delete", "--config", str(a.config_path),
                           "--study", study, "--reason", "test"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: not _copies(a, study) and not _copies(b, study), 60, 0.5,
               "the study gone at both peers")
    clock.step("-4m")       # (certificates issued now stay valid: 5 min of slack)
    time.sleep(2)                         # libfaketime reads the offset once a second
    storescu(a.port, a.ae_title, files, timeout=300)        # the same files again
    wait_until(lambda: _copies(a, study) == twice and _copies(b, study) == twice, 60, 0.5,
               "every instance sent again has its copies at peera and peerb")
    log = Path(b.log_path).read_text()
    assert REFUSED not in log, [line for line in log.splitlines() if REFUSED in line][:3]
