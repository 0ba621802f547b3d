"""Archives and the adapters that speak to them.

An adapter turns one ``[[archives]]`` config block into an object providing
:class:`pacsp2p.adapters.interface.IArchive`. Adapters are found by name in the
``pacsp2p.adapters`` entry-point group; the built-in ones are registered there exactly
like a vendor's. A site's own adapter can also be loaded straight from a Python file:
``adapter = "path/to/file.py:ClassName"`` (a relative path is relative to the config
file's directory). Every archive is checked against the interfaces it claims as it is
made (``make_archive``). See docs/adapters.md.

How many instances a peer reads from one archive at once is the archive's
``max_fetches``: ``[[archives]] max_fetches`` if set, else the adapter class's
``max_fetches`` (embedded 8, orthanc 4, dicomweb 4, dimse 2), else
``DEFAULT_MAX_FETCHES``.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from zope.interface import implementer

from pacsp2p.adapters.interface import ICatalogLookups, factory_problems, problems
from pacsp2p.config import ArchiveConfig, ConfigError
from pacsp2p.flow import DEFAULT_MAX_FETCHES    # for an adapter that declares none

_loaded_files: dict[Path, object] = {}     # resolved adapter file -> its module


def config_where(cfg: ArchiveConfig, settings) -> str:
    """``FILE: archives[i]`` of *cfg*, to start an adapter's config error messages."""
    index = next((i for i, a in enumerate(getattr(settings, "archives", ()))
                  if a.name == cfg.name), None)
    return (f"{settings.source}: archives[{index}]" if index is not None
            else f"{settings.source}: archives.{cfg.name}")


def is_file_reference(adapter: str) -> bool:
    """``"some/file.py:ClassName"``: an adapter class in a Python file."""
    path, sep, cls = adapter.rpartition(":")
    return bool(sep and cls and path.endswith(".py"))


def _config_dir(settings) -> Path:
    source = str(settings.source)
    if source.startswith("<"):                  # not read from a file (the defaults)
        return Path.cwd()
    return Path(source).resolve().parent


def _class_from_file(cfg: ArchiveConfig, settings):
    text, _, cls_name = cfg.adapter.rpartition(":")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = _config_dir(settings) / path
    path = path.resolve()

    def fail(reason: str) -> ConfigError:
        return ConfigError(f"{config_where(cfg, settings)}.adapter: cannot load adapter "
                           f"{cfg.adapter!r} for archive {cfg.name!r}: {reason}")

    if not path.is_file():
        raise fail(f"no file {path}")
    module = _loaded_files.get(path)
    if module is None:
        mod_name = "pacsp2p_adapter_" + "".join(c if c.isalnum() else "_" for c in str(path))
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise fail(f"{path} is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            first = (str(e).splitlines() or [""])[0]
            raise fail(f"{path}: {type(e).__name__}: {first}") from None
        _loaded_files[path] = module
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise fail(f"{path} defines no {cls_name!r}")
    if not callable(getattr(cls, "from_config", None)):
        raise fail(f"{cls_name} has no from_config(cfg, settings, reactor, catalog=None) "
                   "class method")
    return cls


def adapter_class(cfg: ArchiveConfig, settings):
    """The adapter class named by ``cfg.adapter``: an entry point of the
    ``pacsp2p.adapters`` group, or ``"file.py:ClassName"``."""
    if is_file_reference(cfg.adapter):
        return _class_from_file(cfg, settings)
    found = {ep.name: ep for ep in entry_points(group="pacsp2p.adapters")}
    if cfg.adapter not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"{settings.source}: archives.{cfg.name}.adapter: unknown adapter "
                          f"{cfg.adapter!r} (known: {known}; or \"path/to/file.py:Class\")")
    return found[cfg.adapter].load()


def make_archive(cfg: ArchiveConfig, settings, reactor, catalog=None):
    """Build the archive object for one config block, checked against the interfaces it
    claims (:func:`pacsp2p.adapters.interface.problems`); raises ConfigError naming the
    config file and archive, the adapter and what it lacks.

    *catalog*: the peer's catalog, or None where there is none (``pacsp2p catalog
    rebuild``); the adapter sees only its lookups (:class:`CatalogLookups`)."""
    cls = adapter_class(cfg, settings)
    _refuse(cfg, settings, f"class {_name(cls)}", factory_problems(cls))
    lookups = CatalogLookups(catalog) if catalog is not None else None
    archive = cls.from_config(cfg, settings, reactor, catalog=lookups)
    _refuse(cfg, settings, _name(cls), problems(archive))
    limit = cfg.max_fetches or getattr(archive, "max_fetches", None) or DEFAULT_MAX_FETCHES
    archive.max_fetches = int(limit)
    return archive


@implementer(ICatalogLookups)
class CatalogLookups:
    """The peer's catalog as an adapter sees it: the read methods ICatalogLookups
    declares, and nothing else (no adapter touches the catalog's tables)."""

    def __init__(self, catalog):
        self.hierarchy = catalog.hierarchy


def _name(cls) -> str:
    return getattr(cls, "__qualname__", None) or repr(cls)


def _refuse(cfg: ArchiveConfig, settings, what: str, found: list[str]) -> None:
    if found:
        raise ConfigError(f"{config_where(cfg, settings)}.adapter: adapter {cfg.adapter!r} "
                          f"({what}) for archive {cfg.name!r} does not provide what it "
                          f"claims: {'; '.join(found)}")
