"""An instance sent again many times (a modality's retries, a study pushed again) does not
stop anti-entropy. Each receipt of the same bytes keeps its instance row under its own
stamp (``catalog.shown``'s ``version_rows``); a sync batch carried every one of them, and
a peer refuses a batch carrying more than ``MAX_VERSIONS`` rows of one instance (hostile
input). So every batch holding a fact of that instance was refused at every peer that
pulls it: a peer joining (or catching up after a stop) learnt nothing of its origins
from there on. Real peers (twistd processes, R=2), DCMTK storescu, the new peer's
``where`` rows (what its catalog holds).
"""
from __future__ import annotations

from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing import storescu
from pacsp2p.testing.cluster import get_json, patience, store_study, wait_until

AGAIN = 20          # > MAX_VERSIONS (16)


def test_a_peer_joining_learns_an_instance_sent_again_many_times(cluster, tmp_path):
    a, b = cluster.start(2).peers
    cluster.wait_mesh()
    study, files = store_study(a, tmp_path / "s1", "RESENT", 1)
    proc = storescu(a.port, a.ae_title, files * AGAIN, extra=["-v"], timeout=patience(300))
    out = proc.stdout + proc.stderr
    assert out.count("Received Store Response (Success)") == AGAIN, out[-3000:]
    later, _ = store_study(b, tmp_path / "s2", "RESENTLATER", 2)
    c = cluster.add("peerc")
    cluster.wait_mesh(timeout=patience(120))
    held = {}

    def learnt():
        held.update({s: len(get_json(c, f"where?study={s}", 30)) for s in (study, later)})
        return held == {study: 1, later: 2}
    try:
        wait_until(learnt, 120, 1.0, "peerc learns both studies")
    except TimeoutError as e:
        raise AssertionError(f"{e}: peerc holds {held} of the instances "
                             f"({dn.sop_uid(files[0])} sent {AGAIN + 1} times)") from None
