"""Every adapter is checked against the interfaces it claims when it is loaded.

``make_archive`` verifies the adapter class (``IArchiveFactory``) and the archive it
makes (``IArchive`` and the interface of each capability) with
``zope.interface.verify``; a shortfall is one ConfigError line naming the config file and
archive, the adapter and each missing member. Real adapter files are written and loaded
the way a peer loads a site's adapter (``adapter = "file.py:Class"``).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from zope.interface.verify import verifyObject

from pacsp2p.adapters import make_archive
from pacsp2p.adapters.interface import ICatalogLookups
from pacsp2p.catalog import Catalog
from pacsp2p.config import ConfigError, from_dict

HEADER = '''
from twisted.internet import defer
from zope.interface import implementer

from pacsp2p.adapters.interface import IArchive, ICrawls, IKeeps, IOpens, IStores


class Base:
    up = True

    def __init__(self, cfg):
        self.name, self.site = cfg.name, cfg.site

    @classmethod
    def from_config(cls, cfg, settings, reactor, catalog=None):
        return cls(cfg)

    def start(self):
        return None

    def stop(self):
        return None

    def health(self):
        return defer.succeed({"up": True, "latency_ms": 0, "free_bytes": None})

    def open(self, sop_instance_uid, sha256=None):
        return defer.fail(KeyError(sop_instance_uid))
'''

ADAPTERS = {
    "Fine": '''
@implementer(IArchive, IOpens)
class Fine(Base):
    capabilities = frozenset({"open"})
''',
    "NoHealth": '''
@implementer(IArchive, IOpens)
class NoHealth(Base):
    capabilities = frozenset({"open"})
    health = None
''',
    "NoUp": '''
@implementer(IArchive, IOpens)
class NoUp(Base):
    capabilities = frozenset({"open"})
    def __getattribute__(self, name):
        if name == "up":
            raise AttributeError(name)
        return object.__getattribute__(self, name)
''',
    "HalfStore": '''
@implementer(IArchive, IOpens, IStores)
class HalfStore(Base):
    capabilities = frozenset({"open", "store"})
    def store(self, received):
        return None
''',
    "Undeclared": '''
@implementer(IArchive, IOpens)
class Undeclared(Base):
    capabilities = frozenset({"open", "crawl"})
    crawl_qps = 10.0
    def crawl(self, cursor, throttle):
        return defer.succeed(([], None, 0))
''',
    "Unknown": '''
@implementer(IArchive, IOpens, IKeeps)
class Unknown(Base):
    capabilities = frozenset({"open", "teleport"})
    def begin_flush(self, received): pass
    def keep(self, received, meta): pass
    def made_durable(self, meta, stored, flushed): pass
''',
    "OldFactory": '''
@implementer(IArchive, IOpens)
class OldFactory(Base):
    capabilities = frozenset({"open"})
    @classmethod
    def from_config(cls, cfg, settings, reactor):
        return cls(cfg)
''',
    "Curious": '''
@implementer(IArchive, IOpens)
class Curious(Base):
    capabilities = frozenset({"open"})
    @classmethod
    def from_config(cls, cfg, settings, reactor, catalog=None):
        archive = cls(cfg)
        archive.given = catalog
        return archive
''',
    "NotAnArchive": '''
class NotAnArchive(Base):
    capabilities = frozenset({"open"})
''',
}


def load(tmp_path: Path, cls: str, catalog=None):
    source = tmp_path / "site_adapters.py"
    source.write_text(HEADER + "".join(textwrap.dedent(a) for a in ADAPTERS.values()))
    settings = from_dict({"peer": {"data_dir": str(tmp_path / "data")}, "archives": [
        {"name": "local", "adapter": "embedded"},
        {"name": "vendor", "adapter": f"site_adapters.py:{cls}"}]},
        str(tmp_path / "site.toml"), tmp_path)
    return make_archive(settings.archives[1], settings, None, catalog=catalog)


def refused(tmp_path: Path, cls: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, cls)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'site.toml'}: archives[1].adapter: adapter "
                              f"'site_adapters.py:{cls}' ("), message
    assert "for archive 'vendor'" in message
    return message


def test_an_adapter_that_provides_what_it_claims_loads(tmp_path):
    archive = load(tmp_path, "Fine")
    assert archive.name == "vendor" and archive.capabilities == {"open"}


@pytest.mark.parametrize("cls, members", [
    ("NoHealth", ["IArchive.health(): implementation is not a method"]),
    ("NoUp", ["IArchive.up: not provided"]),
    ("HalfStore", ["IStores.store(received, meta): implementation doesn't allow enough "
                   "arguments", "IStores.discard: not provided"]),
    ("Undeclared", ["ICrawls: not declared (@implementer(ICrawls))"]),
    ("Unknown", ["IArchive.capabilities: unknown capability 'teleport'",
                 "IKeeps: declared, but 'keep' is not in capabilities"]),
    ("OldFactory", ["IArchiveFactory.from_config(cfg, settings, reactor, catalog=None): "
                    "implementation doesn't allow enough arguments"]),
    ("NotAnArchive", ["IArchive: not declared (@implementer(IArchive))"]),
])
def test_what_an_adapter_lacks_is_named(tmp_path, cls, members):
    message = refused(tmp_path, cls)
    for member in members:
        assert member in message, message


def test_every_built_in_adapter_provides_what_it_claims(tmp_path):
    plugin = Path(__file__).resolve().parents[2] / "plugins" / "folder_archive.py"
    settings = from_dict({"peer": {"data_dir": str(tmp_path)}, "archives": [
        {"name": "local", "adapter": "embedded"},
        {"name": "dimse", "adapter": "dimse", "ae_title": "PACS", "host": "127.0.0.1",
         "port": 104},
        {"name": "orthanc", "adapter": "orthanc", "url": "http://127.0.0.1:8042"},
        {"name": "web", "adapter": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"},
        {"name": "folder", "adapter": f"{plugin}:FolderArchive", "path": str(tmp_path)},
    ]}, str(tmp_path / "site.toml"), tmp_path)
    made = [make_archive(a, settings, None) for a in settings.archives]
    assert [a.name for a in made] == ["local", "dimse", "orthanc", "web", "folder"]
    assert {"keep", "store_unsynced", "walk"} <= made[0].capabilities
    assert not hasattr(made[1], "catalog")          # given a lookup, not the catalog


def test_an_adapter_gets_the_catalogs_lookups_not_its_tables(tmp_path):
    catalog = Catalog(tmp_path / "catalog.sqlite", None, peer="p1")
    given = load(tmp_path, "Curious", catalog=catalog).given
    verifyObject(ICatalogLookups, given)
    assert given.hierarchy == catalog.hierarchy
    assert not any(hasattr(given, name) for name in ("read", "write", "record", "path"))
    assert load(tmp_path, "Curious").given is None
