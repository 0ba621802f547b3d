"""A holder's first fact after a restart is learned in order by the writer (issue 18).

A peer numbers its facts from its start time in ms (``overlay/reclaim.py``), so the first
fact of a holder after its start is ~1.8e12 above the last one the writer holds, and
``Catalog.learn`` took only an origin's *next* number: the writer pulled from each such
holder at a stream's start (~35 pulls at 32 peers). A ``Commits`` answer now names, for
each fact, the holder's fact before it (``Catalog.previous``); the writer takes the new
fact when that is the last it holds, and a lying or older answer changes nothing.
"""
from __future__ import annotations

import json
import sqlite3

from twisted.internet import defer

from pacsp2p.catalog import db, tombstones
from pacsp2p.catalog.db import Catalog
from pacsp2p.catalog.facts import FACT_FIELDS
from pacsp2p.transfer.commits import GroupCommits
from test_catalog_scale import loc, meta, open_catalog, reactor  # noqa: F401

EPOCH = 1_800_000_000_000


def _holder(reactor, path, start):
    q = Catalog(path, reactor, peer="q")
    q.numbers_from = lambda opened_at: max(opened_at, start)
    reactor.wait(q.start())
    return q


def test_a_holders_first_fact_after_a_restart_is_learned_in_order(tmp_path, reactor):
    q = _holder(reactor, tmp_path / "q.sqlite", EPOCH)
    p = open_catalog(reactor, tmp_path / "p.sqlite")
    try:
        seqs = reactor.wait(defer.gatherResults([q.record(meta(i), loc(i, peer="q"))
                                                 for i in range(3)]))
        assert seqs == [EPOCH + 1, EPOCH + 2, EPOCH + 3]
        assert [q.previous(s) for s in seqs] == [0, EPOCH + 1, EPOCH + 2]
        # without the fact before it (an older holder): not the next number, left to a pull
        assert not p.learn("q", EPOCH + 1, meta(0), loc(0, peer="q"))
        assert not p.learn("q", EPOCH + 1, meta(0), loc(0, peer="q"), prev=5)   # we lack 5
        for i, s in enumerate(seqs):
            assert p.learn("q", s, meta(i), loc(i, peer="q"), prev=q.previous(s))
        reactor.wait(p.record(meta(10), loc(10)))                    # written with it
        assert p.vector["q"] == EPOCH + 3
        reactor.wait(q.stop())
        # the holder restarts later: numbered from its new start, the gap remembered
        q = _holder(reactor, tmp_path / "q.sqlite", EPOCH + 10**6)
        s = reactor.wait(q.record(meta(3), loc(3, peer="q")))
        assert s == EPOCH + 10**6 + 1 and q.previous(s) == EPOCH + 3
        assert p.learn("q", s, meta(3), loc(3, peer="q"), prev=q.previous(s))
        reactor.wait(p.record(meta(11), loc(11)))
        assert p.vector["q"] == s
        assert reactor.wait(p.changes("q", 0, 10)) == reactor.wait(q.changes("q", 0, 10))
    finally:
        reactor.wait(p.stop())
        reactor.wait(q.stop())


def test_a_commits_answer_without_or_with_hostile_prevs_gives_no_previous():
    def answered(answer, n=3):
        queue = [("a", f"1.2.{i}", "0" * 64, defer.Deferred()) for i in range(n)]
        got = []
        for *_, d in queue:
            d.addCallback(got.append)
        GroupCommits._answered(answer, queue)
        return [g["prev"] for g in got]
    seqs = json.dumps([7, 8, 9])
    assert answered({"seqs": seqs, "prevs": "[6, 7, 8]"}) == [6, 7, 8]
    assert answered({"seqs": seqs}) == [None] * 3                       # an older holder
    for hostile in ("[6, 7]", "not json", '{"a": 1}', '[true, "7", 9]', "[-1, 7.5, 1e30]"):
        assert answered({"seqs": seqs, "prevs": hostile}) == [None] * 3, hostile
    deep = "[" * 50_000             # past json's depth: RecursionError, not ValueError
    assert answered({"seqs": seqs, "prevs": deep}) == [None] * 3


def test_a_commits_answer_nested_too_deep_fails_every_commit_it_answers():
    """Not an exception out of the callback, which left every waiting commit (and its
    C-STORE) unanswered."""
    queue = [("a", f"1.2.{i}", "0" * 64, defer.Deferred()) for i in range(2)]
    failed = []
    for *_, d in queue:
        d.addErrback(failed.append)
    GroupCommits._answered({"seqs": "[" * 50_000}, queue)
    assert len(failed) == 2


def test_facts_of_several_holders_learned_together_are_one_transaction(tmp_path, reactor):
    """At 32 peers each C-STORE's two copies are on two holders, both learned first-hand
    by the writer: their facts are written in ONE transaction (issue 18: one commit per
    origin was the writer's CPU on the store's critical path), and one by one, each its
    own outcome, only if that fails."""
    p = open_catalog(reactor, tmp_path / "p.sqlite")
    try:
        commits = []
        p._writer.set_trace_callback(lambda s: s == "COMMIT" and commits.append(s))
        first = p.record(meta(8), loc(8))                # the learned wait while it is written
        for i, holder in enumerate(("q", "r", "s")):
            assert p.learn(holder, 1, meta(i), loc(i, peer=holder))
        reactor.wait(first)
        reactor.wait(p.record(meta(9), loc(9)))
        p._writer.set_trace_callback(None)
        assert len(commits) == 3, commits                # ours, theirs, ours (was 1 + 3 + 1)
        assert {o: p.vector[o] for o in "qrs"} == {"q": 1, "r": 1, "s": 1}
    finally:
        reactor.wait(p.stop())
    conn = db._connect(tmp_path / "w.sqlite")
    db.create_schema(conn)
    tombstones.create_schema(conn)
    conn.execute("CREATE TRIGGER refused BEFORE INSERT ON locations WHEN new.peer = 'r' "
                 "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    groups = [[[{}, [1, "local", h, "ab" * 32, 10] + [""] * (len(FACT_FIELDS) - 5)]]
              for h in ("q", "r")]
    for g, uid in zip(groups, ("1.2.3.1", "1.2.3.2")):
        g[0][1][5 + FACT_FIELDS[5:].index("SOPInstanceUID")] = uid
    results = db.write_origins(conn, groups, "w")
    assert results[0] == (0, None) and isinstance(results[1][1], sqlite3.Error), results
    assert conn.execute("SELECT peer FROM locations").fetchall() == [("q",)]
