"""Strategies that keep their promises (issue 14): installed is not enabled, one name per
plugin, roles checked per role, every hook called where docs/strategies.md says, and
every example of docs/strategies.md runs."""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import pacsp2p.strategies as strategies_module
from pacsp2p.config import ConfigError
from pacsp2p.strategies import Strategies, StrategyError, hookimpl
from pacsp2p.strategies.placement import distinct
from pacsp2p.types import ArchiveInfo, InstanceInfo, InstanceRef, Location, PeerInfo

ROOT = Path(__file__).resolve().parents[2]
CT = "1.2.840.10008.5.1.4.1.1.2"

RANKER = '''
from pacsp2p.strategies import hookimpl

name = "others-first"
CALLS = []

@hookimpl
def pacsp2p_rank_replicas(instance, locations, reader):
    CALLS.append(instance.sop_instance_uid)
    return sorted(locations, key=lambda loc: loc.peer == reader.name)
'''


def ref(uid, *where):
    locs = tuple(Location(uid, archive, peer, "", 1000) for peer, archive in where)
    return InstanceRef(uid, CT, "", 1000, locs), list(locs)


# -- docs/strategies.md --------------------------------------------------------------------

def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("i", range(len(_python_blocks(
    (ROOT / "docs" / "strategies.md").read_text()))))
def test_every_example_of_docs_strategies_runs(i):
    block = _python_blocks((ROOT / "docs" / "strategies.md").read_text())[i]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"docs/strategies.md block {i}", "exec"), {})
    finally:
        os.chdir(cwd)


def test_the_docs_show_one_example_per_hook():
    text = (ROOT / "docs" / "strategies.md").read_text()
    blocks = _python_blocks(text)
    for hook in ("pacsp2p_configure", "pacsp2p_place", "pacsp2p_rank_replicas",
                 "pacsp2p_next_batch"):
        assert any(f"def {hook}(" in b for b in blocks), f"no example of {hook}"
        assert f"| `{hook}(" in text, f"{hook} missing from the table of call sites"


# -- installed is not enabled --------------------------------------------------------------

class _Loaded:
    def __init__(self):
        self.loads = 0


def _fake_entry_points(monkeypatch, tmp_path, counter):
    """An installed entry point ``others_first`` (group pacsp2p.strategies) whose module
    counts its imports."""
    (tmp_path / "site_others_first.py").write_text(RANKER + "\nimport builtins\n"
                                                   "builtins._pacsp2p_test_loads += 1\n")
    sys.path.insert(0, str(tmp_path))
    import builtins
    builtins._pacsp2p_test_loads = 0
    ep = EntryPoint("others_first", "site_others_first", "pacsp2p.strategies")
    monkeypatch.setattr(strategies_module, "entry_points",
                        lambda group: [ep] if group == "pacsp2p.strategies" else [])
    return builtins


def test_an_installed_plugin_not_named_in_config_is_not_even_imported(monkeypatch, tmp_path):
    b = _fake_entry_points(monkeypatch, tmp_path, _Loaded())
    try:
        s = Strategies(peer="north")
        assert b._pacsp2p_test_loads == 0
        assert s.site_plugins == []
        r, locs = ref("1.2.1", ("north", "local"), ("south", "local"))
        assert [l.peer for l in s.rank(r, locs, PeerInfo("north"))] == ["north", "south"]

        s = Strategies(plugins=["others_first"], peer="north")
        assert b._pacsp2p_test_loads == 1
        assert s.site_plugins == ["others_first"]
        assert [l.peer for l in s.rank(r, locs, PeerInfo("north"))] == ["south", "north"]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("site_others_first", None)


def test_an_unknown_entry_point_name_is_refused_listing_the_installed_ones(monkeypatch,
                                                                          tmp_path):
    _fake_entry_points(monkeypatch, tmp_path, _Loaded())
    try:
        with pytest.raises(ConfigError) as e:
            Strategies(plugins=["cost_place"], source="peer.toml")
        assert str(e.value).startswith("peer.toml: strategies.plugins[0]: no strategy "
                                       "plugin 'cost_place' is installed")
        assert "others_first" in str(e.value)
    finally:
        sys.path.remove(str(tmp_path))


# -- names, options, roles -----------------------------------------------------------------

def test_a_file_plugin_is_named_by_its_name_variable_else_its_file_name(tmp_path):
    named = tmp_path / "rules_v2.py"
    named.write_text(RANKER)
    bare = tmp_path / "plain.py"
    bare.write_text(RANKER.replace('name = "others-first"\n', ""))
    s = Strategies(plugins=[named, bare])
    assert s.site_plugins == ["others-first", "plain"]
    assert s.describe()["plugins"] == ["others-first", "plain"]


def test_options_go_to_the_plugin_of_that_name_only(tmp_path):
    seen = {}

    class A:
        name = "a"

        @hookimpl
        def pacsp2p_configure(self, options, peer):
            seen["a"] = (options, peer)

    class B:
        name = "b"

        @hookimpl
        def pacsp2p_configure(self, options, peer):
            seen["b"] = (options, peer)

    Strategies(plugins=[A(), B()], options={"a": {"x": 1}}, peer="north")
    assert seen == {"a": ({"x": 1}, "north"), "b": ({}, "north")}


def test_an_options_table_nobody_owns_is_refused():
    class A:
        name = "a"

    with pytest.raises(ConfigError) as e:
        Strategies(plugins=[A()], options={"pin_modality": {"MG": "x"}}, source="p.toml")
    assert str(e.value) == ("p.toml: strategies.options.pin_modality: no enabled plugin "
                            "is named 'pin_modality' (enabled: a)")


def test_two_plugins_of_one_name_are_refused(tmp_path):
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text(RANKER)
    two.write_text(RANKER)
    with pytest.raises(ConfigError, match=r"plugins\[1\]: a strategy named 'others-first' "
                                          "is already enabled"):
        Strategies(plugins=[one, two])
    with pytest.raises(ConfigError, match="'nearest' is already built in"):
        Strategies(plugins=[type("N", (), {"name": "nearest"})()])


@pytest.mark.parametrize("role,wrong,known", [
    ("placement", "nearest", "rendezvous, least-used, site-aware"),
    ("selection", "rendezvous", "nearest"),
    ("balancing", "nearest", "work-stealing, single"),
])
def test_an_unknown_role_name_lists_that_roles_names_only(role, wrong, known):
    with pytest.raises(ConfigError) as e:
        Strategies(**{role: wrong}, source="p.toml")
    assert str(e.value) == (f"p.toml: strategies.{role}: unknown {role} strategy "
                            f"{wrong!r} (known: {known})")


def test_a_role_may_name_an_enabled_plugin_of_that_role(tmp_path):
    path = tmp_path / "r.py"
    path.write_text(RANKER)
    s = Strategies(selection="others-first", plugins=[path])
    assert s.describe()["selection"] == "others-first"
    with pytest.raises(ConfigError) as e:         # it does not place
        Strategies(placement="others-first", plugins=[path], source="p.toml")
    assert "(known: rendezvous, least-used, site-aware)" in str(e.value)


def test_a_role_naming_a_plugin_falls_back_to_the_default_builtin():
    class Sometimes:
        name = "sometimes"

        @hookimpl
        def pacsp2p_place(self, instance, archives, replicas):
            return archives[::-1] if instance.modality == "MG" else None

    s = Strategies(placement="sometimes", plugins=[Sometimes()])
    archives = [ArchiveInfo("a", "p1"), ArchiveInfo("b", "p2")]
    mg = InstanceInfo("1.2.3", CT, "1", "2", "MG", 10)
    ct = InstanceInfo("1.2.4", CT, "1", "2", "CT", 10)
    assert [a.name for a in s.place(mg, archives, 1)] == ["b", "a"]
    assert len(s.place(ct, archives, 1)) == 2             # rendezvous answered


def test_plugins_are_asked_in_config_order_before_the_builtin():
    order = []

    def plugin(name, answer):
        class P:
            @hookimpl
            def pacsp2p_rank_replicas(self, instance, locations, reader):
                order.append(name)
                return answer
        p = P()
        p.name = name
        return p

    s = Strategies(plugins=[plugin("first", None), plugin("second", None),
                            plugin("third", [])])
    r, locs = ref("1.2.1", ("a", "x"), ("b", "y"))
    s.rank(r, locs, PeerInfo("a"))
    assert order == ["first", "second", "third"]


def test_a_ranking_keeps_every_replica_and_refuses_foreign_ones():
    class Partial:
        name = "partial"

        @hookimpl
        def pacsp2p_rank_replicas(self, instance, locations, reader):
            return [locations[2]]

    r, locs = ref("1.2.1", ("a", "x"), ("b", "y"), ("c", "z"))
    assert [l.peer for l in Strategies(plugins=[Partial()]).rank(r, locs, PeerInfo("q"))] \
        == ["c", "a", "b"]

    class Foreign:
        name = "foreign"

        @hookimpl
        def pacsp2p_rank_replicas(self, instance, locations, reader):
            return [Location("1.2.1", "elsewhere", "zz", "", 1)]

    with pytest.raises(StrategyError, match="'foreign' returned a location"):
        Strategies(plugins=[Foreign()]).rank(r, locs, PeerInfo("q"))


def test_a_plugin_that_raises_is_named():
    class Boom:
        name = "boom"

        @hookimpl
        def pacsp2p_rank_replicas(self, instance, locations, reader):
            raise RuntimeError("kaput")

    r, locs = ref("1.2.1", ("a", "x"), ("b", "y"))
    with pytest.raises(StrategyError) as e:
        Strategies(plugins=[Boom()]).rank(r, locs, PeerInfo("q"))
    assert str(e.value) == "replica selection strategy 'boom' raised RuntimeError: kaput"


# -- the built-ins ----------------------------------------------------------------------------

def test_nearest_ranks_own_archives_then_same_site_then_by_measured_rate():
    s = Strategies()
    s.sites.update({("me", "o1"): "north", ("me", "o2"): "north", ("b", "x"): "north",
                    ("c", "y"): "south", ("d", "z"): "south", ("e", "w"): None})
    s.rates.update({("d", "z"): 20e6, ("c", "y"): 5e6})
    r, locs = ref("1.2.1", ("e", "w"), ("c", "y"), ("d", "z"), ("b", "x"), ("me", "o2"),
                  ("me", "o1"))
    ranked = [(l.peer, l.archive) for l in s.rank(r, locs, PeerInfo("me", "north"))]
    assert set(ranked[:2]) == {("me", "o1"), ("me", "o2")}       # this peer's archives
    assert ranked[2] == ("b", "x")                                # same site
    assert ranked[3:5] == [("d", "z"), ("c", "y")]                # faster first
    assert ranked[5] == ("e", "w")                                # not measured: last


def test_nearest_gives_one_reader_one_order_for_every_instance_and_readers_differ():
    s = Strategies()
    where = [("p1", "a"), ("p2", "a"), ("p3", "a"), ("p4", "a")]
    firsts = {}
    for reader in ("r1", "r2", "r3", "r4", "r5", "r6"):
        orders = {tuple(l.peer for l in s.rank(*ref(f"1.2.{i}", *where), PeerInfo(reader)))
                  for i in range(20)}
        assert len(orders) == 1, f"{reader} ranks instances differently"
        firsts[reader] = next(iter(orders))[0]
    assert len(set(firsts.values())) > 1, "every reader prefers the same archive"


def test_the_rule_of_distinct_copies():
    a = ArchiveInfo
    # one peer alone with two archives: both copies on it, one per archive
    assert [x.name for x in distinct([a("o1", "p"), a("o2", "p")])] == ["o1", "o2"]
    # distinct peers before a second archive of one peer
    got = distinct([a("o1", "p"), a("o2", "p"), a("l", "q")])
    assert [(x.peer, x.name) for x in got] == [("p", "o1"), ("q", "l"), ("p", "o2")]
    # among new peers, a new site first
    got = distinct([a("o1", "p", "s1"), a("l", "q", "s1"), a("m", "r", "s2")])
    assert [x.peer for x in got] == ["p", "r", "q"]
    # the built-ins apply it
    s = Strategies()
    info = InstanceInfo("1.2.99", CT, "1", "2", "CT", 10)
    placed = s.place(info, [a("o1", "p"), a("o2", "p"), a("l", "q")], 2)
    assert {x.peer for x in placed[:2]} == {"p", "q"}
