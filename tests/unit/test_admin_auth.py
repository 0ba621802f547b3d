"""The admin endpoint's authentication, its config, and the console's helpers.

Passwords (scrypt hashes, ``pacsp2p admin hash-password``); the ``[admin]`` keys (a
non-loopback bind needs HTTPS and a way to authenticate, refused in one line naming
the key otherwise); ``auth.Guard``: who may write (the loopback exception, 401, the CSRF
token, another site's Origin / Sec-Fetch-Site), which Host headers a loopback-bound
endpoint answers; the gate in front of every request (401 when reading needs
authentication, the login page for console paths); the console's search form and its
human-readable values; the CLI's URL.
"""
from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from pacsp2p import config
from pacsp2p.admin import auth, client, console, gate
from pacsp2p.config import AdminSettings, ConfigError

PACSP2P = Path(sys.executable).parent / "pacsp2p"
FAST = dict(n=1 << 14, r=8, p=1)          # the cheapest parameters config accepts
ALICE = auth.hash_password("correct horse", **FAST)


def load(admin: dict, tmp_path: Path = Path("/tmp")):
    return config.from_dict({"admin": admin}, "peer.toml", tmp_path)


# -- passwords ---------------------------------------------------------------------------

def test_a_password_hash_checks_its_password_only():
    assert ALICE.startswith("scrypt$16384$8$1$")
    assert auth.verify_password("correct horse", ALICE)
    assert not auth.verify_password("correct horse ", ALICE)
    assert not auth.verify_password("", ALICE)
    assert not auth.verify_password("correct horse", "scrypt$16384$8$1$AAAA$AAAA")
    assert not auth.verify_password("x", "plain text")
    other = auth.hash_password("correct horse", **FAST)
    assert other != ALICE                     # a new salt each time


def test_hash_password_cli_reads_stdin_and_prints_a_config_line():
    done = subprocess.run([str(PACSP2P), "admin", "hash-password", "alice"],
                          input="a long enough secret\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    name, _, value = done.stdout.strip().partition(" = ")
    assert name == "alice" and value.startswith('"scrypt$32768$8$1$')
    assert auth.verify_password("a long enough secret", value.strip('"'))
    s = load({"users": {"alice": value.strip('"')}})
    assert s.admin.users == {"alice": value.strip('"')}
    short = subprocess.run([str(PACSP2P), "admin", "hash-password"], input="short\n",
                           capture_output=True, text=True, timeout=120)
    assert short.returncode == 1 and "8 characters" in short.stderr


# -- [admin] -----------------------------------------------------------------------------

def test_the_default_endpoint_is_loopback_without_users():
    s = config.from_dict({}, "<defaults>", Path("/tmp"))
    assert s.admin == AdminSettings()
    assert not s.admin.authenticates and s.admin.tls_cert is None


@pytest.mark.parametrize("admin,key,words", [
    ({"bind": "0.0.0.0"}, "admin.bind",
     ["not a loopback address", "HTTPS (admin.tls_cert and admin.tls_key)",
      "authentication (admin.users, or admin.tls_client_ca)"]),
    ({"bind": "10.1.2.3", "users": {"alice": ALICE}}, "admin.bind",
     ["HTTPS (admin.tls_cert and admin.tls_key)"]),
    ({"bind": "198.18.0.1", "tls_cert": "a.crt", "tls_key": "a.key"}, "admin.bind",
     ["needs authentication (admin.users, or admin.tls_client_ca)"]),
    ({"users": {"alice": "correct horse"}}, "admin.users.alice",
     ["not a password", "pacsp2p admin hash-password"]),
    ({"users": {"alice": "scrypt$1024$8$1$AAAA$AAAA"}}, "admin.users.alice",
     ["out of range"]),
    ({"users": {"al ice": ALICE}}, "admin.users.al ice", ["user name"]),
    ({"users": "alice"}, "admin.users", ["must be a table"]),
    ({"tls_cert": "a.crt"}, "admin.tls_key", ["is required with tls_cert"]),
    ({"tls_key": "a.key"}, "admin.tls_cert", ["is required with tls_key"]),
    ({"tls_client_ca": "ca.crt"}, "admin.tls_client_ca", ["needs HTTPS"]),
    ({"password": "x"}, "admin.password", ["unknown key"]),
    ({"origins": ["pacs.example.org"]}, "admin.origins[0]", ["https://host[:port]"]),
    ({"origins": ["https://pacs.example.org/console"]}, "admin.origins[0]", ["got"]),
])
def test_admin_config_errors_name_file_key_and_reason(admin, key, words):
    with pytest.raises(ConfigError) as e:
        load(admin)
    message = str(e.value)
    assert message.startswith(f"peer.toml: {key}: ") and "\n" not in message
    for w in words:
        assert w in message, message


@pytest.mark.parametrize("admin", [
    {"bind": "0.0.0.0", "tls_cert": "a.crt", "tls_key": "a.key", "users": {"alice": ALICE}},
    {"bind": "198.18.0.1", "tls_cert": "a.crt", "tls_key": "a.key", "tls_client_ca": "ca.crt"},
    {"bind": "127.0.0.1", "users": {"alice": ALICE}},
    {"bind": "::1"},
])
def test_admin_configs_that_start(admin, tmp_path):
    s = load(admin, tmp_path)
    assert s.admin.bind == admin["bind"]
    if "tls_cert" in admin:
        assert s.admin.tls_cert == tmp_path / "a.crt"


def test_missing_https_files_are_named_before_start(tmp_path):
    from pacsp2p import preflight
    s = load({"bind": "0.0.0.0", "tls_cert": "nope.crt", "tls_key": "nope.key",
              "users": {"alice": ALICE}}, tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight.check(s)
    assert str(e.value).startswith("peer.toml: admin.tls_cert: ") and "not found" in str(e.value)


# -- the guard -----------------------------------------------------------------------------

def request(method=b"GET", path=b"/status", client_host="127.0.0.1", headers=None,
            args=None):
    r = DummyRequest([p for p in path.split(b"/")[1:]])
    r.method = method
    r.path = r.uri = path
    r.client = IPv4Address("TCP", client_host, 40000)
    for name, value in (headers or {}).items():
        r.requestHeaders.setRawHeaders(name, [value])
    r.args = args or {}
    r.content = io.BytesIO(b"")
    return r


def guard(users=None, bind="127.0.0.1", **kw):
    return auth.Guard(AdminSettings(bind=bind, users=users or {}, **kw), bind,
                      reactor=None, clock=lambda: 1000.0)


def test_loopback_without_users_keeps_json_writes_from_the_machine():
    g = guard()
    assert g.open_reads and g.local_writes and not g.logins
    assert g.check_write(request(b"POST"), None, None, json_body=True) is None
    code, why = g.check_write(request(b"POST", client_host="192.0.2.7"), None, None, True)
    assert code == 403 and "loopback" in why
    code, why = g.check_write(request(b"POST"), None, "", json_body=False)
    assert code == 403 and "[admin] users" in why         # console forms need a login


def test_with_users_every_write_needs_a_user_and_forms_a_token():
    g = guard(users={"alice": ALICE})
    assert not g.local_writes and g.logins
    assert g.check_write(request(b"POST"), None, None, True)[0] == 401
    alice = auth.Identity("alice", "session", g.new_session("alice"))
    assert g.check_write(request(b"POST"), alice, None, json_body=True) is None
    assert g.check_write(request(b"POST"), alice, "", json_body=False)[0] == 403
    assert g.check_write(request(b"POST"), alice, "0" * 64, json_body=False)[0] == 403
    token = g.csrf_token(alice)
    assert g.check_write(request(b"POST"), alice, token, json_body=False) is None
    other = auth.Identity("alice", "session", g.new_session("alice"))
    assert g.csrf_token(other) != token                  # bound to the session
    cli = auth.Identity("pacsp2p-cli", "token")
    assert g.check_write(request(b"POST"), cli, None, json_body=True) is None


@pytest.mark.parametrize("headers", [
    {b"origin": b"http://evil.example", b"host": b"127.0.0.1:11180"},
    {b"origin": b"null", b"host": b"127.0.0.1:11180"},
    {b"sec-fetch-site": b"cross-site", b"host": b"127.0.0.1:11180"},
    {b"sec-fetch-site": b"same-site", b"host": b"127.0.0.1:11180"},
    {b"origin": b"https://127.0.0.1:11180", b"host": b"127.0.0.1:11180"},   # not https
])
def test_a_write_another_site_made_the_browser_send_is_refused(headers):
    g = guard(users={"alice": ALICE})
    alice = auth.Identity("alice", "session", g.new_session("alice"))
    code, why = g.check_write(request(b"POST", headers=headers), alice, g.csrf_token(alice),
                              json_body=False)
    assert code == 403 and "another site" in why
    # also the exception of loopback writes without users
    assert guard().check_write(request(b"POST", headers=headers), None, None, True)[0] == 403


def test_a_same_origin_post_passes():
    g = guard(users={"alice": ALICE})
    alice = auth.Identity("alice", "session", g.new_session("alice"))
    r = request(b"POST", headers={b"origin": b"http://127.0.0.1:11180",
                                  b"host": b"127.0.0.1:11180",
                                  b"sec-fetch-site": b"same-origin"})
    assert g.check_write(r, alice, g.csrf_token(alice), json_body=False) is None


@pytest.mark.parametrize("host,ok", [
    (b"127.0.0.1:11180", True), (b"localhost:11180", True), (b"localhost", True),
    (b"[::1]:11180", True), (b"127.0.0.2", True), (b"evil.example:11180", False),
    (b"evil.example", False), (b"10.0.0.1:11180", False), (b"", False),
])
def test_a_loopback_endpoint_answers_to_loopback_host_names_only(host, ok):
    assert guard().host_ok(request(headers={b"host": host} if host else {})) is ok
    assert guard(bind="0.0.0.0", users={"a": ALICE}).host_ok(
        request(headers={b"host": host})) is True


def test_a_reverse_proxys_origin_and_host_are_accepted_when_configured():
    s = load({"users": {"alice": ALICE}, "origins": ["https://PACS.example.org/",
                                                     "http://[::1]:8080"]})
    assert s.admin.origins == ("https://pacs.example.org", "http://[::1]:8080")
    g = auth.Guard(s.admin, "127.0.0.1", clock=lambda: 1000.0)
    alice = auth.Identity("alice", "session", g.new_session("alice"))
    proxied = request(b"POST", headers={b"host": b"pacs.example.org",
                                        b"origin": b"https://pacs.example.org",
                                        b"sec-fetch-site": b"same-origin"})
    assert g.host_ok(proxied)
    assert g.check_write(proxied, alice, g.csrf_token(alice), json_body=False) is None
    other = request(b"POST", headers={b"host": b"pacs.example.org",
                                      b"origin": b"https://evil.example"})
    assert g.check_write(other, alice, g.csrf_token(alice), json_body=False)[0] == 403
    assert not guard().host_ok(request(headers={b"host": b"pacs.example.org"}))


def test_identify_by_token_session_and_basic():
    g = guard(users={"alice": ALICE})
    g.token = "t0ken"
    got = []
    g.identify(request(headers={b"authorization": b"Bearer t0ken"})).addCallback(got.append)
    g.identify(request(headers={b"authorization": b"Bearer nope"})).addCallback(got.append)
    sid = g.new_session("alice")
    r = request()
    r.received_cookies = {g.cookie: sid.encode()}
    g.identify(r).addCallback(got.append)
    r = request()
    r.received_cookies = {g.cookie: b"forged"}
    g.identify(r).addCallback(got.append)
    assert got == [auth.Identity("pacsp2p-cli", "token"), None,
                   auth.Identity("alice", "session", sid), None]
    g.clock = lambda: 1000.0 + auth.SESSION_TTL + 1          # expired
    r = request()
    r.received_cookies = {g.cookie: sid.encode()}
    g.identify(r).addCallback(got.append)
    assert got[-1] is None and sid not in g.sessions


def test_basic_passwords_are_checked_in_a_thread_and_throttled(monkeypatch):
    calls = []

    def fake_thread(reactor, pool, fn, *args):
        calls.append(args)
        return defer.maybeDeferred(fn, *args)
    monkeypatch.setattr(auth, "deferToThreadPool", fake_thread)
    monkeypatch.setattr(auth.threads, "pool", lambda *a, **k: None)
    g = guard(users={"alice": ALICE})
    g.reactor = object()

    def basic(user, password, host="127.0.0.1"):
        out = []
        value = base64.b64encode(f"{user}:{password}".encode())
        g.identify(request(client_host=host, headers={b"authorization": b"Basic " + value})
                   ).addBoth(out.append)
        return out[0]
    assert basic("alice", "correct horse") == auth.Identity("alice", "basic")
    assert basic("alice", "correct horse") == auth.Identity("alice", "basic")
    assert len(calls) == 1                                  # remembered a while
    assert basic("mallory", "x") is None                    # unknown user: same work
    assert calls[-1][1] == auth._DUMMY_HASH
    for _ in range(auth.FAILURES):
        basic("alice", "wrong", host="192.0.2.9")
    refused = basic("alice", "correct horse", host="192.0.2.9")
    assert refused.check(auth.Busy) and refused.value.code == 429
    assert basic("alice", "correct horse", host="192.0.2.10") == auth.Identity("alice",
                                                                                "basic")


# -- the gate ------------------------------------------------------------------------------

class FakeCluster:
    def __init__(self, admin):
        self.settings = config.from_dict({"admin": admin}, "peer.toml", Path("/tmp"))

    def status(self):
        return defer.succeed({"peer": "p"})

    digest = where = delete = status


def through_gate(site, req):
    req.site = site
    req.prepath = []
    req.postpath = list(req.postpath)
    found = site.getResourceFor(req)
    out = found.render(req)
    if isinstance(out, bytes):
        req.write(out)
        req.finish()
    return req.responseCode or 200, b"".join(req.written)


def test_the_gate_asks_for_authentication_where_reading_needs_it():
    from pacsp2p.admin import web
    admin = {"bind": "0.0.0.0", "tls_cert": "a.crt", "tls_key": "a.key",
             "users": {"alice": ALICE}}
    cluster = FakeCluster(admin)
    g = auth.Guard(cluster.settings.admin, "0.0.0.0", tls=True)
    site = web.site(cluster, "0.0.0.0", g)
    req = request(path=b"/status", headers={b"host": b"pacs.example:11180"})
    code, body = through_gate(site, req)
    assert code == 401 and b"authentication required" in body
    assert req.responseHeaders.getRawHeaders(b"www-authenticate")[0].startswith(b"Basic")
    code, body = through_gate(site, request(path=b"/console/studies",
                                            headers={b"host": b"pacs.example"}))
    assert code == 401 and b'name="password"' in body              # the login form
    code, body = through_gate(site, request(path=b"/console/static/console.css",
                                            headers={b"host": b"pacs.example"}))
    assert code == 200 and b"pacsp2p web console" in body           # served to anyone
    g.token = "tok"
    code, body = through_gate(site, request(path=b"/status", headers={
        b"host": b"pacs.example", b"authorization": b"Bearer tok"}))
    assert code == 200 and b'"peer"' in body


def test_the_gate_refuses_a_foreign_host_name_on_loopback():
    from pacsp2p.admin import web
    cluster = FakeCluster({})
    site = web.site(cluster)
    code, body = through_gate(site, request(path=b"/status",
                                            headers={b"host": b"rebound.example:11180"}))
    assert code == 403 and b"Host header" in body
    code, body = through_gate(site, request(path=b"/status",
                                            headers={b"host": b"127.0.0.1:11180"}))
    assert code == 200


def _channel():
    """A ``DeadlineChannel`` of a site that answers 200, on a StringTransport."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    class Site(server.Site):
        protocol, requestFactory = gate.DeadlineChannel, gate.BoundedRequest
    class Transport(StringTransport):
        half_closed = aborted = False

        def loseWriteConnection(self):
            self.half_closed = True

        def abortConnection(self):
            self.aborted = True
    site = Site(resource.Resource())
    ch = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
    ch.makeConnection(Transport())
    return ch


def test_a_body_too_large_is_refused_unread():
    """413 as soon as the Content-Length says too much, before any of the body, or as soon
    as a chunked body passes the bound; the rest is dropped, at most ``LINGER`` bytes."""
    head = b"POST /delete HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    ch = _channel()
    ch.dataReceived(head + b"content-length: %d\r\n" % 10**20 +
                    b"expect: 100-continue\r\n\r\n")
    out = ch.transport.value()
    assert out.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in out, out
    ch.dataReceived(b"x" * 65536)
    assert ch.requests[-1].content.getvalue() == b"" and ch.transport.half_closed
    assert not ch.transport.aborted
    ch = _channel()
    ch.dataReceived(head + b"transfer-encoding: chunked\r\n\r\n")
    sent = 0
    while not ch.transport.value() and sent < 4 * gate.MAX_BODY:
        ch.dataReceived(b"10000\r\n" + b"x" * 65536 + b"\r\n")
        sent += 65536
    assert ch.transport.value().startswith(b"HTTP/1.1 413 ") and sent <= gate.MAX_BODY + 65536
    ch.requests[-1].content.seek(0, 2)
    assert ch.requests[-1].content.tell() <= gate.MAX_BODY
    while sent < gate.MAX_BODY + gate.LINGER + 65536 * 2 and not ch.transport.aborted:
        ch.dataReceived(b"10000\r\n" + b"x" * 65536 + b"\r\n")
        sent += 65536
    assert ch.transport.aborted, "not closed after LINGER bytes dropped"


# -- the console's helpers ------------------------------------------------------------------

def test_human_readable_values():
    assert console.size(512) == "512 B" and console.size(1536) == "1.5 KiB"
    assert console.size(3 * 2**30) == "3.0 GiB" and console.size(None) == "—"
    assert console.duration(45) == "45 s" and console.duration(200) == "3 min 20 s"
    assert console.duration(7500) == "2 h 5 min" and console.duration(86400 * 3) == \
        "3 days 0 h"
    assert console.ago(1000.0, now=1012.0) == "12 s ago"
    assert console.ago(1000.0, now=1000.4) == "just now"
    assert console.ago(1600.0, now=1000.0) == "in 10 min"
    assert console.ago(None) == "—" and console.when(None) == "—"
    assert console.when(0) == "—" and console.when(1.7e9).startswith("2023-11-1")
    assert console.dicom_date("20240131") == "2024-01-31"
    assert console.dicom_time("142311.123") == "14:23:11"
    assert console.person("DOE^JOHN^Q^DR") == "DOE, JOHN Q" and console.person("DOE") == "DOE"
    assert console.number(1234567) == "1\u202f234\u202f567" and console.number(None) == "—"


def test_work_the_console_has_no_section_for_is_described_in_words():
    now = 1.8e9
    text = console.describe({"state": "idle", "interval_s": 604800.0, "limit_MB_s": 20.0,
                             "next_at": now + 3600, "pass": None, "bytes": 3 * 2**20,
                             "paused": False, "failures": [1, 2]})
    assert text.startswith("interval 7 days 0 h, limit 20.0 MB/s, next in ")
    assert "bytes 3.0 MiB" in text and "paused no" in text
    assert "pass" not in text and "failures" not in text and "state" not in text
    assert console.describe(None) == "" and console.describe({"here": None}) == ""


def test_a_page_shows_its_own_words_whole_and_dicom_values_bounded():
    """The console's own description of work (however many fields) is shown whole; a
    value from DICOM is cut at SHOWN_MAX characters, its control characters shown as
    their pictures (the templates' environment, finalize)."""
    env = console._environment()
    work = {f"field_{i}": i for i in range(40)}
    shown = env.from_string("{{ w|describe }}").render(w=work)
    assert len(shown) > console.SHOWN_MAX and shown.endswith("field 39 39")
    value = env.from_string("{{ v }}").render(v="A\x1b[2J" + "N" * 1000)
    assert value == "A\u241b[2J" + "N" * (console.SHOWN_MAX - 5) + "…"


@pytest.mark.parametrize("form,keys,problems", [
    ({}, {}, 0),
    ({"name": "doe"}, {"PatientName": "doe*"}, 0),
    ({"name": "D?E*"}, {"PatientName": "D?E*"}, 0),
    ({"patient_id": "PID1", "accession": "A1"}, {"PatientID": "PID1",
                                                 "AccessionNumber": "A1"}, 0),
    ({"from": "2024-01-01", "to": "2024-12-31"}, {"StudyDate": "20240101-20241231"}, 0),
    ({"from": "2024-01-01"}, {"StudyDate": "20240101-"}, 0),
    ({"to": "2024-01-01"}, {"StudyDate": "-20240101"}, 0),
    ({"from": "2024-01-01", "to": "2024-01-01"}, {"StudyDate": "20240101"}, 0),
    ({"modality": "ct"}, {"ModalitiesInStudy": "CT"}, 0),
    ({"modality": "C T"}, None, 1),
    ({"from": "31.01.2024"}, None, 1),
    ({"name": "A\\B"}, None, 1),
    ({"patient_id": "x" * 65}, None, 1),
])
def test_the_study_search_form(form, keys, problems):
    got, errors = console.search_query(form)
    assert len(errors) == problems
    if keys is not None:
        assert got == keys


def test_login_redirects_only_into_the_console():
    assert console._safe_next("/console/study/1.2.3") == "/console/study/1.2.3"
    for bad in ("https://evil.example/", "//evil.example/console/", "/console/login",
                "/status", "/console/\\evil", ""):
        assert console._safe_next(bad) == "/console/"


@pytest.mark.parametrize("admin,url", [
    ({}, "http://127.0.0.1:11180/status"),
    ({"bind": "::1"}, "http://[::1]:11180/status"),
    ({"bind": "0.0.0.0", "tls_cert": "a.crt", "tls_key": "a.key", "users": {"a": ALICE},
      "port": 8443}, "https://127.0.0.1:8443/status"),
])
def test_the_cli_reaches_its_endpoint(admin, url):
    assert client.url(load(admin), "status") == url
