"""Surplus trimming (``Repair._decide``) and drains (``Drain._plan``) with copies of other
bytes: another version of the UID (other SHA-256) is no spare of a copy, a copy whose
hash is unknown (a crawled archive's: "") is one as before.

40c7a6c made the trim keep ``replicas`` copies of each SHA-256; it counted a crawled
copy ("") as a version of its own, so an instance held by two hashed copies and one
crawled one was no longer trimmed (test 1 fails at 40c7a6c). The real thing, with peers
and second versions sent by storescu, is tests/cluster/test_versions_trim.py.
"""
from __future__ import annotations

from types import SimpleNamespace

from pacsp2p.config import from_dict
from pacsp2p.transfer.drain import Drain
from pacsp2p.types import Location

from test_repair_decisions import SHA, info, lv, repair_for

OTHER = "cd" * 32
PEERS = {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]}


def jobs(uid, holders):
    """{peer: its decision} for *holders* [(peer, sha256)], every peer of PEERS."""
    out = {}
    for me in PEERS:
        r = repair_for(me, PEERS)
        locs = [Location(uid, "x", p, sha, 1000) for p, sha in holders]
        neutral = r.ingest.candidates()
        order = r.strategies.place(info(uid), neutral, r.replicas)
        out[me] = r._decide(info(uid), locs, lv(), order, neutral)
    return {me: j for me, j in out.items() if j is not None}


def test_a_crawled_copy_is_trimmed_as_before():
    for n in range(20):
        got = jobs(f"1.5.{n}", [("a", SHA), ("b", SHA), ("c", "")])
        assert len(got) == 1, got
        (job,) = got.values()
        assert job.kind == "drop" and len(job.targets) == 1 and len(job.keep) == 2


def test_two_copies_of_each_version_are_kept_and_a_third_of_one_dropped():
    for n in range(20):
        assert jobs(f"1.6.{n}", [("a", SHA), ("b", OTHER), ("c", SHA)]) == {}
        got = jobs(f"1.7.{n}", [("a", SHA), ("b", OTHER), ("c", SHA), ("d", SHA)])
        assert len(got) == 1, got
        (job,) = got.values()
        assert [t.sha256 for t in job.targets] == [SHA]
        assert sorted(k.sha256 for k in job.keep) == sorted([SHA, SHA, OTHER])


def drain_plan(holders, mine_sha):
    """Drain._plan at peer a for its copy (sha *mine_sha*) with *holders* elsewhere."""
    r = repair_for("a", PEERS)
    settings = from_dict({"peer": {"name": "a"}, "cluster": {"replicas": 2}}, "<test>",
                         __import__("pathlib").Path("/tmp"))
    ingest = SimpleNamespace(draining=lambda: {("a", "x")},
                             candidates=lambda: [c for c in r.ingest.candidates()
                                                 if c.peer != "a"])
    repair = SimpleNamespace(liveness=lambda: lv(), _targets=r._targets)
    d = Drain(settings, None, {}, r.strategies, ingest, repair, None, None)
    c = SimpleNamespace(uid="1.8.1", archive="x", sha256=mine_sha, size=1000)
    locs = [Location("1.8.1", "x", "a", mine_sha, 1000)] + [
        Location("1.8.1", "x", p, sha, 1000) for p, sha in holders]
    return d._plan(c, info("1.8.1"), locs)


def test_a_drain_counts_copies_of_the_same_bytes_and_unknown_ones():
    mine, targets = drain_plan([("b", SHA), ("c", SHA)], SHA)
    assert targets == []                              # two of ours elsewhere: dropped
    mine, targets = drain_plan([("b", OTHER), ("c", SHA)], SHA)
    assert [t.peer for t in targets] == ["d"]         # one more copy of ours first
    mine, targets = drain_plan([("b", ""), ("c", SHA)], SHA)
    assert targets == []                              # a crawled copy counts, as before
    assert drain_plan([("b", OTHER), ("c", SHA), ("d", OTHER)], SHA) is None   # blocked
