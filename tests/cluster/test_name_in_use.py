"""Two processes under one peer name (overlay.merge, overlay.claims): real peers.

peera and peerb (separate twistd processes, one cluster CA) run; a second "peerb" — the
same certificate, its own data directory and ports — is started by hand as an operator
would (a copied config): it exits non-zero with one line naming where the name is in
use, the peer it asked logs one error line naming both addresses, and peera and peerb
go on as before (members, addresses, a store through peera replicated to the real
peerb). peerb restarted on new ports after it left still rejoins. A second "peerb"
started through a peer that does not know the real one joins that peer; once the two
views meet (a peer seeded on both), the real peerb and the twin hear of each other,
check it in a TLS-authenticated Hello, and the one started later stops with one line;
every view then holds the real peerb.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.testing import Peer, datasets, storescu, toml
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, members, wait_until
from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.ports import free_ports


def _addresses(peer) -> dict[str, str]:
    return {m["name"]: m["address"] for m in get_json(peer)["overlay"]["members"]}


def _peers_cli(peer) -> dict[str, list[str]]:
    cli = Path(sys.executable).parent / "pacsp2p"
    proc = subprocess.run([str(cli), "peers", "--config", str(peer.config_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {line.split()[0]: line.split() for line in proc.stdout.strip().splitlines()[1:]}


def _twin(cluster, b, seeds: list[str], where: str):
    """Run a second "peerb" (peerb's certificate and overlay settings, other ports, its
    own data) in the foreground until it exits; (exit status, stderr)."""
    twin = Peer(cluster.root / where, name=b.name, ae_title=b.ae_title)
    port, bulk_port = free_ports(2)
    twin.overrides = toml.deep_merge(b.overrides, {"overlay": {
        "port": port, "bulk_port": bulk_port, "seeds": seeds}})
    twin.port, twin.admin_port = free_ports(2)
    twin.write_config()
    argv = [str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
            str(twin.config_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                          cwd=twin.workdir, stdin=subprocess.DEVNULL)
    (twin.workdir / "twistd.out").write_text(proc.stdout)
    return proc.returncode, proc.stderr, f"127.0.0.1:{port}"


def _lines(peer, offset: int, text: str) -> list[str]:
    return [line for line in peer.log_path.read_text(errors="replace")[offset:].splitlines()
            if text in line]


def test_a_second_process_under_a_peers_name_exits_and_the_cluster_goes_on(
        make_cluster, tmp_path):
    cluster = make_cluster(2)
    a, b = cluster.peers
    b_at = cluster.seed(b)
    views = {a.name: _addresses(a), b.name: _addresses(b)}
    for seed, asked, says in ((a, a, "two processes claim the peer name peerb"),
                              (b, b, "another process claims this peer's name peerb")):
        log_start = len(asked.log_path.read_text(errors="replace"))
        status, stderr, twin_at = _twin(cluster, b, [cluster.seed(seed)],
                                        f"twin-via-{seed.name}")
        assert status != 0
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
        assert "peer name peerb is in use" in lines[0], stderr
        assert b_at in lines[0] and twin_at in lines[0], stderr
        said = _lines(asked, log_start, says)
        assert len(said) == 1, said
        assert b_at in said[0] and twin_at in said[0], said
    for p in (a, b):
        assert _addresses(p) == views[p.name]
        assert members(p) == {p.name: "self", ({a.name, b.name} - {p.name}).pop(): "alive"}
    rows = _peers_cli(a)
    assert rows[b.name][1:3] == ["alive", b_at], rows
    assert _peers_cli(b)[b.name][1:3] == ["self", b_at]
    # a store through peera is replicated to the real peerb (R = W = 2)
    files = datasets.make_study(tmp_path / "study", patient_id="TWIN01", size=64,
                                series=[("CT", 3, ExplicitVRLittleEndian)])
    storescu(a.port, a.ae_title, files, timeout=300)
    sent = dn.dataset_hashes(files)
    assert dn.dataset_hashes(dn.archive_files(b.data_dir)).items() >= sent.items()


def test_a_peer_restarted_elsewhere_after_it_left_rejoins(make_cluster):
    cluster = make_cluster(2)
    a, b = cluster.peers
    old = cluster.seed(b)
    b.stop()                      # a clean stop: it tells the others it leaves (dead)
    wait_until(lambda: members(a).get(b.name) == "dead", 60, what="peerb dead at peera")
    cluster._start(b)             # fresh overlay (and facade) ports, same name and data
    new = cluster.seed(b)
    assert new != old
    cluster.wait_mesh(timeout=60)
    assert _addresses(a)[b.name] == new
    assert b.alive


def _addresses_of(peer, name: str) -> str | None:
    return next((m["address"] for m in get_json(peer)["overlay"]["members"]
                 if m["name"] == name and m["state"] == "alive"), None)


def test_a_twin_that_joined_elsewhere_stops_when_the_views_meet(cluster):
    a = cluster.add("peera", seeds=[])
    b = cluster.add("peerb")
    cluster.wait_mesh(timeout=60)
    b_at = cluster.seed(b)
    c = cluster.add("peerc", seeds=[])          # knows neither peera nor peerb
    twin = Peer(cluster.root / "twin", name=b.name, ae_title=b.ae_title)
    port, bulk_port = free_ports(2)
    twin.overrides = toml.deep_merge(b.overrides, {"overlay": {
        "port": port, "bulk_port": bulk_port, "seeds": [cluster.seed(c)]}})
    twin_at = f"127.0.0.1:{port}"
    twin.start()
    try:
        wait_until(lambda: _addresses_of(c, b.name) == twin_at, 60,
                   what="the twin joined peerc")
        log_b = len(b.log_path.read_text(errors="replace"))
        cluster.add("peerd", seeds=[cluster.seed(a), cluster.seed(c)])   # the views meet
        wait_until(lambda: not twin.process.alive, 120, what="the twin stopped")
        assert twin.process.returncode != 0
        said = [line for line in twin.log_path.read_text(errors="replace").splitlines()
                if "peer name peerb" in line and "#critical" in line]
        assert len(said) == 1, twin.log_path.read_text()[-3000:]
        assert b_at in said[0] and twin_at in said[0], said
        assert b.process.alive
        told = _lines(b, log_b, "another process claims this peer's name peerb")
        assert len(told) == 1 and twin_at in told[0], told
        for p in cluster.peers:
            if p is not b:
                wait_until(lambda p=p: _addresses_of(p, b.name) == b_at, 120,
                           what=f"{p.name} holds the real peerb")
        assert members(b) == {"peerb": "self", "peera": "alive", "peerc": "alive",
                              "peerd": "alive"}
    finally:
        twin.stop()
