"""pacsp2p.config: TOML -> typed frozen settings; every error names file, key and reason."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pacsp2p import config
from pacsp2p.config import ConfigError, Destination

SRC = "etc/peer.toml"


def parse(doc: dict, base: Path = Path("/srv/pacs")):
    return config.from_dict(doc, SRC, base)


def error(doc: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    message = str(info.value)
    assert "\n" not in message, "one line"
    return message


# -- defaults --------------------------------------------------------------------------

def test_defaults_without_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = config.load(None)
    assert s.facade.ae_title == "PACSP2P"
    assert s.facade.port == 11112
    assert s.facade.allowed_calling_aes == ()
    assert s.facade.max_pdu == 0
    assert s.data_dir == (tmp_path / "pacsp2p-data").resolve()
    assert s.destinations == {}
    assert [(a.name, a.adapter) for a in s.archives] == [("local", "embedded")]
    assert s.storage.fsync is True
    assert s.admin.bind == "127.0.0.1" and s.admin.port == 11180


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path):
    cfg = tmp_path / "etc" / "peer.toml"
    cfg.parent.mkdir()
    cfg.write_text('[peer]\nname = "a"\ndata_dir = "../data"\n')
    s = config.load(cfg)
    assert s.peer.name == "a"
    assert s.data_dir == (tmp_path / "data").resolve()
    assert s.source == str(cfg)


def test_absolute_data_dir_kept():
    assert parse({"peer": {"data_dir": "/var/lib/pacsp2p"}}).data_dir == Path("/var/lib/pacsp2p")


def test_full_facade_section():
    s = parse({"facade": {"ae_title": "ARCHIVE1", "port": 104, "bind": "127.0.0.1",
                          "allowed_calling_aes": ["CT01 ", "MR01"], "max_pdu": 65536,
                          "max_associations": 8}})
    assert s.facade.ae_title == "ARCHIVE1"
    assert s.facade.port == 104
    assert s.facade.bind == "127.0.0.1"
    assert s.facade.allowed_calling_aes == ("CT01", "MR01")
    assert s.facade.max_pdu == 65536
    assert s.facade.max_associations == 8


def test_settings_are_frozen():
    s = parse({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.facade.port = 1


# -- destinations ----------------------------------------------------------------------

def test_destinations_host_port_and_table():
    s = parse({"destinations": {
        "STORESCP": "127.0.0.1:11113",
        "WS01": {"address": "ws01.example.org:104", "mode": "direct"},
        "V6": "[::1]:4242",
        "DEFAULTMODE": {"address": "10.0.0.2:104"},
        "MANY": {"address": "10.0.0.3:104", "associations": 3}}})
    assert s.destinations == {
        "MANY": Destination("MANY", "10.0.0.3", 104, "relay", associations=3),
        "STORESCP": Destination("STORESCP", "127.0.0.1", 11113, "relay"),
        "WS01": Destination("WS01", "ws01.example.org", 104, "direct"),
        "V6": Destination("V6", "::1", 4242, "relay"),
        "DEFAULTMODE": Destination("DEFAULTMODE", "10.0.0.2", 104, "relay")}


@pytest.mark.parametrize("value, key, reason", [
    ("localhost", "destinations.WS", 'must be "host:port"'),
    ("localhost:", "destinations.WS", 'must be "host:port"'),
    (":104", "destinations.WS", 'must be "host:port"'),
    ("host:99999", "destinations.WS", 'must be "host:port"'),
    ("host:abc", "destinations.WS", 'must be "host:port"'),
    (104, "destinations.WS", 'must be "host:port" or a table'),
    ({"mode": "direct"}, "destinations.WS.address", "is required"),
    ({"address": "h:1", "mode": "teleport"}, "destinations.WS.mode",
     'must be "relay" or "direct"'),
    ({"address": 5}, "destinations.WS.address", 'must be a "host:port" string'),
    ({"address": "h:1", "colour": "red"}, "destinations.WS.colour", "unknown key"),
    ({"address": "h:1", "associations": 0}, "destinations.WS.associations",
     "must be an integer 1-8, got 0"),
    ({"address": "h:1", "associations": 9}, "destinations.WS.associations",
     "must be an integer 1-8, got 9"),
    ({"address": "h:1", "associations": "2"}, "destinations.WS.associations",
     "must be an integer 1-8, got '2'"),
])
def test_destination_errors(value, key, reason):
    message = error({"destinations": {"WS": value}})
    assert message.startswith(f"{SRC}: {key}: "), message
    assert reason in message


def test_destination_ae_title_checked():
    message = error({"destinations": {"A" * 17: "h:1"}})
    assert message.startswith(f"{SRC}: destinations.{'A' * 17}: ")
    assert "AE title" in message


# -- type and value errors, every section ---------------------------------------------------

@pytest.mark.parametrize("doc, key, reason", [
    ({"peer": "x"}, "peer", "must be a table"),
    ({"peer": {"name": 3}}, "peer.name", "must be a string"),
    ({"peer": {"data_dir": ["a"]}}, "peer.data_dir", "must be a path string"),
    ({"peer": {"nmae": "x"}}, "peer.nmae", "unknown key"),
    ({"facade": {"port": "11112"}}, "facade.port", "must be an integer 1-65535"),
    ({"facade": {"port": 0}}, "facade.port", "must be an integer 1-65535, got 0"),
    ({"facade": {"port": 65536}}, "facade.port", "must be an integer 1-65535, got 65536"),
    ({"facade": {"port": True}}, "facade.port", "must be an integer 1-65535"),
    ({"facade": {"port": 11.5}}, "facade.port", "must be an integer 1-65535"),
    ({"facade": {"ae_title": "A" * 17}}, "facade.ae_title", "AE title of 1-16 characters"),
    ({"facade": {"ae_title": "BACK\\SLASH"}}, "facade.ae_title", "without backslash"),
    ({"facade": {"ae_title": "   "}}, "facade.ae_title", "AE title"),
    ({"facade": {"ae_title": 7}}, "facade.ae_title", "must be an AE title"),
    ({"facade": {"bind": 127}}, "facade.bind", "must be an address string"),
    ({"facade": {"allowed_calling_aes": "CT01"}}, "facade.allowed_calling_aes",
     "must be a list of AE titles"),
    ({"facade": {"allowed_calling_aes": ["CT01", 5]}}, "facade.allowed_calling_aes",
     "must list strings"),
    ({"facade": {"allowed_calling_aes": ["X" * 20]}}, "facade.allowed_calling_aes",
     "AE title"),
    ({"facade": {"max_pdu": 100}}, "facade.max_pdu", "must be 0 or 4096..2^31"),
    ({"facade": {"max_pdu": "big"}}, "facade.max_pdu", "must be an integer"),
    ({"facade": {"max_associations": "many"}}, "facade.max_associations", "must be an integer"),
    ({"facade": {"engine": "native"}}, "facade.engine", "was removed"),
    ({"facade": {"engine": "pynetdicom"}}, "facade.engine", "was removed"),
    ({"facade": {"colour": "red"}}, "facade.colour", "unknown key"),
    ({"destinations": ["a"]}, "destinations", "must be a table"),
    ({"storage": {"fsync": "yes"}}, "storage.fsync", "must be true or false"),
    ({"storage": {"fsync": 1}}, "storage.fsync", "must be true or false"),
    ({"storage": {"fsink": True}}, "storage.fsink", "unknown key"),
    ({"admin": {"port": 0}}, "admin.port", "must be an integer 1-65535"),
    ({"admin": {"bind": 1}}, "admin.bind", "must be an address string"),
    ({"admin": {"url": "x"}}, "admin.url", "unknown key"),
    ({"archives": {"name": "x"}}, "archives", "must be an array of tables"),
    ({"archives": ["x"]}, "archives[0]", "must be a table"),
    ({"archives": [{"adapter": "embedded"}]}, "archives[0].name", "is required"),
    ({"archives": [{"name": "a"}, {"name": "a"}]}, "archives[1].name", "duplicate archive name"),
    ({"archives": [{"name": "a", "adapter": 3}]}, "archives[0].adapter",
     "must be an adapter name"),
    ({"colour": "red"}, "colour", "unknown key"),
])
def test_errors_name_file_key_and_reason(doc, key, reason):
    message = error(doc)
    assert message.startswith(f"{SRC}: {key}: "), message
    assert reason in message, message


def test_error_shows_the_bad_value():
    assert "'abc'" in error({"facade": {"port": "abc"}})


# -- load(): files -------------------------------------------------------------------------

def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read config: file not found"):
        config.load(tmp_path / "nope.toml")


def test_load_invalid_toml_names_the_file(tmp_path):
    cfg = tmp_path / "broken.toml"
    cfg.write_text("[facade\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        config.load(cfg)
    assert str(info.value).startswith(f"{cfg}: not valid TOML: ")


def test_load_error_names_the_real_file(tmp_path):
    cfg = tmp_path / "peer.toml"
    cfg.write_text("[facade]\nport = 70000\n")
    with pytest.raises(ConfigError) as info:
        config.load(cfg)
    assert str(info.value) == f"{cfg}: facade.port: must be an integer 1-65535, got 70000"


def test_embedded_archive_unknown_option_is_an_error(tmp_path):
    from pacsp2p.adapters import make_archive
    s = parse({"archives": [{"name": "local", "adapter": "embedded", "colour": "red"}]},
              tmp_path)
    with pytest.raises(ConfigError) as info:
        make_archive(s.archives[0], s, reactor=None)
    assert str(info.value).startswith(f"{SRC}: archives.local.colour: unknown key")


def test_a_host_name_with_an_underscore_is_taken():
    """PACS_01 (an /etc/hosts or NetBIOS name; glibc resolves it): a destination's host
    is checked since 30a1caf as a modality's is, and neither refuses it."""
    s = parse({"destinations": {"WS": "PACS_01.radiology:104"},
               "modalities": {"CT1": {"host": "ct_1"}}})
    assert (s.destinations["WS"].host, s.destinations["WS"].port) == ("pacs_01.radiology", 104)
    assert s.modalities["CT1"].hosts == ("ct_1",)
    assert "must be \"host:port\"" in error({"destinations": {"WS": "pacs 01:104"}})
