"""Every archive a source (issue 14): a retrieval's sources are archives, not peers.

Deterministic, like test_retrieve_plan.py: a ``Clock`` for the reactor, in-memory
archives whose ``open`` answers after a latency (or when the test says). This peer "me"
manages several archives; other peers (a fake overlay) may manage several too. The
replica selection hook is called for every instance, and its order is what ``single``
reads, what work stealing prefers and what failover goes down.
"""
from __future__ import annotations

import hashlib
import io

from twisted.internet import defer
from twisted.internet.task import Clock

from pacsp2p.adapters.http import Unreachable
from pacsp2p.strategies import Strategies, hookimpl
from pacsp2p.transfer.retrieve import Retrieval
from pacsp2p.types import InstanceRef, Location

ME = "me"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SIZE = 100_000


def sha_of(uid: str) -> str:
    """The catalog's hash of instance *uid* here (each copy carries it: checked)."""
    return hashlib.sha256(uid.encode()).hexdigest()


class File(io.BytesIO):
    def __init__(self, uid, where):
        super().__init__(f"{uid}@{where}".encode())
        self.sha256 = sha_of(uid)


class Archive:
    """An in-memory archive; open() answers after *latency* simulated seconds, or fails
    with *broken* (an exception) from the moment it is set."""

    capabilities = frozenset({"open"})
    up = True

    def __init__(self, peer, name, clock, latency=0.05, max_fetches=None, site=None):
        self.peer, self.name, self.clock, self.latency = peer, name, clock, latency
        self.site = site
        if max_fetches is not None:
            self.max_fetches = max_fetches
        self.asked: list[str] = []
        self.running = self.most = 0
        self.broken: Exception | None = None

    def open(self, uid, sha256=None):
        self.asked.append(uid)
        self.running += 1
        self.most = max(self.most, self.running)
        d = defer.Deferred()

        def answer():
            self.running -= 1
            if self.broken is not None:
                d.errback(self.broken)
            else:
                d.callback(File(uid, f"{self.peer}/{self.name}"))
        self.clock.callLater(self.latency, answer)
        return d


class Members:
    def __init__(self):
        self.on_change = []
        self.members = {}


class Overlay:
    """Other peers' archives, reached by fetch(location)."""

    def __init__(self, archives):
        self.archives = archives               # (peer, archive) -> Archive
        self.membership = Members()

    def alive(self, peer):
        return any(p == peer for p, _ in self.archives)

    def fetch(self, loc):
        return self.archives[(loc.peer, loc.archive)].open(loc.sop_instance_uid, loc.sha256)


def refs(n, where, prefix="1.2.9"):
    """*n* instances, each held by every (peer, archive) in *where*."""
    out = []
    for i in range(n):
        uid = f"{prefix}.{i + 1}"
        locs = tuple(Location(uid, a, p, sha_of(uid), SIZE) for p, a in where)
        out.append(InstanceRef(uid, CT, EXPLICIT, SIZE, locs))
    return out


def retrieval(instances, archives, balancing="work-stealing", plugins=(), remote=None):
    clock = next(iter(archives)).clock if archives else next(iter(remote.values())).clock
    strategies = Strategies(balancing=balancing, peer=ME, plugins=list(plugins))
    overlay = Overlay(remote) if remote else None
    r = Retrieval(instances, {a.name: a for a in archives}, ME, overlay, strategies,
                  reactor=clock)
    return r, clock, strategies


def consume(r, clock, instances, limit=600.0):
    """Open every instance in order, three at a time; {uid: "peer/archive"} or failure."""
    got, queue = {}, list(instances)

    def one():
        if not queue:
            return
        ref = queue.pop(0)

        def ok(f):
            got[ref.sop_instance_uid] = f.read().decode().split("@")[1]
            f.close()
            one()

        def bad(failure):
            got[ref.sop_instance_uid] = failure.value
            one()
        r.open(ref).addCallbacks(ok, bad)

    for _ in range(3):
        one()
    t = 0.0
    while len(got) < len(instances):
        assert t < limit, f"not done after {limit} simulated seconds"
        clock.advance(0.01)
        t += 0.01
    return got


class Rank:
    """A selection plugin: each instance's replicas in the order *order(uid)* gives
    (a list of "peer/archive"); counts its calls."""

    name = "rank-test"

    def __init__(self, order):
        self.order, self.calls = order, 0

    @hookimpl
    def pacsp2p_rank_replicas(self, instance, locations, reader):
        self.calls += 1
        want = self.order(instance.sop_instance_uid)
        return sorted(locations, key=lambda loc: want.index(f"{loc.peer}/{loc.archive}"))


# -- the tests --------------------------------------------------------------------------

def test_one_peer_reads_from_all_its_archives_at_once():
    clock = Clock()
    archives = [Archive(ME, n, clock, 0.05) for n in ("orthanc1", "orthanc2", "local")]
    instances = refs(90, [(ME, a.name) for a in archives])
    r, clock, _ = retrieval(instances, archives)
    got = consume(r, clock, instances)

    assert all(isinstance(v, str) for v in got.values())
    sources = r.status()["sources"]
    assert set(sources) == {"me/orthanc1", "me/orthanc2", "me/local"}
    for name, s in sources.items():
        assert s["peer"] == ME and s["archive"] == name.split("/")[1]
        assert s["completed"] >= 15, sources          # each took a fair share
    assert sum(s["completed"] for s in sources.values()) == 90
    assert {v for v in got.values()} == set(sources)


def test_at_most_max_fetches_per_archive_even_across_retrievals():
    clock = Clock()
    a = Archive(ME, "pacs", clock, 0.05, max_fetches=2)
    b = Archive(ME, "local", clock, 0.05)                  # no max_fetches: default 4
    one = refs(40, [(ME, "pacs"), (ME, "local")], "1.2.7")
    two = refs(40, [(ME, "pacs"), (ME, "local")], "1.2.8")
    r1, clock, strategies = retrieval(one, [a, b])
    r2 = Retrieval(two, {"pacs": a, "local": b}, ME, None, strategies, reactor=clock)
    assert r1.status()["sources"] == {}                   # not started yet
    consume(r1, clock, one[:0])
    done = {}
    for r, instances in ((r1, one), (r2, two)):
        for ref in instances:
            r.open(ref).addCallback(lambda f, uid=ref.sop_instance_uid: done.update({uid: f}))
    t = 0.0
    while len(done) < 80:
        assert t < 600
        clock.advance(0.01)
        t += 0.01
    assert a.most == 2, f"{a.most} fetches at once from an archive with max_fetches = 2"
    assert b.most <= 4
    assert r1.plan.sources["me/pacs"].limit == 2 and r1.plan.sources["me/local"].limit == 4


def test_single_reads_everything_from_the_first_ranked_archive():
    clock = Clock()
    archives = [Archive(ME, n, clock, 0.01) for n in ("a1", "a2", "a3")]
    instances = refs(30, [(ME, a.name) for a in archives])
    rank = Rank(lambda uid: ["me/a2", "me/a3", "me/a1"])
    r, clock, _ = retrieval(instances, archives, "single", [rank])
    got = consume(r, clock, instances)
    assert set(got.values()) == {"me/a2"}
    assert rank.calls == 30, "the selection hook was not asked for every instance"
    assert archives[0].asked == [] and archives[2].asked == []


def test_single_with_nearest_reads_a_study_from_one_archive():
    clock = Clock()
    archives = [Archive(ME, n, clock, 0.01) for n in ("a1", "a2", "a3")]
    instances = refs(30, [(ME, a.name) for a in archives])
    r, clock, _ = retrieval(instances, archives, "single")
    got = consume(r, clock, instances)
    assert len(set(got.values())) == 1, got


def test_failover_goes_down_the_ranking():
    clock = Clock()
    archives = [Archive(ME, n, clock, 0.05) for n in ("a1", "a2", "a3")]
    instances = refs(40, [(ME, a.name) for a in archives])
    rank = Rank(lambda uid: ["me/a1", "me/a2", "me/a3"])
    r, clock, _ = retrieval(instances, archives, "single", [rank])
    consume(r, clock, instances[:0])
    got = {}
    for ref in instances:
        r.open(ref).addBoth(lambda v, uid=ref.sop_instance_uid: got.update({uid: v}))
    clock.advance(0.2)                       # a1 served a few...
    archives[0].broken = Unreachable("GET http://a1/instances: connection refused")
    t = 0.0
    while len(got) < 40:
        assert t < 600
        clock.advance(0.01)
        t += 0.01
    assert not [v for v in got.values() if not isinstance(v, File)], "an instance failed"
    st = r.status()["sources"]
    assert st["me/a1"]["alive"] is False and "refused" in st["me/a1"]["error"]
    assert st["me/a2"]["completed"] == 40 - st["me/a1"]["completed"]
    assert archives[2].asked == [], "a3 was asked although a2 ranks before it"


def test_work_stealing_takes_the_ranking_as_each_sources_preference():
    clock = Clock()
    archives = [Archive(ME, n, clock, 0.05) for n in ("a1", "a2")]
    instances = refs(40, [(ME, "a1"), (ME, "a2")])
    even = {ref.sop_instance_uid for ref in instances[::2]}
    rank = Rank(lambda uid: ["me/a1", "me/a2"] if uid in even else ["me/a2", "me/a1"])
    r, clock, _ = retrieval(instances, archives, "work-stealing", [rank])
    got = consume(r, clock, instances)
    # each archive first took the instances ranking it first: a1 the even ones, a2 the odd
    for archive, wanted in ((archives[0], even), (archives[1], set(got) - even)):
        first = archive.asked[:8]
        assert first and set(first) <= wanted, (archive.name, first)
    # and most of them, as long as it had any of its own left
    assert sum(got[u] == "me/a1" for u in even) >= 15


def test_remote_peers_archives_are_separate_sources():
    clock = Clock()
    local = Archive(ME, "local", clock, 0.05)
    remote = {("peerb", "o1"): Archive("peerb", "o1", clock, 0.05),
              ("peerb", "o2"): Archive("peerb", "o2", clock, 0.05)}
    instances = refs(60, [(ME, "local"), ("peerb", "o1"), ("peerb", "o2")])
    r, clock, strategies = retrieval(instances, [local], remote=remote)
    got = consume(r, clock, instances)
    st = r.status()["sources"]
    assert set(st) == {"me/local", "peerb/o1", "peerb/o2"}
    assert all(s["completed"] > 0 for s in st.values()), st
    assert {v for v in got.values()} == set(st)
    # what was measured is remembered per archive, for nearest and for status
    assert set(strategies.rates) == {(ME, "local"), ("peerb", "o1"), ("peerb", "o2")}


def test_a_dead_peer_drops_all_its_archives():
    clock = Clock()
    local = Archive(ME, "local", clock, 0.05)
    remote = {("peerb", "o1"): Archive("peerb", "o1", clock, 0.05),
              ("peerb", "o2"): Archive("peerb", "o2", clock, 0.05)}
    instances = refs(30, [(ME, "local"), ("peerb", "o1"), ("peerb", "o2")])
    r, clock, _ = retrieval(instances, [local], remote=remote)
    r.start()
    clock.advance(0.02)

    class Member:
        name = "peerb"
    for callback in list(r.overlay.membership.on_change):
        callback(Member(), "dead")
    for a in remote.values():
        a.latency = 10_000                  # never again
    got = consume(r, clock, instances, limit=15)
    st = r.status()["sources"]
    assert st["peerb/o1"]["alive"] is False and st["peerb/o2"]["alive"] is False
    assert all(isinstance(v, str) for v in got.values())


class Lacking(Archive):
    """An archive the catalog says holds everything, whose files of *missing* are gone
    (moved or dropped since: repair, drain, a surplus copy): FileNotFoundError for those."""

    def __init__(self, peer, name, clock, missing, latency=0.01):
        super().__init__(peer, name, clock, latency)
        self.missing = set(missing)

    def open(self, uid, sha256=None):
        if uid not in self.missing:
            return super().open(uid, sha256)
        self.asked.append(uid)
        return defer.fail(FileNotFoundError(f"{uid}: no such file"))


def test_copies_no_longer_held_do_not_drop_the_source():
    # a1 lost its copies of 1-3 (repair moved them) but holds 4 and 5; a2 has 1-4 only
    clock = Clock()
    instances = refs(5, [(ME, "a1"), (ME, "a2")])
    uids = [ref.sop_instance_uid for ref in instances]
    archives = [Lacking(ME, "a1", clock, uids[:3]), Lacking(ME, "a2", clock, uids[4:])]
    rank = Rank(lambda uid: ["me/a1", "me/a2"])
    r, clock, _ = retrieval(instances, archives, "single", [rank])
    got = consume(r, clock, instances)
    assert [got[u] for u in uids] == ["me/a2"] * 3 + ["me/a1"] * 2, got   # none failed
    assert r.status()["sources"]["me/a1"]["alive"] is True
