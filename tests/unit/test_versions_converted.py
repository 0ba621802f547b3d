"""A data set received once and held as other bytes by an archive's adapter (the dimse
adapter decompresses an RLE data set for a dcmqrscp that takes no compressed syntax, and
records the hash of what that archive holds) is one version, not two: every copy of it
is served and counted by repair. Since b9ef0d9 two hashes were two versions whatever
their stamps: the converted copy, or the original, was 'other' -- not served, not
counted -- so with the peer of the other copy stopped the instance had 'no live
replica' (tests/integration/test_adapter_dimse.py's compressed-to-dcmqrscp test, with a
real dcmqrscp). Real SQLite catalogs written by the product's writer and sync code."""
from __future__ import annotations

import itertools

from pacsp2p.catalog import copies, db, facts, versions
from pacsp2p.catalog.copies import Liveness
from test_versions import UID, V1, V2, catalog, fact, served

CONVERTED = "cc" * 32          # the bytes dcmqrscp holds of V1's data set


def writers(tmp_path, *held):
    out = {}
    for name, sha, stamp in held:
        out[name] = catalog(tmp_path, name)
        facts.write_facts(out[name], [fact(name, sha, 1, stamp)])
    return out


def test_a_converted_copy_is_a_copy_of_the_same_version(tmp_path):
    origin = writers(tmp_path, ("a", V1, 1000), ("b", CONVERTED, 1000))
    for i, order in enumerate(itertools.permutations("ab")):
        conn = catalog(tmp_path, f"reader{i}")
        for name in order:
            facts.write_wire(conn, facts.read_changes(origin[name], name, 0, 10))
        assert versions.current(conn, [UID]) == {}, order          # one version
        assert served(conn) == {("a", V1), ("b", CONVERTED)}, order
        counted = copies.census(conn, 2, Liveness())
        assert counted["instances"] == 0 and counted["total"] == 1, (order, counted)


def test_a_second_version_is_still_one_beside_a_converted_copy(tmp_path):
    origin = writers(tmp_path, ("a", V1, 1000), ("b", CONVERTED, 1000), ("c", V2, 2000))
    conn = catalog(tmp_path, "reader")
    for name in "cba":
        facts.write_wire(conn, facts.read_changes(origin[name], name, 0, 10))
    assert versions.count(conn) == 1
    assert ("c", V2) not in served(conn) and ("a", V1) in served(conn)
    assert len(db.Catalog.refs_of(conn, [UID])[0].locations) == 3


def test_a_version_sent_again_is_still_the_first_received(tmp_path):
    """The first version sent again (a modality's retry: duplicates at a and b, facts of
    a later stamp) stays the first received: the same bytes recorded again keep their
    first stamp. Before, each location took the later one and the second version
    (received in between, at c) became the current one, at the origins and at every
    peer that learned them."""
    origin = writers(tmp_path, ("a", V1, 1000), ("b", V1, 1000), ("c", V2, 2000))
    for name in "ab":
        facts.write_facts(origin[name], [fact(name, V1, 2, 3000)])
    conn = catalog(tmp_path, "reader")
    for name in "abc":
        facts.write_wire(conn, facts.read_changes(origin[name], name, 0, 10))
    assert origin["a"].execute("SELECT stamp FROM locations").fetchall() == [(1000,)]
    assert versions.current(conn, [UID]) == {UID: V1}
    assert served(conn) == {("a", V1), ("b", V1)}
