"""Repair's SQL (catalog/copies.py) and its decisions (transfer/repair.py), without
processes: who repairs an instance, where the copies go, which surplus copies go, and
that nothing is ever dropped below ``replicas`` live copies. The real thing, with
peers killed by PID, is tests/cluster/test_repair.py."""
from __future__ import annotations

import dataclasses

import sqlite3
import time
from types import SimpleNamespace

import pytest

from pacsp2p.catalog import copies
from pacsp2p.catalog.copies import Liveness
from pacsp2p.catalog.db import create_schema
from pacsp2p.config import ConfigError, from_dict
from pacsp2p.strategies import Strategies
from pacsp2p.transfer.repair import Repair, Throttle
from pacsp2p.types import ArchiveInfo, InstanceInfo, Location

SHA = "ab" * 32


@pytest.fixture
def conn(tmp_path):
    c = sqlite3.connect(tmp_path / "catalog.sqlite", isolation_level=None)
    create_schema(c)
    return c


def put(conn, uid, *holders, size=1000, modality="CT"):
    """An instance held on (peer, archive) pairs (size -1: a tombstone)."""
    conn.execute("INSERT OR IGNORE INTO series (SeriesInstanceUID, StudyInstanceUID, "
                 "Modality) VALUES ('1.9.1', '1.9', ?)", (modality,))
    conn.execute("INSERT INTO instances (SOPInstanceUID, SOPClassUID, SeriesInstanceUID) "
                 "VALUES (?, '1.2.840.10008.5.1.4.1.1.2', '1.9.1')", (uid,))
    for seq, (peer, archive, *rest) in enumerate(holders, 1):
        conn.execute("INSERT INTO locations VALUES (?, ?, ?, ?, ?, 1, ?, 0)",
                     (uid, archive, peer, SHA, rest[0] if rest else size, seq))


def lv(dead=(), lost=(), down=(), lost_archives=(), unsettled=()):
    return Liveness(frozenset(dead), frozenset(down), frozenset(lost),
                    frozenset(lost_archives), frozenset(unsettled))


# -- the SQL -------------------------------------------------------------------------

def test_census_counts_live_copies_per_instance(conn):
    put(conn, "1.1", ("a", "x"), ("c", "x"))         # c dead, lost: 1 live
    put(conn, "1.2", ("a", "x"), ("b", "x"))         # fine
    put(conn, "1.3", ("c", "x"), ("d", "x"))         # none live
    put(conn, "1.4", ("a", "x"), ("b", "x"), ("d", "x"))   # d recently dead: 2 live
    put(conn, "1.5", ("a", "x"), ("b", "x"), ("e", "x"))   # 3 live: surplus
    put(conn, "1.6", ("a", "x"), ("b", "x", -1))     # a tombstone does not count
    put(conn, "1.7", ("b", "y"), ("e", "x"))         # b's archive y is down, long
    counts = copies.census(conn, 2, lv(dead={"c", "d"}, lost={"c"}, down={"b\ty"},
                                       lost_archives={"b\ty"}))
    assert counts == {"total": 7, "instances": 4, "unavailable": 1, "repairable": 2,
                      "surplus": 1}


def test_census_is_taken_again_only_when_what_it_counts_changed(conn):
    """census_cached: the saved census while replicas, liveness and the locations (max
    fact per origin, rows per table) are unchanged, with no pass over the locations (13
    CPU-s at 10M, at every start); a new count after any of them changed."""
    put(conn, "1.1", ("a", "x"), ("b", "x"))
    put(conn, "1.2", ("a", "x"))
    seen: list[str] = []
    conn.set_trace_callback(seen.append)

    def cached(replicas=2, state=lv()):
        seen.clear()
        counts, key = copies.census_cached(conn, replicas, state)
        assert counts == copies.census(conn, replicas, state)
        scanned = any("GROUP BY SOPInstanceUID" in q for q in seen[:-1])
        if key is not None:
            copies.save_census(conn, counts, key)
        assert scanned == (key is not None)
        return counts, key is None

    assert cached() == ({"total": 2, "instances": 1, "unavailable": 0, "repairable": 0,
                         "surplus": 0}, False)
    assert cached()[1] and cached()[1]                    # nothing changed: saved one
    assert not cached(replicas=1)[1] and cached(replicas=1)[1]
    assert cached(state=lv(dead={"b"}))[0]["instances"] == 2     # liveness changed
    assert cached(state=lv(dead={"b"}))[1]
    put(conn, "1.3", ("b", "x"))                          # a row written
    assert cached()[0]["total"] == 3
    conn.execute("UPDATE locations SET size = -1, seq = 9 WHERE SOPInstanceUID = '1.3'")
    assert cached()[0]["total"] == 2                      # a tombstone (a newer fact)
    conn.execute("DELETE FROM locations WHERE SOPInstanceUID = '1.2'")
    assert cached()[0] == {"total": 1, "instances": 0, "unavailable": 0, "repairable": 0,
                           "surplus": 0}                  # a row removed without a fact
    assert cached()[1]


def test_work_lists_lost_copies_and_surplus_in_uid_order_after_a_cursor(conn):
    put(conn, "1.1", ("a", "x"), ("c", "x"))
    put(conn, "1.2", ("a", "x"), ("b", "x"))
    put(conn, "1.3", ("c", "x"), ("d", "x"))          # nothing live to copy from
    put(conn, "1.4", ("a", "x"), ("d", "x"))          # d dead, not yet for repair_after
    put(conn, "1.5", ("a", "x"), ("b", "x"), ("e", "x"))
    put(conn, "1.6", ("b", "x"), ("c", "x"))
    state = lv(dead={"c", "d"}, lost={"c"})
    rows = copies.work(conn, 2, state, "")
    assert [i.sop_instance_uid for i, _, _ in rows] == ["1.1", "1.5", "1.6"]
    info, locs, current = rows[0]
    assert current is None                            # one version
    assert info.modality == "CT" and info.study_instance_uid == "1.9" and info.size == 1000
    assert {(loc.peer, loc.archive) for loc in locs} == {("a", "x"), ("c", "x")}
    assert [i.sop_instance_uid for i, _, _ in copies.work(conn, 2, state, "1.1", limit=1)] \
        == ["1.5"]
    assert copies.work(conn, 2, state, "1.6") == []


def test_repair_state_survives_in_the_catalog(conn):
    assert copies.load_state(conn, "repair") == {}
    copies.save_state(conn, "repair", {"done": 3, "bytes": 12})
    assert copies.load_state(conn, "repair") == {"done": 3, "bytes": 12}


def test_census_of_a_large_catalog_is_one_indexed_pass(conn):
    rows = [(f"1.{i}", "x", "abc"[i % 3], SHA, 10, 1, i) for i in range(60000)]
    rows += [(f"1.{i}", "x", "abc"[(i + 1) % 3], SHA, 10, 1, i) for i in range(60000)]
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO locations VALUES (?, ?, ?, ?, ?, ?, ?, 0)", rows)
    conn.execute("COMMIT")
    t0 = time.process_time()          # CPU seconds: a busy machine does not stretch them
    counts = copies.census(conn, 2, lv(dead={"c"}, lost={"c"}))
    took = time.process_time() - t0
    assert counts["instances"] == 40000 and counts["repairable"] == 40000
    assert took < 5.0, took


# -- deciding ------------------------------------------------------------------------

def repair_for(me: str, archives_of: dict, replicas: int = 2, alive=None):
    """A Repair of peer *me* with fake collaborators: *archives_of* {peer: [archive]}."""
    settings = from_dict({"peer": {"name": me}, "cluster": {"replicas": replicas,
                                                           "repair_after": 5}},
                         "<test>", __import__("pathlib").Path("/tmp"))
    alive = alive or {p: True for p in archives_of}
    cands = [ArchiveInfo(a, p, None, alive[p], p == me) for p, names in archives_of.items()
             for a in names]
    ingest = SimpleNamespace(candidates=lambda: cands)
    local = {a: SimpleNamespace(capabilities=frozenset({"open", "store"}), up=True)
             for a in archives_of[me]}
    strategies = Strategies(peer=me)
    return Repair(settings, SimpleNamespace(vector={}), local, strategies, ingest, None,
                  None)


def info(uid):
    return InstanceInfo(uid, "1.2.840.10008.5.1.4.1.1.2", "1.9", "1.9.1", "CT", 1000)


def decide(r, uid, holders, state):
    locs = [Location(uid, a, p, SHA, 1000) for p, a in holders]
    neutral = r.ingest.candidates()
    order = r.strategies.place(info(uid), neutral, r.replicas)
    return r._decide(info(uid), locs, state, order, neutral)


def test_exactly_one_live_holder_repairs_each_instance_and_targets_a_new_peer():
    peers = {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]}
    alive = {"a": True, "b": True, "c": False, "d": True}
    state = lv(dead={"c"}, lost={"c"})
    pairs = [("a", "c"), ("b", "c"), ("d", "c"), ("c", "a"), ("a", "b")]
    for n in range(40):
        uid = f"1.2.{n}"
        holders = [(p, "x") for p in pairs[n % len(pairs)]]
        jobs = {me: decide(repair_for(me, peers, alive=alive), uid, holders, state)
                for me in ("a", "b", "d")}
        doers = [me for me, job in jobs.items() if job is not None]
        if "c" not in dict(holders):
            assert doers == [], (uid, jobs)          # nothing lost
            continue
        assert len(doers) == 1, (uid, jobs)
        job = jobs[doers[0]]
        assert job.kind == "copy" and job.source.peer == doers[0]
        assert (job.source.peer, job.source.archive) in holders
        assert len(job.targets) == 1
        t = job.targets[0]
        assert t.alive and t.peer not in dict(holders)


def test_nothing_is_copied_before_repair_after_or_without_a_live_copy():
    r = repair_for("a", {"a": ["x"], "b": ["x"], "c": ["x"]},
                   alive={"a": True, "b": True, "c": False})
    assert decide(r, "1.3.1", [("a", "x"), ("c", "x")], lv(dead={"c"})) is None
    assert decide(r, "1.3.1", [("c", "x")], lv(dead={"c"}, lost={"c"})) is None


def test_surplus_keeps_the_first_replicas_in_placement_order_and_never_less():
    peers = {"a": ["x"], "b": ["x"], "c": ["x"]}
    holders = [("a", "x"), ("b", "x"), ("c", "x")]
    for n in range(30):
        uid = f"1.4.{n}"
        jobs = {me: decide(repair_for(me, peers), uid, holders, lv()) for me in peers}
        doers = [me for me, j in jobs.items() if j is not None]
        assert len(doers) == 1
        job = jobs[doers[0]]
        assert job.kind == "drop" and len(job.keep) == 2 and len(job.targets) == 1
        assert job.keep[0].peer == doers[0]
        order = repair_for("a", peers).strategies.place(
            info(uid), repair_for("a", peers).ingest.candidates(), 2)
        assert [k.peer for k in job.keep] == [a.peer for a in order][:2]
    # a holder back too recently is neither counted nor dropped: 2 settled, nothing goes
    for me in peers:
        assert decide(repair_for(me, peers), "1.4.0", holders, lv(unsettled={"c"})) is None


def test_a_peer_with_two_archives_gets_the_copy_on_its_other_archive_last():
    r = repair_for("a", {"a": ["x", "y"], "b": ["x"], "c": ["x"]},
                   alive={"a": True, "b": True, "c": False})
    state = lv(dead={"c"}, lost={"c"})
    for n in range(20):
        job = decide(r, f"1.5.{n}", [("a", "x"), ("c", "x")], state)
        if job is not None:
            assert [(t.peer, t.name) for t in job.targets] == [("b", "x")]
    r = repair_for("a", {"a": ["x", "y"], "b": ["x"], "c": ["x"]},
                   alive={"a": True, "b": False, "c": False})
    state = lv(dead={"b", "c"}, lost={"b", "c"})
    job = decide(r, "1.5.0", [("a", "x"), ("c", "x")], state)
    assert [(t.peer, t.name) for t in job.targets] == [("a", "y")]


def test_throttle_paces_starts_at_the_rate():
    from twisted.internet import task
    clock = task.Clock()
    t = Throttle(clock, 1e6)
    fired = []
    for _ in range(5):
        t.wait(500_000).addCallback(lambda _: fired.append(1))
    assert len(fired) == 1                  # the first starts at once
    assert Throttle(clock, 0).wait(10**9).called


def test_config_keys(tmp_path):
    s = from_dict({}, "<t>", tmp_path)
    assert s.cluster.repair_after == 600.0 and s.cluster.repair_rate == 50.0
    s = from_dict({"cluster": {"repair_after": 5, "repair_rate": 0}}, "<t>", tmp_path)
    assert s.cluster.repair_after == 5.0 and s.cluster.repair_rate == 0.0
    with pytest.raises(ConfigError, match="cluster.repair_after"):
        from_dict({"cluster": {"repair_after": 0}}, "f.toml", tmp_path)
    with pytest.raises(ConfigError, match="cluster.repair_rate"):
        from_dict({"cluster": {"repair_rate": -1}}, "f.toml", tmp_path)
    with pytest.raises(ConfigError, match="cluster.repair_rate"):
        from_dict({"cluster": {"repair_rate": "fast"}}, "f.toml", tmp_path)


def test_a_copy_of_a_second_version_just_made_is_counted_as_that_version(tmp_path):
    """The first version on a and b, the second on c and d, d lost: c copies the second
    to a new archive; until the catalog hears of that copy, repair counts it from its own
    memory (``_with_recent``). It counted it as a copy of the CURRENT version: the second
    was copied again (40 of 40 uids), and where c comes first a copy of the first
    version was planned to be dropped as surplus (below ``replicas`` real copies). Real
    catalogs written by the product's writer; the next plan is empty now."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pacsp2p.catalog import facts
    from test_versions import catalog, fact

    first, second = "aa" * 32, "bb" * 32
    peers = {p: ["local"] for p in "abcdef"}
    lost = lv(dead={"d"}, lost={"d"})
    again = []
    for n in range(40):
        uid = f"1.2.3.{n}"
        conn = catalog(tmp_path, f"r{n}")
        for p, sha, stamp in (("a", first, 1000), ("b", first, 1000), ("c", second, 2000),
                              ("d", second, 2500)):
            facts.write_facts(conn, [fact(p, sha, 1, stamp, uid)])
        batch = copies.work(conn, 2, lost, "")
        r = repair_for("c", peers, alive={p: p != "d" for p in peers})
        (job,) = r._plan(batch, lost)
        assert job.kind == "copy" and job.source.sha256 == second and len(job.targets) == 1
        t = job.targets[0]
        r._remember(uid, added=[(t.peer, t.name, job.source.sha256)])     # as _copy_all
        again += [(j.kind, sorted(x.peer for x in j.targets))
                  for j in r._plan(batch, lost)]
        conn.close()
    assert again == []


def test_a_second_version_whose_located_copies_are_lost_is_copied_from_a_conflict(tmp_path):
    """The first version on a and b, the second's one location on c (lost) and its other
    copy kept beside the first on a (a conflict). a plans a copy of the second version
    from that conflict copy (where its archive opens a conflict by hash: the embedded
    one) to archives holding neither version; b, which keeps none, plans nothing.
    Before, nothing was planned anywhere."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from pacsp2p.catalog import facts
    from test_versions import catalog, fact

    first, second = "aa" * 32, "bb" * 32
    peers = {p: ["local"] for p in "abcdef"}
    lost = lv(dead={"c"}, lost={"c"})
    uid = "1.2.3.7"
    for me in "ab":
        conn = catalog(tmp_path, me)
        for p, sha, stamp in (("a", first, 1000), ("b", first, 1000), ("c", second, 2000)):
            facts.write_facts(conn, [fact(p, sha, 1, stamp, uid)])
        if me == "a":
            conn.execute("INSERT INTO conflicts VALUES (?, 'local', ?, '')", (uid, second))
        r = repair_for(me, peers, alive={p: p != "c" for p in peers})
        # an archive that cannot read a conflict by its hash (Orthanc, DIMSE): no source
        assert r._plan(copies.work(conn, 2, lost, ""), lost) == []
        r.archives["local"].keeps_versions = True           # as the embedded archive
        keeping = r.liveness().keeping
        assert keeping == frozenset({"local"})
        here = dataclasses.replace(lost, keeping=keeping)
        jobs = r._plan(copies.work(conn, 2, here, ""), here)
        if me == "b":
            assert jobs == []
            continue
        (job,) = jobs
        assert job.kind == "copy" and (job.source.peer, job.source.archive,
                                       job.source.sha256) == ("a", "local", second)
        assert len(job.targets) == 2 and not {t.peer for t in job.targets} & set("abc")
