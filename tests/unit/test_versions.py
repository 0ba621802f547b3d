"""Which version of an instance the catalog describes (``catalog.versions``), on real
SQLite catalogs written by the product's own writer and sync code (``catalog.facts``).

The real thing with peers, C-GET/C-MOVE and repair is
tests/cluster/test_versions_served.py; here the orders and shapes a cluster test cannot
force: facts learned in every order, a batch of an older release (no copy stamps), a
copy recorded without a stamp (a rebuilt catalog's), a catalog of schema 6 migrated.
"""
from __future__ import annotations

import itertools
import sqlite3

from pacsp2p.catalog import copies, db, facts, schema, tombstones, versions

V1, V2 = "aa" * 32, "bb" * 32
UID = "1.2.3.4"


def catalog(tmp_path, name: str) -> sqlite3.Connection:
    path = tmp_path / f"{name}.sqlite"
    conn = db._connect(path)
    schema.create_schema(conn, path)
    tombstones.create_schema(conn)
    return conn


def fact(peer: str, sha: str, seq: int, stamp: int, uid: str = UID):
    attrs = {"SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
             "SeriesInstanceUID": "1.2.3.9", "StudyInstanceUID": "1.2.3", "PatientID": "P",
             facts.STAMP: stamp}
    return attrs, (uid, "local", peer, sha, 1000, seq)


def origins(tmp_path):
    """Three writers: a and b hold the first version (received at 1000), c the second
    (received at 2000, kept as a plain copy: c held no copy of the first)."""
    out = {}
    for name, sha, stamp in (("a", V1, 1000), ("b", V1, 1000), ("c", V2, 2000)):
        out[name] = catalog(tmp_path, name)
        facts.write_facts(out[name], [fact(name, sha, 1, stamp)])
    return out


def served(conn) -> set:
    return {(loc.peer, loc.sha256) for ref in db.Catalog.refs_of(conn, [UID], True)
            for loc in ref.locations}


def test_every_order_of_learning_serves_the_first_version(tmp_path):
    writers = origins(tmp_path)
    for i, order in enumerate(itertools.permutations("abc")):
        conn = catalog(tmp_path, f"reader{i}")
        for name in order:
            facts.write_wire(conn, facts.read_changes(writers[name], name, 0, 10))
        assert versions.current(conn, [UID]) == {UID: V1}, order
        assert served(conn) == {("a", V1), ("b", V1)}, order
        assert len(db.Catalog.refs_of(conn, [UID])[0].locations) == 3     # where: all


def test_a_batch_of_an_older_release_gives_its_instance_rows_stamp(tmp_path):
    writers = origins(tmp_path)
    conn = catalog(tmp_path, "reader")
    for name in "cab":
        batch = facts.read_changes(writers[name], name, 0, 10)
        del batch[0][versions.WIRE_KEY]                 # as an older release sends it
        facts.write_wire(conn, batch)
    assert served(conn) == {("a", V1), ("b", V1)}


def test_a_copy_without_a_stamp_does_not_make_its_version_the_first(tmp_path):
    """A catalog rebuilt from the archive of the second version's holder records its copy
    with stamp 0; once it learns the stamped copies, the first version is served. Before
    (the least stamp of any copy), the rebuilt peer served the second for ever."""
    writers = origins(tmp_path)
    rebuilt = catalog(tmp_path, "rebuilt")
    facts.write_facts(rebuilt, [fact("e", V2, 1, 0)])
    for name in "abc":
        facts.write_wire(rebuilt, facts.read_changes(writers[name], name, 0, 10))
    assert versions.current(rebuilt, [UID]) == {UID: V1}
    assert served(rebuilt) == {("a", V1), ("b", V1)}


def test_repair_counts_the_copies_of_the_first_version(tmp_path):
    writers = origins(tmp_path)
    conn = catalog(tmp_path, "reader")
    for name in "abc":
        facts.write_wire(conn, facts.read_changes(writers[name], name, 0, 10))
    lost = copies.Liveness(dead_peers=frozenset({"b"}), lost_peers=frozenset({"b"}))
    counts = copies.census(conn, 2, lost)
    # the first version short of a copy (repairable), the second's one copy short too
    assert counts["instances"] == 2 and counts["repairable"] == 1, counts
    (info, locs, current), = copies.work(conn, 2, lost, "")
    assert current == {V1} and current.others == (frozenset({V2}),) and len(locs) == 3


def test_a_tombstone_of_the_first_versions_copies_makes_the_second_current(tmp_path):
    conn = origins(tmp_path)["a"]
    facts.write_facts(conn, [fact("c", V2, 1, 2000)])
    assert versions.current(conn, [UID]) == {UID: V1}
    conn.execute("UPDATE locations SET size = -1 WHERE sha256 = ?", (V1,))
    assert versions.current(conn, [UID]) == {}            # one version left: every copy
    assert served(conn) == {("c", V2)}


def test_a_catalog_of_schema_6_lists_its_instances_of_two_versions(tmp_path):
    conn = origins(tmp_path)["a"]
    facts.write_facts(conn, [fact("c", V2, 1, 2000), fact("b", V1, 1, 1000)])
    conn.execute("DROP TABLE versions")                  # as schema 6 left it
    for name in versions._TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    conn.execute("UPDATE locations SET stamp = 0")
    conn.execute("PRAGMA user_version = 6")
    schema.create_schema(conn, tmp_path / "a.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    # no stamps known: the least hash, alike at every peer
    assert versions.current(conn, [UID]) == {UID: min(V1, V2)}


def test_a_converted_copy_of_the_first_version_beside_a_second_is_served(tmp_path):
    """The first version held converted on b (the dimse adapter's decompressed copy: other
    hash, the same receipt's stamp) and a second version at c: b's copy is the first
    version too -- served, counted by repair, marked current. Before (80b822d), with a
    second version about, only the current hash was: b's copy was 'other'."""
    converted = "cc" * 32
    writers = {}
    for name, sha, stamp in (("a", V1, 1000), ("b", converted, 1000), ("c", V2, 2000)):
        writers[name] = catalog(tmp_path, name)
        facts.write_facts(writers[name], [fact(name, sha, 1, stamp)])
    conn = catalog(tmp_path, "reader")
    for name in "cba":
        facts.write_wire(conn, facts.read_changes(writers[name], name, 0, 10))
    assert served(conn) == {("a", V1), ("b", converted)}
    assert versions.current_copies(conn, [UID]) == {UID: frozenset({V1, converted})}
    assert copies.census(conn, 2, copies.Liveness())["instances"] == 1    # c's, alone
    lost = copies.Liveness(dead_peers=frozenset({"b"}), lost_peers=frozenset({"b"}))
    (info, locs, current), = copies.work(conn, 2, lost, "")
    assert current == {V1, converted} and len(locs) == 3


def test_a_second_version_that_lost_a_copy_is_repairable(tmp_path):
    """The second version held on c and d (two plain copies), d lost: before, repair
    counted the first version's copies only (2: nothing to do) and the second was left
    on c alone; now each version is counted apart, the second is repairable."""
    writers = origins(tmp_path)
    writers["d"] = catalog(tmp_path, "d")
    facts.write_facts(writers["d"], [fact("d", V2, 1, 2500)])
    conn = catalog(tmp_path, "reader")
    for name in "abcd":
        facts.write_wire(conn, facts.read_changes(writers[name], name, 0, 10))
    assert versions.current(conn, [UID]) == {UID: V1}
    lost = copies.Liveness(dead_peers=frozenset({"d"}), lost_peers=frozenset({"d"}))
    counts = copies.census(conn, 2, lost)
    assert counts["repairable"] == 1 and counts["instances"] == 1, counts
    (info, locs, current), = copies.work(conn, 2, lost, "")
    assert current == {V1} and current.others == (frozenset({V2}),) and len(locs) == 4


def test_a_second_version_kept_here_as_a_conflict_is_repairable_here(tmp_path):
    """The second version's one location (c) lost; a keeps those bytes beside the first
    version (a conflict: no location). Before, no live copy of it was left: not
    repairable anywhere; now a's census counts it repairable and its walk names the
    conflict copy (``kept``), a source for its repair."""
    writers = origins(tmp_path)
    conn = writers["a"]
    for name in "bc":
        facts.write_wire(conn, facts.read_changes(writers[name], name, 0, 10))
    conn.execute("INSERT INTO conflicts VALUES (?, 'local', ?, datetime('now'))", (UID, V2))
    lost = copies.Liveness(dead_peers=frozenset({"c"}), lost_peers=frozenset({"c"}),
                           keeping=frozenset({"local"}))      # (an embedded archive)
    assert copies.census(conn, 2, copies.Liveness(dead_peers=frozenset({"c"}), lost_peers=(
        frozenset({"c"}))))["repairable"] == 0       # an archive reading no conflicts
    counts = copies.census(conn, 2, lost)
    assert counts["repairable"] == 1 and counts["unavailable"] == 1, counts
    (info, locs, current), = copies.work(conn, 2, lost, "")
    assert current.others == (frozenset({V2}),) and current.kept == (("local", V2),)
    b = writers["b"]                       # b keeps no conflict: nothing to repair there
    facts.write_wire(b, facts.read_changes(writers["c"], "c", 0, 10))
    assert copies.census(b, 2, lost)["repairable"] == 0
