"""Strategies: placement, replica selection and load balancing as pluggy plugins.

``Strategies`` owns the plugin manager: it registers the built-ins (``placement``,
``selection``), then site plugins from the ``pacsp2p.strategies`` entry-point group and
from module paths in config (``[strategies] plugins = ["plugins/my_site.py"]``). The
configured built-in per role answers last; every site plugin is asked before it.
"""

from __future__ import annotations

import importlib.util
import types
from importlib.metadata import entry_points
from pathlib import Path

import pluggy

from pacsp2p.config import ConfigError
from pacsp2p.strategies import balancing as bal
from pacsp2p.strategies import hookspecs
from pacsp2p.strategies import placement as pl
from pacsp2p.strategies import selection as sel
from pacsp2p.strategies.hookspecs import hookimpl

__all__ = ["Strategies", "StrategyError", "hookimpl"]


class StrategyError(Exception):
    """A strategy plugin failed or answered nonsense (message names the plugin)."""


def _load_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"pacsp2p_site_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Strategies:
    def __init__(self, placement: str = "rendezvous", selection: str = "nearest",
                 plugin_paths=(), source: str = "<config>", options: dict | None = None,
                 peer: str = "", balancing: str = "work-stealing"):
        self.pm = pluggy.PluginManager("pacsp2p")
        self.pm.add_hookspecs(hookspecs)
        self.builtin = {}
        for cls in (*pl.BUILTIN, *sel.BUILTIN, *bal.BUILTIN):
            obj = cls()
            self.pm.register(obj, name=cls.name)
            self.builtin[cls.name] = obj
        self.site_plugins = []
        for ep in entry_points(group="pacsp2p.strategies"):
            self._register(ep.load(), ep.name)
        for p in plugin_paths:
            path = Path(p)
            try:
                module = _load_file(path)
            except FileNotFoundError:
                raise ConfigError(f"{source}: strategies.plugins: {path}: no such file") from None
            except Exception as e:
                raise ConfigError(f"{source}: strategies.plugins: {path}: cannot load: "
                                  f"{type(e).__name__}: {e}") from None
            self._register(module, getattr(module, "name", path.stem))
        names = {n for n in self.pm.list_name_plugin() if n[0]}
        known = {n for n, _ in names}
        for role, chosen in (("placement", placement), ("selection", selection),
                             ("balancing", balancing)):
            if chosen not in known:
                raise ConfigError(f"{source}: strategies.{role}: unknown strategy {chosen!r} "
                                  f"(known: {', '.join(sorted(known))})")
        self.placement, self.selection, self.balancing = placement, selection, balancing
        try:
            self.pm.hook.pacsp2p_configure(options=dict(options or {}), peer=peer)
        except Exception as e:
            raise ConfigError(f"{source}: strategies.options: a plugin refused them: "
                              f"{type(e).__name__}: {e}") from None
        self._place = self.pm.subset_hook_caller(
            "pacsp2p_place", [self.builtin[c.name] for c in pl.BUILTIN if c.name != placement])
        self._rank = self.pm.subset_hook_caller(
            "pacsp2p_rank_replicas",
            [self.builtin[c.name] for c in sel.BUILTIN if c.name != selection])
        self._batch = self.pm.subset_hook_caller(
            "pacsp2p_next_batch",
            [self.builtin[c.name] for c in bal.BUILTIN if c.name != balancing])

    def _culprit(self, exc: BaseException) -> str:
        """The name of the plugin whose code raised *exc* (outermost plugin frame)."""
        plugins = list(self.pm.list_name_plugin())
        tb = exc.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            for name, plugin in plugins:
                if frame.f_locals.get("self") is plugin or (
                        isinstance(plugin, types.ModuleType)
                        and frame.f_globals is vars(plugin)):
                    return name
            tb = tb.tb_next
        return "?"

    def _register(self, plugin, name):
        self.pm.register(plugin, name=name)
        self.site_plugins.append(name)

    def place(self, instance, archives, replicas):
        try:
            ranked = self._place(instance=instance, archives=list(archives), replicas=replicas)
        except Exception as e:
            raise StrategyError(f"placement strategy {self._culprit(e)!r} raised "
                                f"{type(e).__name__}: {e}") from e
        if ranked is None:
            raise StrategyError("no placement strategy answered")
        known = {(a.peer, a.name) for a in archives}
        ranked = list(ranked)
        if any((a.peer, a.name) not in known for a in ranked):
            raise StrategyError("placement strategy returned an archive it was not offered")
        return ranked

    def rank(self, instance, locations, reader):
        try:
            ranked = self._rank(instance=instance, locations=list(locations), reader=reader)
        except Exception as e:
            raise StrategyError(f"replica selection strategy {self._culprit(e)!r} raised "
                                f"{type(e).__name__}: {e}") from e
        return list(locations) if ranked is None else list(ranked)

    def next_batch(self, plan, source):
        try:
            batch = self._batch(plan=plan, source=source)
        except Exception as e:
            raise StrategyError(f"load balancing strategy {self._culprit(e)!r} raised "
                                f"{type(e).__name__}: {e}") from e
        return [] if batch is None else list(batch)
