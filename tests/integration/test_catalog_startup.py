"""A real peer's catalog at start and stop (issue 19.2): no integrity check before the
DICOM port opens. After a clean stop the catalog is not checked; after kill -9 it is
checked in the background once the peer serves; a damaged catalog is found there, logged
loudly and shown in ``/status`` (``catalog.integrity``) while the peer keeps answering.
"""
from __future__ import annotations

import json
import sqlite3
import urllib.request

from pacsp2p.testing import datasets, echo, storescu
from pacsp2p.testing.cluster import wait_until


def status(peer) -> dict:
    with urllib.request.urlopen(peer.admin_url + "/status", timeout=10) as r:
        return json.load(r)


def integrity(peer) -> str:
    return status(peer)["catalog"]["integrity"]


def test_integrity_after_clean_stop_crash_and_damage(make_peer, tmp_path):
    peer = make_peer()
    wait_until(lambda: integrity(peer) == "ok", 20, 0.2, "the first check")
    first = peer.log_path.read_text()                 # a new catalog is not "not closed
    assert "catalog.sqlite: created" in first         # cleanly": it was never open
    assert "not closed cleanly" not in first
    files = datasets.make_study(tmp_path / "study", size=8, StudyDescription="x" * 60,
                                series=[("CT", 40, datasets.ExplicitVRLittleEndian)])
    storescu(peer.port, peer.ae_title, files)
    counts = status(peer)["catalog"]
    assert (counts["instances"], counts["locations"], counts["studies"]) == (40, 40, 1)

    peer.restart()                                    # SIGTERM: a clean stop
    assert integrity(peer) == "ok (closed cleanly)"
    assert "closed cleanly last time, not checked" in peer.log_tail(40)
    assert status(peer)["catalog"]["instances"] == 40

    peer.kill9()
    peer.restart()
    assert "not closed cleanly last time" in peer.log_tail(40)
    wait_until(lambda: integrity(peer) == "ok", 20, 0.2, "the check after a crash")

    peer.stop()                                       # clean, then a bad sector
    path = peer.data_dir / "catalog.sqlite"
    conn = sqlite3.connect(path)
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    [page] = conn.execute("SELECT pageno FROM dbstat WHERE name = 'instances' AND "
                          "pagetype = 'leaf' LIMIT 1").fetchone()
    with conn:                                        # not closed cleanly, as after a crash
        conn.execute("DELETE FROM catalog_meta")
    conn.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size + 8)
        f.write(b"\xff" * 64)
    peer.restart()
    assert echo(peer.port, peer.ae_title)             # serves
    wait_until(lambda: integrity(peer).startswith("damaged: "), 20, 0.2, "damage found")
    assert "CATALOG DAMAGED" in peer.log_tail(60)
