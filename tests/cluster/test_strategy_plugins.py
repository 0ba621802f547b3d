"""Strategy plugins in real peers (issue 14): named in config, they are called; installed
but not named, they are not.

Three peers with R = 3 (every instance on every peer's embedded archive) and
``balancing = "single"``:

- peera names a selection plugin *file* that ranks other peers' copies first: a C-MOVE at
  peera is served entirely by another peer (per-source counts of its status JSON), its
  own archive untouched, byte-identical;
- peerb and peerc have the same plugin *installed* through an entry point of the
  ``pacsp2p.strategies`` group (a dist-info on their PYTHONPATH); peerb names it
  (``plugins = ["others_first"]``): served by others; peerc does not: the plugin is never
  called (it notes every call in a file) and peerc serves the C-MOVE from its own
  archive, as the built-in ``nearest`` ranks it.
"""
from __future__ import annotations

import os

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import StoreSCP, datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import Cluster, get_json, wait_until

N = 40
RANKER = '''
"""Ranks other peers' copies before the reader's own; notes each call (reader name)."""
from pathlib import Path

from pacsp2p.strategies import hookimpl

name = "others-first"
CALLS = Path(__file__).with_suffix(".calls")


@hookimpl
def pacsp2p_rank_replicas(instance, locations, reader):
    with CALLS.open("a") as f:
        f.write(reader.name + "\\n")
    return sorted(locations, key=lambda loc: loc.peer == reader.name)
'''


def calls(path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    # the plugin as a file (peera) and as an installed distribution (peerb, peerc)
    plugin_file = root / "rank_file.py"
    plugin_file.write_text(RANKER)
    site = root / "site"
    (site / "site_rank_ep-1.0.dist-info").mkdir(parents=True)
    (site / "site_rank_ep.py").write_text(RANKER)
    (site / "site_rank_ep-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: site-rank-ep\nVersion: 1.0\n")
    (site / "site_rank_ep-1.0.dist-info" / "entry_points.txt").write_text(
        "[pacsp2p.strategies]\nothers_first = site_rank_ep\n")
    with StoreSCP(root / "in", extra=["+B"]) as dest:
        cluster = Cluster(root, {"STORESCP": dest.address},
                          {"cluster": {"replicas": 3, "write_quorum": 3},
                           "strategies": {"balancing": "single"}})
        old = os.environ.get("PYTHONPATH")
        try:
            cluster.add("peera", config={"strategies": {"plugins": [str(plugin_file)]}})
            os.environ["PYTHONPATH"] = str(site) + (os.pathsep + old if old else "")
            cluster.add("peerb", config={"strategies": {"plugins": ["others_first"]}})
            cluster.add("peerc")
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
            cluster.wait_mesh(timeout=30)
            files = datasets.make_study(root / "study", patient_id="PLUG0001", size=64,
                                        series=[("CT", N, ExplicitVRLittleEndian)])
            proc = storescu(cluster[2].port, cluster[2].ae_title, files, extra=["-v"],
                            timeout=300)
            assert (proc.stdout + proc.stderr).count(
                "Received Store Response (Success)") == N, proc.stderr[-2000:]
            study = dn.study_of(files)
            sent = dn.dataset_hashes(files)
            for peer in cluster:
                def everywhere(peer=peer):
                    rows = get_json(peer, f"where?study={study}", timeout=20)
                    return len(rows) == N and all(len(r["replicas"]) == 3 for r in rows)
                wait_until(everywhere, 60, interval=0.5,
                           what=f"{N} instances on 3 peers known at {peer.name}")
            yield {"cluster": cluster, "dest": dest, "study": study, "sent": sent,
                   "file_calls": plugin_file.with_suffix(".calls"),
                   "ep_calls": site / "site_rank_ep.calls"}
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
            cluster.stop()


def move_at(world, peer) -> dict:
    """C-MOVE of the study at *peer* to STORESCP: byte-identical; its retrieval's
    sources (peer/archive -> stats)."""
    dest = world["dest"]
    dn.clear(dest.directory)
    proc = dn.movescu(peer.port, peer.ae_title, "STORESCP",
                      {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": world["study"]},
                      timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Received Final Move Response (Success)" in out, out[-3000:]
    assert dn.dataset_hashes(dest.files()) == world["sent"], "not byte-identical"
    rs = [r for r in get_json(peer)["retrievals"] if r["instances"] == N]
    r = max(rs, key=lambda r: r["id"])
    assert r["done"] == N
    return r["sources"]


def test_a_named_selection_plugin_file_makes_single_read_from_another_peer(world):
    a = world["cluster"][0]
    sources = move_at(world, a)
    print(f"\nC-MOVE at peera: {sources}")
    served = {n: s["completed"] for n, s in sources.items() if s["completed"]}
    assert "peera/local" not in served, sources          # its own copies untouched
    assert len(served) == 1, f"single read from several sources: {served}"
    (only,) = served
    assert sources[only]["peer"] in ("peerb", "peerc") and served[only] == N
    assert calls(world["file_calls"]).count("peera") >= N     # asked for every instance


def test_an_installed_plugin_named_by_entry_point_is_called(world):
    b = world["cluster"][1]
    sources = move_at(world, b)
    served = {n: s["completed"] for n, s in sources.items() if s["completed"]}
    assert "peerb/local" not in served and sum(served.values()) == N, sources
    assert calls(world["ep_calls"]).count("peerb") >= N


def test_an_installed_plugin_not_named_is_not_called(world):
    c = world["cluster"][2]
    sources = move_at(world, c)
    served = {n: s["completed"] for n, s in sources.items() if s["completed"]}
    assert served == {"peerc/local": N}, sources         # nearest: its own archive
    assert "peerc" not in calls(world["ep_calls"]), "the plugin peerc did not name ran"
    status = get_json(c)
    assert status["strategies"]["plugins"] == []
    assert get_json(world["cluster"][1])["strategies"]["plugins"] == ["others_first"]
