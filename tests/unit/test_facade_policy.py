"""Who may talk to the facade (issue 17): the [facade] TLS and AE keys, [modalities], TLS
destinations and the admin bind in the config (one-line errors naming file, key and
reason); the facade's Policy (called AE, hosts, certificates, rights, move_to); the CA
commands for DICOM certificates; the BCP 195 TLS options.

Real processes and real clients are in tests/integration/test_dicom_tls.py and
tests/integration/test_modality_hosts.py.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pacsp2p import config
from pacsp2p.config import ConfigError
from pacsp2p.dicom import tls as dtls
from pacsp2p.dicom.negotiation import Refused
from pacsp2p.facade.policy import ALL, Policy
from pacsp2p.overlay import tls as otls

SRC = "etc/peer.toml"


def parse(doc: dict, base: Path = Path("/srv/pacs")):
    return config.from_dict(doc, SRC, base)


def error(doc: dict, base: Path = Path("/srv/pacs")) -> str:
    with pytest.raises(ConfigError) as info:
        parse(doc, base)
    message = str(info.value)
    assert "\n" not in message, "one line"
    assert message.startswith(SRC + ": ")
    return message


# -- config ---------------------------------------------------------------------------------

def test_defaults_keep_todays_behaviour_but_check_the_called_ae():
    f = parse({}).facade
    assert f.tls_port == 0 and f.tls_cert is None and f.tls_only is False
    assert f.tls_require_client_cert is True
    assert f.check_called_ae is True and f.check_modality_host is True
    assert f.allow_unknown == ("store", "find", "move", "get")
    assert parse({}).modalities == {}


def test_tls_keys_and_paths_relative_to_the_config_file():
    f = parse({"facade": {"tls_port": 2762, "tls_cert": "tls/a.crt", "tls_key": "/k/a.key",
                          "tls_ca": "tls/ca.crt", "tls_only": True}}).facade
    assert f.tls_port == 2762 and f.tls_only
    assert f.tls_cert == Path("/srv/pacs/tls/a.crt") and f.tls_key == Path("/k/a.key")
    assert f.tls_ca == Path("/srv/pacs/tls/ca.crt")


@pytest.mark.parametrize("facade, key, reason", [
    ({"tls_port": 2762}, "facade.tls_cert", "is required with tls_port"),
    ({"tls_port": 2762, "tls_cert": "a", "tls_key": "b"}, "facade.tls_ca",
     "is required to check client certificates"),
    ({"tls_port": 11112, "tls_cert": "a", "tls_key": "b", "tls_ca": "c"},
     "facade.tls_port", "must differ from port"),
    ({"tls_port": 70000}, "facade.tls_port", "must be an integer 1-65535"),
    ({"tls_only": True}, "facade.tls_only", "needs tls_port"),
    ({"tls_require_client_cert": "yes"}, "facade.tls_require_client_cert", "true or false"),
    ({"check_called_ae": 1}, "facade.check_called_ae", "true or false"),
    ({"allow_unknown": ["store", "delete"]}, "facade.allow_unknown", "'delete' is not one"),
])
def test_facade_security_errors(facade, key, reason):
    message = error({"facade": facade})
    assert f": {key}: " in message and reason in message, message


def test_tls_without_client_certificates_needs_no_ca():
    f = parse({"facade": {"tls_port": 2762, "tls_cert": "a", "tls_key": "b",
                          "tls_require_client_cert": False}}).facade
    assert f.tls_ca is None and not f.tls_require_client_cert


def test_modalities():
    s = parse({"destinations": {"WS1": "10.1.3.4:104", "PACS2": "10.1.3.5:104"},
               "modalities": {
                   "CT1": {"host": "10.1.2.3"},
                   "MR1": "mr1.radiology.example.org",
                   "WS1": {"host": ["10.1.3.0/24", "::1"], "allow": ["find", "move"],
                           "move_to": ["WS1"]},
                   "US1": {"allow": []}}})
    m = s.modalities
    assert m["CT1"].hosts == ("10.1.2.3",) and m["CT1"].allow == config.RIGHTS
    assert m["CT1"].move_to is None
    assert m["MR1"].hosts == ("mr1.radiology.example.org",)
    assert m["WS1"].hosts == ("10.1.3.0/24", "::1") and m["WS1"].allow == ("find", "move")
    assert m["WS1"].move_to == ("WS1",)
    assert m["US1"].hosts == () and m["US1"].allow == ()


@pytest.mark.parametrize("modalities, key, reason", [
    ({"CT1": {"host": "10.1.2.300"}}, "modalities.CT1.host", "must be an IP address"),
    ({"CT1": {"host": "10.1.2.0/33"}}, "modalities.CT1.host", "must be an IP address"),
    ({"CT1": {"host": "bad host"}}, "modalities.CT1.host", "must be an IP address"),
    ({"CT1": {"host": []}}, "modalities.CT1.host", "at least one host"),
    ({"CT1": {"allow": ["write"]}}, "modalities.CT1.allow", "'write' is not one"),
    ({"CT1": {"move_to": ["NOWHERE"]}}, "modalities.CT1.move_to", "not a [destinations]"),
    ({"CT1": {"certificate": "ct1"}}, "modalities.CT1.certificate", "needs [facade] tls"),
    ({"CT1": {"colour": "red"}}, "modalities.CT1.colour", "unknown key"),
    ({"CT1": 3}, "modalities.CT1", 'must be "host" or a table'),
    ({"A\\B": "10.0.0.1"}, "modalities.A\\B", "AE title"),
])
def test_modality_errors(modalities, key, reason):
    message = error({"modalities": modalities})
    assert f": {key}: " in message and reason in message, message


def test_tls_destinations():
    s = parse({"facade": {"tls_port": 2762, "tls_cert": "f.crt", "tls_key": "f.key",
                          "tls_ca": "ca.crt"},
               "destinations": {"WS1": {"address": "10.0.0.9:2762", "tls": True},
                                "WS2": {"address": "10.0.0.8:2762", "tls": True,
                                        "tls_ca": "/etc/vendor-ca.pem"},
                                "WS3": "10.0.0.7:104"}})
    d = s.destinations
    assert d["WS1"].tls and d["WS1"].tls_ca == Path("/srv/pacs/ca.crt")
    assert d["WS1"].tls_cert == Path("/srv/pacs/f.crt")
    assert d["WS2"].tls_ca == Path("/etc/vendor-ca.pem")
    assert not d["WS3"].tls and d["WS3"].tls_ca is None


@pytest.mark.parametrize("dest, key, reason", [
    ({"address": "h:1", "tls": True}, "destinations.WS1.tls", "needs a CA"),
    ({"address": "h:1", "tls": True, "tls_ca": "x", "mode": "direct"},
     "destinations.WS1.tls", 'mode = "relay" only'),
    ({"address": "h:1", "tls_ca": "x"}, "destinations.WS1.tls_ca", "only used with tls"),
])
def test_tls_destination_errors(dest, key, reason):
    message = error({"destinations": {"WS1": dest}})
    assert f": {key}: " in message and reason in message, message


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_admin_on_loopback(bind):
    assert parse({"admin": {"bind": bind}}).admin.bind == bind


@pytest.mark.parametrize("bind", ["0.0.0.0", "", "10.1.2.3", "::", "admin.example.org"])
def test_admin_beyond_loopback_is_refused_until_it_has_tls_and_authentication(bind):
    message = error({"admin": {"bind": bind}})
    assert ": admin.bind: " in message and "not a loopback address" in message
    assert "needs HTTPS (admin.tls_cert and admin.tls_key) and authentication " \
           "(admin.users, or admin.tls_client_ca)" in message     # (issue 16.1)


def test_the_example_configs_still_load():
    root = Path(__file__).resolve().parents[2] / "etc"
    for path in [root / "pacsp2p.toml", *sorted((root / "three-peers").glob("*.toml"))]:
        config.load(path)


# -- the policy -----------------------------------------------------------------------------

@dataclass
class Assoc:
    calling_ae: str
    called_ae: str = "PACSP2P"
    host: str = "10.1.2.3"
    tls: bool = False
    peer_certificate: str | None = None
    grant: object = None
    peer: str = ""


class Clock:
    def callLater(self, *a, **k):
        return None

    def seconds(self):
        return 0.0


def policy(doc: dict) -> Policy:
    return Policy(parse(doc), Clock())


def refused(p: Policy, assoc: Assoc) -> Refused:
    with pytest.raises(Refused) as info:
        p(assoc)
    return info.value


def test_called_ae_must_be_ours_unless_switched_off():
    r = refused(policy({}), Assoc("ANY", called_ae="ANY-SCP"))
    assert (r.result, r.source, r.reason) == (1, 1, 7)      # called AE not recognized
    assert policy({})(Assoc("ANY")) == policy({}).unknown
    assert policy({"facade": {"check_called_ae": False}})(Assoc("ANY", called_ae="X"))


def test_a_modality_only_from_its_hosts():
    p = policy({"modalities": {"CT1": {"host": "10.1.2.3"},
                               "WS": {"host": ["10.1.3.0/24", "fd00::/64"]},
                               "ANY": {}}})
    assert p(Assoc("CT1")).modality == "CT1"
    r = refused(p, Assoc("CT1", host="198.18.0.2"))
    assert (r.result, r.source, r.reason) == (1, 1, 3)      # calling AE not recognized
    assert "CT1 is not declared at '198.18.0.2'" in str(r)
    assert p(Assoc("WS", host="10.1.3.77")).modality == "WS"
    assert p(Assoc("WS", host="::ffff:10.1.3.77")).modality == "WS"     # v4-mapped
    assert p(Assoc("WS", host="fd00::5")).modality == "WS"
    refused(p, Assoc("WS", host="10.1.4.1"))
    refused(p, Assoc("WS", host="not an address"))
    assert p(Assoc("ANY", host="192.0.2.1")).modality == "ANY"         # no host: any
    off = policy({"facade": {"check_modality_host": False},
                  "modalities": {"CT1": {"host": "10.1.2.3"}}})
    assert off(Assoc("CT1", host="198.18.0.2")).modality == "CT1"


def test_host_names_are_matched_once_resolved():
    p = policy({"modalities": {"MR1": "mr1.example.org"}})
    r = refused(p, Assoc("MR1", host="10.9.9.9"))
    assert r.result == 2                                    # transient: not resolved yet
    p.resolved["mr1.example.org"] = frozenset({ipaddress.ip_address("10.9.9.9")})
    assert p(Assoc("MR1", host="10.9.9.9")).modality == "MR1"
    r = refused(p, Assoc("MR1", host="10.9.9.8"))
    assert (r.result, r.reason) == (1, 3)


def test_resolution_keeps_what_was_known_when_a_name_stops_resolving():
    from twisted.internet import defer

    from pacsp2p.facade import policy as policy_module

    answers = [frozenset({ipaddress.ip_address("10.0.0.1")}), OSError("no such host")]

    def lookup(name):
        answer = answers.pop(0)
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

    p = policy({"modalities": {"MR1": "mr1.example.org"}})
    p._refresh(lookup)
    p._refresh(lookup)
    assert answers == []
    assert p.resolved["mr1.example.org"] == {ipaddress.ip_address("10.0.0.1")}
    assert p(Assoc("MR1", host="10.0.0.1")).modality == "MR1"
    # the function run in the thread pool: every address of a name, v4-mapped unwrapped
    assert ipaddress.ip_address("127.0.0.1") in policy_module._resolve("localhost")


def test_unknown_aes_have_the_rights_of_allow_unknown():
    p = policy({"facade": {"allow_unknown": ["find"]}})
    grant = p(Assoc("WHO"))
    assert grant.rights == {"find"} and grant.modality is None
    r = refused(policy({"facade": {"allow_unknown": []}}), Assoc("WHO"))
    assert (r.result, r.reason) == (1, 3)
    # a declared modality may associate (and C-ECHO) even with no rights at all
    assert policy({"facade": {"allow_unknown": []},
                   "modalities": {"US1": {"allow": []}}})(Assoc("US1")).rights == set()


def test_rights_and_move_destinations_per_association():
    p = policy({"destinations": {"WS1": "10.0.0.1:104", "WS2": "10.0.0.2:104"},
                "modalities": {"CT1": {"allow": ["store"]},
                               "WS1": {"allow": ["find", "move"], "move_to": ["WS1"]}}})
    ct, ws = Assoc("CT1"), Assoc("WS1")
    ct.grant, ws.grant = p(ct), p(ws)
    assert p.permits(ct, "store") and not p.permits(ct, "find")
    assert not p.permits(ct, "get") and not p.permits(ct, "move")
    assert p.permits(ws, "find") and p.permits(ws, "move") and not p.permits(ws, "store")
    assert p.may_move_to(ws, "WS1") and not p.may_move_to(ws, "WS2")
    assert p.may_move_to(ct, "WS2")                       # no move_to: any destination
    assert p.grant_of(Assoc("X")) is ALL                  # no policy decision: no limits


def test_a_modality_bound_to_its_certificate():
    p = policy({"facade": {"tls_port": 2762, "tls_cert": "a", "tls_key": "b", "tls_ca": "c"},
                "modalities": {"CT1": {"certificate": "ct1"}}})
    assert "must use the TLS port" in str(refused(p, Assoc("CT1")))
    r = refused(p, Assoc("CT1", tls=True, peer_certificate="ws9"))
    assert "showed certificate 'ws9', not ct1" in str(r) and r.reason == 3
    assert p(Assoc("CT1", tls=True, peer_certificate="ct1")).modality == "CT1"


# -- certificates -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    root = tmp_path_factory.mktemp("cas")
    otls.init_ca(root / "cluster")
    otls.init_ca(root / "dicom", otls.DICOM_CA)
    otls.issue(root / "dicom", "PACSP2P", kind="server", hosts=["127.0.0.1", "pacs.local"])
    otls.issue(root / "dicom", "CT1", kind="client")
    otls.issue(root / "cluster", "peera")
    return root


def _eku(path: Path):
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(getattr(n, "value", n)) for n in alt]
    except x509.ExtensionNotFound:
        names = []
    return eku, names


def test_ca_issue_makes_server_and_client_certificates(cas):
    eku, names = _eku(cas / "dicom" / "PACSP2P.crt")
    assert eku == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert names == ["PACSP2P", "127.0.0.1", "pacs.local"]
    eku, _ = _eku(cas / "dicom" / "CT1.crt")
    assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_the_cluster_ca_and_a_dicom_ca_are_kept_apart(cas):
    with pytest.raises(otls.TLSError, match="is the cluster CA"):
        otls.issue(cas / "cluster", "CT9", kind="client")
    with pytest.raises(otls.TLSError, match="is a DICOM CA"):
        otls.issue(cas / "dicom", "peerz")
    with pytest.raises(otls.TLSError, match="not an IP address or a DNS name"):
        otls.issue(cas / "dicom", "WS9", kind="server", hosts=["bad host"])


def _settings(cas, **facade):
    d = cas / "dicom"
    doc = {"facade": {"tls_port": 2762, "tls_cert": str(d / "PACSP2P.crt"),
                      "tls_key": str(d / "PACSP2P.key"), "tls_ca": str(d / "ca.crt"),
                      **facade}}
    return parse(doc)


def test_facade_tls_files_are_checked_at_build_time(cas):
    assert dtls.settings_options(_settings(cas)) is not None
    d = cas / "dicom"
    for facade, key, reason in [
            ({"tls_cert": str(d / "nope.crt")}, "facade.tls_cert", "certificate not found"),
            ({"tls_key": str(d / "CT1.key")}, "facade.tls_key", "does not belong"),
            ({"tls_key": str(d / "ca.crt")}, "facade.tls_key", "not a PEM private key"),
            ({"tls_ca": str(d / "PACSP2P.key")}, "facade.tls_ca", "not a PEM CA")]:
        with pytest.raises(ConfigError) as info:
            dtls.settings_options(_settings(cas, **facade))
        message = str(info.value)
        assert f": {key}: " in message and reason in message, message


def test_the_facade_refuses_the_overlay_ca(cas):
    s = parse({"facade": {"tls_port": 2762, "tls_cert": str(cas / "dicom" / "PACSP2P.crt"),
                          "tls_key": str(cas / "dicom" / "PACSP2P.key"),
                          "tls_ca": str(cas / "cluster" / "ca.crt")},
               "overlay": {"tls_dir": str(cas / "cluster")}})
    with pytest.raises(ConfigError, match="facade.tls_ca: is the cluster CA"):
        dtls.settings_options(s)


def test_bcp195_options(cas):
    d = cas / "dicom"
    options = dtls.server_options(d / "PACSP2P.crt", d / "PACSP2P.key", d / "ca.crt", True)
    ctx = options.getContext()
    from OpenSSL import SSL
    conn = SSL.Connection(ctx, None)
    ciphers = conn.get_cipher_list()
    assert ciphers and all(("GCM" in c or "CHACHA20" in c) for c in ciphers), ciphers
    assert not any(("CBC" in c or "RC4" in c or "3DES" in c or "NULL" in c
                    or c.startswith("AES")) for c in ciphers)
    assert ctx.get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert options._options & SSL.OP_NO_COMPRESSION and options._options & SSL.OP_NO_TICKET
    assert dtls.MINIMUM.name == "TLSv1_2"     # the floor; a TLS 1.1 client: integration


def test_handshake_errors_in_words():
    assert dtls.handshake_error("[('SSL routines', '', 'peer did not return a "
                                "certificate')]") == "no client certificate"
    assert "not signed" in dtls.handshake_error("provider signature failure")
    assert "below 1.2" in dtls.handshake_error("unsupported protocol")
    assert dtls.handshake_error("something else") == ""


def test_check_config_names_a_missing_tls_file(tmp_path, capsys, cas):
    from pacsp2p.admin import cli
    d = cas / "dicom"
    path = tmp_path / "peer.toml"
    path.write_text(f'[peer]\ndata_dir = "data"\n[facade]\ntls_port = 2762\n'
                    f'tls_cert = "{d}/missing.crt"\ntls_key = "{d}/PACSP2P.key"\n'
                    f'tls_ca = "{d}/ca.crt"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pacsp2p: {path}: facade.tls_cert: {d}/missing.crt: certificate not found"
    path.write_text(path.read_text().replace("missing.crt", "PACSP2P.crt"))
    assert cli.main(["check-config", "--config", str(path)]) == 0


def test_the_hardened_example_of_the_security_page_loads():
    import re
    import tomllib
    page = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    section = page[page.index("### A hardened example"):]
    doc = tomllib.loads(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    s = parse(doc)
    f = s.facade
    assert f.tls_only and f.tls_port == 2762 and f.tls_require_client_cert
    assert f.allow_unknown == () and f.check_called_ae and f.check_modality_host
    assert s.modalities["CT1"].allow == ("store",) and s.modalities["CT1"].certificate
    assert s.destinations["WS1"].tls
