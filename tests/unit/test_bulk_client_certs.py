"""The bulk channel keeps requiring the cluster's client certificates (issue 17.4).

A real bulk channel in a process of its own (tests/unit/bulk_server.py, mutual TLS with a
cluster CA made here). Only a certificate of the cluster CA gets an HTTP answer; none,
one of a DICOM CA made by ``pacsp2p ca init --dicom`` (what a modality holds, even with a
peer's name), one of another cluster CA, or an expired one of the cluster CA fails the
TLS handshake; on the bulk port and on the read port alike.
"""
from __future__ import annotations

import datetime
import http.client
import ssl
from pathlib import Path

import pytest
from bulk_spawn import bulk_server

from pacsp2p.overlay import tls

PATIENCE = 120.0


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    root = tmp_path_factory.mktemp("bulkcerts")
    tls.init_ca(root / "dicom", tls.DICOM_CA)
    tls.issue(root / "dicom", "b", kind="server")          # a peer's name, the wrong CA
    tls.init_ca(root / "other")
    tls.issue(root / "other", "b")
    with bulk_server(root / "server", root / "tls") as ports:      # the cluster CA: a, b
        long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=9)
        tls.issue(root / "tls", "b", days=2, not_before=long_ago, out=root / "expired")
        yield root, ports


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


@pytest.mark.parametrize("which", ["port", "read_port"])       # bulk port, read port
def test_only_a_cluster_certificate_gets_an_answer(bulk, which):
    root, port = bulk[0], bulk[1][which]
    ca = root / "tls" / "ca.crt"
    assert request(port, ca, root / "tls" / "b") == "404"          # served (unknown UID)
    for who in (None, root / "dicom" / "b", root / "other" / "b", root / "expired" / "b"):
        assert request(port, ca, who).startswith("refused"), who
