"""The admin endpoint bound to a non-loopback address (issue 16.1): HTTPS and
authentication, tested from another host.

A network namespace the test creates (a veth pair in 198.18.0.0/15, RFC 2544) is the
other host; the peer's admin endpoint is bound to this side's address of the pair:

- without ``[admin] tls_cert`` and ``users`` the peer does not start: one line naming
  the file, ``admin.bind`` and what is missing;
- with them, from the namespace: an unauthenticated request is refused (401, a Basic
  challenge for the JSON API, the login form for the console), and so are the write
  actions (``POST /delete``, the console's retrieve) — the study is still there; a
  wrong password too; plain HTTP gets no answer;
- alice's password (HTTP Basic) and a client certificate of ``tls_client_ca`` are let
  in; a console form posted with a password but without the page's token is refused
  (403); a delete with the password is done;
- the ``pacsp2p`` CLI on the peer's machine reads the endpoint over HTTPS with the
  token the peer wrote into its data directory.

Needs root (ip netns). The namespace and the veth pair are removed afterwards whatever
happened; nothing depends on a short wall-clock timeout.
"""
from __future__ import annotations

import json
import random
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from pacsp2p.admin.auth import hash_password
from pacsp2p.overlay import tls
from pacsp2p.testing import Peer, datasets, storescu
from pacsp2p.testing import toml
from pacsp2p.testing.peer import twistd_path
from pacsp2p.testing.ports import free_port

IP = shutil.which("ip") or "/usr/sbin/ip"
PACSP2P = Path(sys.executable).parent / "pacsp2p"
PASSWORD = "alice's long secret"

# an HTTPS client run inside the namespace: one request, the answer as JSON
CLIENT = r"""
import base64, http.client, json, ssl, sys
a = json.loads(sys.argv[1])
ctx = ssl.create_default_context(cafile=a["ca"])
if a.get("cert"):
    ctx.load_cert_chain(a["cert"], a["key"])
headers = dict(a.get("headers") or {})
if a.get("user"):
    headers["Authorization"] = "Basic " + base64.b64encode(
        f"{a['user']}:{a['password']}".encode()).decode()
try:
    if a.get("plain"):
        c = http.client.HTTPConnection(a["host"], a["port"], timeout=60)
    else:
        c = http.client.HTTPSConnection(a["host"], a["port"], timeout=60, context=ctx)
    body = a.get("body")
    c.request(a.get("method", "GET"), a["path"], body=body.encode() if body else None,
              headers=headers)
    r = c.getresponse()
    print(json.dumps({"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()},
                      "body": r.read().decode("utf-8", "replace")[:4000]}))
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def _ip(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *map(str, args)], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc


@dataclass
class Namespace:
    name: str
    host_address: str            # this side of the veth pair: the admin endpoint's bind
    client_address: str          # the namespace's side: "another host"


@pytest.fixture
def netns():
    """A network namespace with a veth pair: 198.18.N.1/24 here, 198.18.N.2/24 there."""
    tag = secrets.token_hex(3)
    name, here, there = f"pacsp2p-{tag}", f"p2ah{tag}", f"p2an{tag}"
    used = _ip("-4", "-o", "addr", "show").stdout
    subnet = next(n for n in random.sample(range(1, 255), 254) if f" 198.18.{n}." not in used)
    ns = Namespace(name, f"198.18.{subnet}.1", f"198.18.{subnet}.2")
    try:
        _ip("netns", "add", name)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", name)
        _ip("addr", "add", f"{ns.host_address}/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", name, IP, "addr", "add", f"{ns.client_address}/24", "dev", there)
        _ip("netns", "exec", name, IP, "link", "set", there, "up")
        _ip("netns", "exec", name, IP, "link", "set", "lo", "up")
        yield ns
    finally:
        _ip("link", "del", here, check=False)
        _ip("netns", "del", name, check=False)


def from_namespace(ns: Namespace, **request) -> dict:
    """One request made from inside *ns* (CLIENT above)."""
    proc = subprocess.run([IP, "netns", "exec", ns.name, sys.executable, "-c", CLIENT,
                           json.dumps(request)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_a_non_loopback_bind_without_https_and_users_does_not_start(tmp_path, netns):
    config = tmp_path / "peer.toml"
    config.write_text(toml.dumps({
        "peer": {"name": "bare", "data_dir": str(tmp_path / "data")},
        "facade": {"bind": "127.0.0.1", "port": free_port()},
        "admin": {"bind": netns.host_address, "port": free_port()}}))
    done = subprocess.run([str(twistd_path()), "-n", "--pidfile=", "pacsp2p", "--config",
                           str(config)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("pacsp2p:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"pacsp2p: {config}: admin.bind: '{netns.host_address}' is "
                               f"not a loopback address")
    assert "admin.tls_cert" in lines[0] and "admin.users" in lines[0]


def test_the_endpoint_on_another_address_wants_https_and_a_user(tmp_path, netns):
    ca = tmp_path / "ca"
    tls.init_ca(ca, tls.DICOM_CA)
    cert, key = tls.issue(ca, "pacsp2p-admin", kind="server", hosts=[netns.host_address])
    ccert, ckey = tls.issue(ca, "ops-laptop", kind="client")
    files = datasets.make_study(tmp_path / "in", patient_id="NETNS01", size=16,
                                series=[("CT", 3, ExplicitVRLittleEndian)])
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    port = free_port(netns.host_address)
    peer = Peer(tmp_path / "peer", name="netns", destinations={"STORESCP": "127.0.0.1:9"},
                config={"admin": {"bind": netns.host_address, "port": port,
                                  "users": {"alice": hash_password(PASSWORD)},
                                  "tls_cert": str(cert), "tls_key": str(key),
                                  "tls_client_ca": str(ca / "ca.crt")}})
    with peer:
        assert storescu(peer.port, peer.ae_title, files).returncode == 0
        where = dict(host=netns.host_address, port=port, ca=str(ca / "ca.crt"))

        def ask(**kw):
            return from_namespace(netns, **where, **kw)

        # nobody: refused, reading and writing
        r = ask(path="/status")
        assert r["status"] == 401, r
        assert r["headers"]["www-authenticate"].startswith('Basic realm="pacsp2p admin"')
        assert "status" not in json.loads(r["body"]) and "authentication" in r["body"]
        for path in ("/console/studies", "/console/", "/"):
            r = ask(path=path)
            assert r["status"] == 401 and 'name="password"' in r["body"], (path, r)
        r = ask(path="/where?study=" + study)
        assert r["status"] == 401 and study not in r["body"]
        delete = json.dumps({"level": "STUDY", "uids": [study], "reason": "test"})
        r = ask(path="/delete", method="POST", body=delete,
                headers={"Content-Type": "application/json"})
        assert r["status"] == 401, r
        r = ask(path="/console/retrieve", method="POST",
                body=f"study={study}&destination=STORESCP",
                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r["status"] == 401, r
        r = ask(path="/delete", method="POST", body=delete, user="alice", password="guess",
                headers={"Content-Type": "application/json"})
        assert r["status"] == 401, r
        r = ask(path="/status", plain=True)              # not HTTPS: no answer
        assert "error" in r, r

        # alice's password, and a client certificate of the configured CA
        r = ask(path="/status", user="alice", password=PASSWORD)
        assert r["status"] == 200, r
        status = json.loads(r["body"])
        assert status["peer"] == "netns" and status["catalog"]["instances"] == 3
        r = ask(path="/where?study=" + study, cert=str(ccert), key=str(ckey))
        assert r["status"] == 200 and len(json.loads(r["body"])) == 3, r
        r = ask(path="/console/studies", cert=str(ccert), key=str(ckey))
        assert r["status"] == 200 and "NETNS01" in r["body"], r
        assert "Strict-Transport-Security".lower() not in r["headers"]
        assert r["headers"]["cache-control"] == "no-store"
        # a console form with a password but without the page's token: refused
        r = ask(path="/console/retrieve", method="POST", user="alice", password=PASSWORD,
                body=f"study={study}&destination=STORESCP",
                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r["status"] == 403 and "token" in r["body"], r

        # the CLI on this machine: HTTPS to its own endpoint, with the token
        token = (peer.data_dir / "admin.token")
        assert token.stat().st_mode & 0o777 == 0o600
        done = subprocess.run([str(PACSP2P), "status", "--config", str(peer.config_path)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("peer netns ") and "3 instances" in done.stdout

        # the write action, authenticated: done
        r = ask(path="/delete", method="POST", body=delete, user="alice", password=PASSWORD,
                headers={"Content-Type": "application/json"})
        assert r["status"] == 200 and json.loads(r["body"])["deleted"] == 3, r
    log = peer.log_path.read_text()
    assert "wrong password for 'alice'" in log
    assert f"admin: POST '/delete' from {netns.client_address} refused: authentication " \
           "required" in log
    assert f"admin: POST '/console/retrieve' from {netns.client_address} refused" in log
