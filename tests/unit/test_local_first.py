"""``placement.local_first`` (``[strategies] first_copy``): the receiving peer's archive
first, the others in placement's order with those sharing its peer or its site after the
rest (the rule of distinct copies with it picked first); ``Ingest.rank`` applies it with
``"auto"`` only where rendezvous or site-aware ranked the instance."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from twisted.internet.task import Clock

from pacsp2p import config
from pacsp2p.strategies import Strategies
from pacsp2p.strategies.hookspecs import hookimpl
from pacsp2p.strategies.placement import distinct, hrw_order, local_first
from pacsp2p.transfer.ingest import Ingest
from pacsp2p.types import ArchiveInfo, InstanceInfo


def names(order):
    return [f"{a.name}@{a.peer}" for a in order]


def test_the_local_archive_first_then_other_peers_then_other_sites():
    a1, a2 = ArchiveInfo("a1", "A", "north"), ArchiveInfo("a2", "A", "south")
    b, c, d = ArchiveInfo("b", "B", "north"), ArchiveInfo("c", "C", "east"), \
        ArchiveInfo("d", "D", None)
    order = [c, a2, b, d, a1]                   # placement's order for some instance
    # distinct peers first (another site before the same site), then our other archive
    assert names(local_first(order, a1)) == ["a1@A", "c@C", "d@D", "b@B", "a2@A"]
    # site-aware: a distinct site before a distinct peer
    assert names(local_first(order, a1, sites_first=True)) == \
        ["a1@A", "c@C", "d@D", "a2@A", "b@B"]


def test_one_archive_per_peer_keeps_placements_order_after_the_local_one():
    archives = [ArchiveInfo("local", f"peer{i:02d}") for i in range(32)]
    rng = random.Random(14)
    for _ in range(200):
        uid = f"1.2.{rng.randrange(10**9)}"
        order = distinct(hrw_order(uid, archives))
        mine = archives[rng.randrange(32)]
        got = local_first(order, mine)
        assert got[0] is mine and sorted(names(got)) == sorted(names(order))
        assert got[1:] == [a for a in order if a is not mine]
        # the rule of distinct copies gives the same order with ours picked first
        assert got == distinct([mine] + [a for a in order if a is not mine])


def _distinct_before(ordered):
    """``placement.distinct`` as it was before the fourteenth session (a min() over every
    remaining archive per pick: O(n^2), 0.34 ms per instance at 32 archives)."""
    rest, out, peers, sites = list(ordered), [], set(), set()
    while rest:
        def cost(a):
            return (a.peer in peers, (a.site or f"peer:{a.peer}/{a.name}") in sites)
        a = rest.pop(min(range(len(rest)), key=lambda i: (cost(rest[i]), i)))
        out.append(a)
        peers.add(a.peer)
        sites.add(a.site or f"peer:{a.peer}/{a.name}")
    return out


def test_distinct_gives_the_order_it_gave_before():
    rng = random.Random(18)
    for _ in range(2000):
        n = rng.randrange(1, 40)
        archives = {}
        for _ in range(n):
            a = ArchiveInfo(f"a{rng.randrange(3)}", f"p{rng.randrange(max(1, n // 2))}",
                            rng.choice([None, None, "s1", "s2", "s3"]))
            archives[(a.peer, a.name)] = a
        order = hrw_order(f"1.2.{rng.randrange(10**9)}", list(archives.values()))
        assert distinct(order) == _distinct_before(order)


# -- first_copy = "auto" | "local" | "placement" in Ingest.rank ----------------------

class _Pin:
    """A site plugin that ranks every CT itself (its promise: peer c first)."""
    name = "pin-ct"

    @hookimpl
    def pacsp2p_place(self, instance, archives, replicas):
        if instance.modality != "CT":
            return None
        return sorted(archives, key=lambda a: a.peer != "c")


@dataclass
class _Info:
    archives: list
    archives_down: list = field(default_factory=list)
    draining: dict = field(default_factory=dict)


@dataclass
class _Member:
    name: str
    info: _Info
    state: str = "alive"


class _Overlay:                      # the membership view Ingest.candidates reads
    def __init__(self, members):
        self.membership = type("M", (), {"members": {m.name: m for m in members}})()
        self.offers = {}


def _ingest(tmp_path, first_copy, placement="rendezvous", plugins=()):
    settings = config.from_dict({"peer": {"name": "me", "data_dir": str(tmp_path)},
                                 "cluster": {"replicas": 2},
                                 "strategies": {"first_copy": first_copy}},
                                "t.toml", tmp_path)
    mine = {"local": type("A", (), {"site": None, "up": True, "capabilities": {"store"}})()}
    others = [_Member(p, _Info([["local", None]])) for p in ("b", "c", "d")]
    return Ingest(settings, mine, None, Strategies(placement, plugins=plugins),
                  _Overlay(others), Clock())


def _firsts(ingest, modality="MR", n=120):
    out = []
    for i in range(n):
        info = InstanceInfo(f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.4", "1.2", "1.2.3",
                            modality, 1000)
        out.append(ingest.rank(info)[0].peer)
    return out


def test_auto_puts_ours_first_where_rendezvous_ranked(tmp_path):
    assert set(_firsts(_ingest(tmp_path, "auto"))) == {"me"}
    placed = _firsts(_ingest(tmp_path, "placement"))
    assert set(placed) == {"me", "b", "c", "d"}         # rendezvous' own spread


def test_auto_keeps_least_used_and_a_plugins_order(tmp_path):
    ingest = _ingest(tmp_path, "auto", placement="least-used")
    ingest.counts = {("me", "local"): 50, ("b", "local"): 10, ("c", "local"): 20,
                     ("d", "local"): 30}
    assert set(_firsts(ingest)) == {"b"}                 # the emptiest, not ours
    pinned = _ingest(tmp_path, "auto", plugins=[_Pin()])
    assert set(_firsts(pinned, "CT")) == {"c"}           # the plugin's promise
    assert set(_firsts(pinned, "MR")) == {"me"}          # left to rendezvous: local
    # "local" puts ours first whoever ranked
    assert set(_firsts(_ingest(tmp_path, "local", plugins=[_Pin()]), "CT")) == {"me"}
