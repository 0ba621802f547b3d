"""Archives and the adapters that speak to them.

An adapter turns one ``[[archives]]`` config block into an object providing
:class:`pacsp2p.adapters.interface.IArchive`. Adapters are found by name in the
``pacsp2p.adapters`` entry-point group; the built-in ones are registered there exactly
like a vendor's.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from pacsp2p.config import ArchiveConfig, ConfigError


def adapter_class(cfg: ArchiveConfig, source: str):
    found = {ep.name: ep for ep in entry_points(group="pacsp2p.adapters")}
    if cfg.adapter not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"{source}: archives.{cfg.name}.adapter: unknown adapter "
                          f"{cfg.adapter!r} (known: {known})")
    return found[cfg.adapter].load()


def make_archive(cfg: ArchiveConfig, settings, reactor):
    """Build the archive object for one config block (raises ConfigError)."""
    return adapter_class(cfg, settings.source).from_config(cfg, settings, reactor)
