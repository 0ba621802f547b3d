"""Strategies: placement, replica selection and load balancing as pluggy plugins.

``Strategies`` owns the plugin manager. It registers the built-ins (``placement``,
``selection``, ``balancing``), then exactly the site plugins the config names
(``[strategies] plugins = ["cost_place", "site/rules.py"]``): an entry-point name of the
``pacsp2p.strategies`` group, or the path of a Python file. Installed is not enabled: an
entry point that is not named is never even imported.

Every plugin has one name: its entry-point name, or, for a file, the module's ``name``
(its file name without ``.py`` if it has none). Its options are the table
``[strategies.options.<that name>]``, handed to its ``pacsp2p_configure``.

For each role (hook) the implementations are asked in this order until one answers
something other than ``None``: the enabled plugins that implement the hook (in the order
``plugins`` lists them; the one the role names, if a plugin, excluded), then the strategy
the role names (``[strategies] placement/selection/balancing``), then, if that was a
plugin, the role's default built-in. Roles name a built-in of that role or an enabled
plugin implementing the role's hook; anything else is refused at start with the names
that role knows.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pluggy

from pacsp2p.config import ConfigError
from pacsp2p.strategies import balancing as bal
from pacsp2p.strategies import hookspecs
from pacsp2p.strategies import placement as pl
from pacsp2p.strategies import selection as sel
from pacsp2p.strategies.hookspecs import hookimpl

__all__ = ["ROLES", "Strategies", "StrategyError", "hookimpl", "is_plugin_file"]

GROUP = "pacsp2p.strategies"

# role -> (its hook, its built-ins, its default)
ROLES = {
    "placement": ("pacsp2p_place", pl.BUILTIN, "rendezvous"),
    "selection": ("pacsp2p_rank_replicas", sel.BUILTIN, "nearest"),
    "balancing": ("pacsp2p_next_batch", bal.BUILTIN, "work-stealing"),
}
_WHAT = {"placement": "placement", "selection": "replica selection",
         "balancing": "load balancing"}
RATE_WEIGHT = 0.5          # of a new measurement in the remembered rate of an archive


class StrategyError(Exception):
    """A strategy plugin failed or answered nonsense (message names the plugin)."""


def is_plugin_file(entry) -> bool:
    """A ``plugins`` entry that is a file path (``.py``, or with a directory part), not
    an entry-point name."""
    if isinstance(entry, Path):
        return True
    text = str(entry)
    return text.endswith(".py") or "/" in text or os.sep in text


def _load_file(path: Path):
    if not path.is_file():            # a FIFO would block the import for ever
        raise ImportError(f"{path} is not a regular file")
    mod_name = "pacsp2p_site_" + "".join(c if c.isalnum() else "_" for c in str(path))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


class Strategies:
    """The peer's strategies. ``place``, ``rank`` and ``next_batch`` call each role's
    chain (see the module docstring); ``sites`` and ``rates`` are what the built-in
    ``nearest`` knows of archives (kept up to date by retrievals).

    *plugins*: entry-point names (str), plugin files (Path, or a str ending in ``.py``
    or with a ``/``), or plugin objects with a ``name`` (modules or instances: tests and
    tools; a config names only the first two)."""

    def __init__(self, placement: str = "rendezvous", selection: str = "nearest",
                 plugins=(), source: str = "<config>", options: dict | None = None,
                 peer: str = "", balancing: str = "work-stealing"):
        self.source = source
        self.pm = pluggy.PluginManager("pacsp2p")
        self.pm.add_hookspecs(hookspecs)
        self.sites: dict[tuple[str, str], str | None] = {}     # (peer, archive) -> site
        self.rates: dict[tuple[str, str], float] = {}          # (peer, archive) -> B/s
        self.builtin: dict[str, object] = {}
        for _role, (_hook, classes, _default) in ROLES.items():
            for cls in classes:
                obj = cls()
                if hasattr(obj, "bind"):
                    obj.bind(self)
                self.pm.register(obj, name=cls.name)
                self.builtin[cls.name] = obj
        self.site_plugins: list[str] = []          # enabled, in config order
        for i, entry in enumerate(plugins):
            self._enable(i, entry)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise ConfigError(f"{source}: strategies.plugins: {e}") from None
        self.chosen = {"placement": placement, "selection": selection,
                       "balancing": balancing}
        self._chains = {role: self._chain(role, self.chosen[role]) for role in ROLES}
        self.placement, self.selection, self.balancing = placement, selection, balancing
        self._configure(dict(options or {}), peer)

    # -- loading -----------------------------------------------------------------------
    def _enable(self, i: int, entry) -> None:
        where = f"{self.source}: strategies.plugins[{i}]"
        if not isinstance(entry, (str, Path)):          # a plugin object (tests, tools)
            plugin, name = entry, getattr(entry, "name", None)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: a plugin object needs a 'name' string")
        elif is_plugin_file(entry):
            path = Path(entry)
            try:
                plugin = _load_file(path)
            except FileNotFoundError:
                raise ConfigError(f"{where}: {path}: no such file") from None
            except Exception as e:
                raise ConfigError(f"{where}: {path}: cannot load: "
                                  f"{type(e).__name__}: {e}") from None
            name = getattr(plugin, "name", None) or path.stem
            if not isinstance(name, str):
                raise ConfigError(f"{where}: {path}: its 'name' must be a string")
        else:
            name = str(entry)
            found = {ep.name: ep for ep in entry_points(group=GROUP)}
            if name not in found:
                known = ", ".join(sorted(found)) or "none installed"
                raise ConfigError(f"{where}: no strategy plugin {name!r} is installed "
                                  f"(entry points of {GROUP}: {known}; or the path of a "
                                  ".py file)")
            try:
                plugin = found[name].load()
            except Exception as e:
                raise ConfigError(f"{where}: entry point {name!r} cannot be loaded: "
                                  f"{type(e).__name__}: {e}") from None
            if isinstance(plugin, type):
                plugin = plugin()
        if name in self.builtin or name in self.site_plugins:
            raise ConfigError(f"{where}: a strategy named {name!r} is already "
                              f"{'built in' if name in self.builtin else 'enabled'}")
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            raise ConfigError(f"{where}: plugin {name!r}: {e}") from None
        self.site_plugins.append(name)

    def _implements(self, name: str, hook: str) -> bool:
        return any(impl.plugin_name == name
                   for impl in getattr(self.pm.hook, hook).get_hookimpls())

    def known(self, role: str) -> list[str]:
        """The names *role* may choose: its built-ins and the enabled plugins that
        implement its hook."""
        hook, classes, _ = ROLES[role]
        return ([c.name for c in classes]
                + [n for n in self.site_plugins if self._implements(n, hook)])

    def _chain(self, role: str, chosen: str) -> list[tuple[str, object]]:
        hook, _classes, default = ROLES[role]
        known = self.known(role)
        if chosen not in known:
            raise ConfigError(f"{self.source}: strategies.{role}: unknown {role} strategy "
                              f"{chosen!r} (known: {', '.join(known)})")
        impls = {impl.plugin_name: impl.function
                 for impl in getattr(self.pm.hook, hook).get_hookimpls()}
        order = [n for n in self.site_plugins if n in impls and n != chosen] + [chosen]
        if chosen not in self.builtin:
            order.append(default)
        return [(n, impls[n]) for n in order]

    def _configure(self, options: dict, peer: str) -> None:
        for key, table in options.items():
            if key not in self.site_plugins:
                enabled = ", ".join(self.site_plugins) or "none"
                raise ConfigError(f"{self.source}: strategies.options.{key}: no enabled "
                                  f"plugin is named {key!r} (enabled: {enabled})")
            if not isinstance(table, dict):
                raise ConfigError(f"{self.source}: strategies.options.{key}: must be a "
                                  f"table, got {table!r}")
        for impl in self.pm.hook.pacsp2p_configure.get_hookimpls():
            name = impl.plugin_name
            if name not in self.site_plugins:
                continue
            try:
                impl.function(options=dict(options.get(name, {})), peer=peer)
            except Exception as e:
                raise ConfigError(f"{self.source}: strategies.options.{name}: plugin "
                                  f"{name!r} refused them: {type(e).__name__}: {e}") from None

    # -- calling ------------------------------------------------------------------------
    def _call(self, role: str, **kwargs):
        """(answer, name of the strategy that gave it) of the first that answers."""
        for name, fn in self._chains[role]:
            try:
                result = fn(**kwargs)
            except Exception as e:
                raise StrategyError(f"{_WHAT[role]} strategy {name!r} raised "
                                    f"{type(e).__name__}: {e}") from e
            if result is not None:
                return result, name
        return None, None

    def describe(self) -> dict:
        """The roles' choices and the enabled plugins (for status)."""
        return {**self.chosen, "plugins": list(self.site_plugins)}

    def place(self, instance, archives, replicas):
        return self.place_named(instance, archives, replicas)[0]

    def place_named(self, instance, archives, replicas):
        """(archives best first, the name of the strategy that ranked them)."""
        archives = list(archives)
        ranked, name = self._call("placement", instance=instance, archives=archives,
                                  replicas=replicas)
        if ranked is None:
            raise StrategyError("no placement strategy answered")
        known = {(a.peer, a.name) for a in archives}
        ranked = list(ranked)
        if any((a.peer, a.name) not in known for a in ranked):
            raise StrategyError(f"placement strategy {name!r} returned an archive it was "
                                "not offered")
        return ranked, name

    def rank(self, instance, locations, reader):
        """*locations* best first for *reader*. Locations the strategy left out follow
        the ones it ranked, in their given order (a ranking never loses a replica)."""
        locations = list(locations)
        if len(locations) < 2 and not self.site_plugins:
            return locations
        ranked, name = self._call("selection", instance=instance, locations=locations,
                                  reader=reader)
        if ranked is None:
            return locations
        out, seen = [], set()
        for loc in ranked:
            if loc not in locations:
                raise StrategyError(f"replica selection strategy {name!r} returned a "
                                    "location it was not offered")
            if loc not in seen:
                seen.add(loc)
                out.append(loc)
        return out + [loc for loc in locations if loc not in seen]

    def next_batch(self, plan, source):
        batch, _name = self._call("balancing", plan=plan, source=source)
        return [] if batch is None else list(batch)

    # -- what the built-ins learn --------------------------------------------------------
    def observe(self, peer: str, archive: str, rate: float) -> None:
        """A retrieval read from (*peer*, *archive*) at *rate* bytes/s while busy."""
        if rate <= 0 or not math.isfinite(rate):
            return
        key = (peer, archive)
        old = self.rates.get(key)
        self.rates[key] = rate if old is None else (
            RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * old)
