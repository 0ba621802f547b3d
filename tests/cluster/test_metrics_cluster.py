"""``/metrics`` of a real two-peer cluster (issue 16.2): each peer's view of the other
(state, probe round trip), replication copies, and the peer seen dead once it stops — what the
"peer dead" alert rule of docs/operations.md reads."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from pacsp2p.testing import datasets
from pacsp2p.testing.cluster import members, wait_until
from pacsp2p.testing.dcmtk import storescu


def _metrics(peer) -> dict:
    with urllib.request.urlopen(f"{peer.admin_url}/metrics", timeout=60) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: dict, name: str, **labels):
    want = frozenset(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and ls == want]
    return found[0] if found else None


def test_peers_replication_and_a_dead_peer(make_cluster, tmp_path):
    cluster = make_cluster(2)
    a, b = cluster[0], cluster[1]
    files = datasets.make_study(tmp_path / "s", patient_id="METRICS1", size=16,
                                series=[("CT", 6, "1.2.840.10008.1.2.1")])
    storescu(a.port, a.ae_title, files)
    s = _metrics(a)
    assert _get(s, "pacsp2p_peer_state", peer=b.name, state="alive") == 1
    assert _get(s, "pacsp2p_peer_state", peer=a.name, state="self") == 1
    # a round trip is known once peera has probed peerb (SWIM: within a period or two)
    wait_until(lambda: _get(_metrics(a), "pacsp2p_peer_rtt_seconds", peer=b.name)
               is not None, 10, what="peera's round trip to peerb")
    assert _get(s, "pacsp2p_peers", state="alive") == 1
    copies = sum(_get(s, "pacsp2p_replication_copies_total", kind=k) or 0
                 for k in ("local", "pushed", "fetched"))
    assert copies == 2 * len(files)                  # R = 2: one here, one at peerb
    assert _get(s, "pacsp2p_dimse_operations_total", service="C-STORE", status="success",
                code="0x0000") == len(files)
    assert _get(s, "pacsp2p_store_quorum_wait_seconds_count") == len(files)

    b.stop()
    wait_until(lambda: members(a).get(b.name) == "dead", 30, 0.5, "peera sees peerb dead")
    s = _metrics(a)
    assert _get(s, "pacsp2p_peer_state", peer=b.name, state="dead") == 1
    assert _get(s, "pacsp2p_peer_state", peer=b.name, state="alive") == 0
    assert _get(s, "pacsp2p_peers", state="dead") == 1
    assert _get(s, "pacsp2p_up") == 1                 # peera itself still serves
