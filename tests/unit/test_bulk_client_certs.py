"""The bulk channel keeps requiring the cluster's client certificates (issue 17.4).

A real bulk channel in a process of its own (tests/unit/bulk_server.py, mutual TLS with a
cluster CA made here). Only a certificate of the cluster CA gets an HTTP answer; none,
one of a DICOM CA made by ``pacsp2p ca init --dicom`` (what a modality holds, even with a
peer's name), or one of another cluster CA fails the TLS handshake.
"""
from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from pacsp2p.overlay import tls

SERVER = Path(__file__).with_name("bulk_server.py")
PATIENCE = 120.0


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    root = tmp_path_factory.mktemp("bulkcerts")
    tls_dir = root / "tls"
    tls.init_ca(tls_dir)
    tls.issue(tls_dir, "a")
    tls.issue(tls_dir, "b")
    tls.init_ca(root / "dicom", tls.DICOM_CA)
    tls.issue(root / "dicom", "b", kind="server")          # a peer's name, the wrong CA
    tls.init_ca(root / "other")
    tls.issue(root / "other", "b")
    proc = subprocess.Popen([sys.executable, str(SERVER), str(root / "server"), str(tls_dir),
                             "600", "64", "--"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bulk server did not start: {proc.stderr.read()}")
        yield root, json.loads(line)["port"]
    finally:
        proc.kill()
        proc.wait()


def request(port: int, ca: Path, cert: Path | None) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(cert.with_suffix(".crt"), cert.with_suffix(".key"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=PATIENCE)
    try:
        conn.request("GET", "/instances/local/1.2.3")
        return str(conn.getresponse().status)
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected) as e:
        return f"refused ({type(e).__name__})"
    finally:
        conn.close()


def test_only_a_cluster_certificate_gets_an_answer(bulk):
    root, port = bulk
    ca = root / "tls" / "ca.crt"
    assert request(port, ca, root / "tls" / "b") == "404"          # served (unknown UID)
    for who in (None, root / "dicom" / "b", root / "other" / "b"):
        assert request(port, ca, who).startswith("refused"), who
