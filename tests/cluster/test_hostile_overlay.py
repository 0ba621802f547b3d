"""Hostile input on the overlay of a real two-peer cluster (issue 11).

- The bulk channel answers a path in place of a UID with 400, an unknown UID with 404,
  and never shows a filesystem path, to a client holding a valid cluster certificate.
- AMP commands with invalid UIDs, hashes, names or AE titles are answered with a
  refusal (InvalidArgument) on a link that stays up; nothing reaches the archive.
- An idle TCP socket to the overlay port and to the bulk port is closed by the peer
  after the handshake timeout (set to 1 s here); the peers stay meshed meanwhile.
"""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsp2p.overlay import tls
from pacsp2p.testing import datasets, storescu
from pacsp2p.testing import dicomnet as dn
from pacsp2p.testing.cluster import get_json, members, wait_until
from pacsp2p.testing.ports import LOOPBACK

HANDSHAKE = 1.0
PATIENCE = 120.0              # generous waits: the machine may be busy
INTRUDER = Path(__file__).with_name("amp_intruder.py")


@pytest.fixture(scope="module")
def cluster(make_cluster):
    c = make_cluster(2, config={"overlay": {"handshake_timeout": HANDSHAKE}})
    tls.issue(c.ca_dir, "intruder", out=c.tls_dir)       # a valid cluster certificate
    return c


@pytest.fixture(scope="module")
def stored(cluster, tmp_path_factory):
    a = cluster[0]
    files = [datasets.write(datasets.make_image("CT", size=8, seed=i,
                                                SOPInstanceUID=datasets.uid("hostile-ov", i)),
                            tmp_path_factory.mktemp("ov") / f"{i}.dcm") for i in range(2)]
    proc = storescu(a.port, a.ae_title, files)
    assert proc.returncode == 0, proc.stderr
    wait_until(lambda: all(get_json(p)["catalog"]["instances"] >= 2 for p in cluster),
               PATIENCE, what="instances in both catalogs")
    return files


def bulk_get(cluster, peer, path: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(cluster.tls_dir / "ca.crt"))
    ctx.check_hostname = False
    ctx.load_cert_chain(cluster.tls_dir / "intruder.crt", cluster.tls_dir / "intruder.key")
    conn = http.client.HTTPSConnection(LOOPBACK, cluster.overlay_ports[peer.name][1],
                                       context=ctx, timeout=PATIENCE)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def assert_no_path(peer, body: bytes) -> None:
    assert b"/" not in body, body
    assert str(peer.workdir).encode() not in body and b"etc" not in body, body


def holder(cluster, uid):
    """A peer whose own archive holds *uid*."""
    for p in cluster:
        if uid in {dn.sop_uid(f) for f in dn.archive_files(p.data_dir)}:
            return p
    raise AssertionError(f"{uid} is held nowhere")


def test_bulk_channel_serves_uids_never_paths(cluster, stored, tmp_path):
    uid = dn.sop_uid(stored[0])
    p = holder(cluster, uid)
    status, body = bulk_get(cluster, p, f"/instances/local/{uid}")
    assert status == 200, (status, body[:200])
    (tmp_path / "got.dcm").write_bytes(body)
    assert dn.dataset_hashes([tmp_path / "got.dcm"]) == dn.dataset_hashes(stored[:1])
    for path in ("%2Fetc%2Fpasswd", "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
                 f"{uid}%2F..%2F..%2Fcatalog.sqlite", "1.02.3", "1." + "2" * 63):
        status, body = bulk_get(cluster, p, f"/instances/local/{path}")
        assert status == 400, (path, status, body)
        assert_no_path(p, body)
    for path in ("/instances/local/1.2.3.4.5.6.7.8.9", f"/instances/nosuch/{uid}"):
        status, body = bulk_get(cluster, p, path)
        assert status == 404, (path, status, body)
        assert_no_path(p, body)


def test_amp_commands_with_invalid_arguments_are_refused(cluster, stored):
    a = cluster[0]
    before = sorted(dn.archive_files(a.data_dir))
    proc = subprocess.run([sys.executable, str(INTRUDER), str(cluster.tls_dir), "intruder",
                           LOOPBACK, str(cluster.overlay_ports[a.name][0])],
                          capture_output=True, text=True, timeout=600)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]
    assert answers and "failed" not in answers[0], (proc.stdout, proc.stderr)
    hostile, valid = answers[:-2], answers[-2:]
    assert [x["error"] for x in hostile] == ["InvalidArgument"] * len(hostile), answers
    assert [x["error"] for x in valid] == ["ReplicaRefused"] * 2, answers   # link up
    assert sorted(dn.archive_files(a.data_dir)) == before
    assert not Path("/x.dcm").exists() and not (a.data_dir / "x.dcm").exists()
    assert members(a)[cluster[1].name] == "alive"
    log = a.log_path.read_text(errors="replace")
    assert "Unhandled" not in log


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(PATIENCE)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("which", ["overlay", "bulk", "read"])
def test_an_idle_socket_is_closed_after_the_handshake_timeout(cluster, which):
    p = cluster[1]
    port = (get_json(p)["overlay"]["reads"][0]["port"] if which == "read" else
            cluster.overlay_ports[p.name][0 if which == "overlay" else 1])
    t0 = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=PATIENCE) as sock:
        assert closed_by_peer(sock), f"the {which} port kept an idle socket open"
    assert time.monotonic() - t0 >= HANDSHAKE * 0.9
    guards = get_json(p)["overlay"]["handshakes"]
    name = f"{which} port {port}"
    assert guards[name]["expired"] >= 1 and guards[name]["pending"] == 0, guards
    assert all(s == "alive" for n, s in members(p).items() if n != p.name)
