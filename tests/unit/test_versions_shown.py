"""The instance row C-FIND answers is the current version's (``catalog.shown``), on real
SQLite catalogs written by the product's own writer and sync code (``catalog.facts``):
every order of learning, an older release's batch, a delete followed by a resend learnt
in either order, a rebuilt copy, a version in another series. The real thing with peers
and findscu is tests/cluster/test_versions_row.py.
"""
from __future__ import annotations

import itertools
import sqlite3

from pacsp2p.catalog import facts, integrity, shown, tombstones, versions

from test_versions import catalog

V1, V2, V3 = "aa" * 32, "bb" * 32, "cc" * 32
UID = "1.2.3.4"


def fact(peer: str, sha: str, seq: int, stamp: int, number: str, series: str = "1.2.3.9"):
    attrs = {"SOPInstanceUID": UID, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
             "InstanceNumber": number, "SeriesInstanceUID": series,
             "StudyInstanceUID": "1.2.3", "PatientID": "P", facts.STAMP: stamp}
    return attrs, (UID, "local", peer, sha, 1000, seq)


def origins(tmp_path, series2: str = "1.2.3.9"):
    """a and b hold the first version (InstanceNumber 1, received at 1000), c the second
    (InstanceNumber 2, received at 2000): c learnt a's fact first, as a writer does."""
    out = {}
    for name, sha, stamp, number in (("a", V1, 1000, "1"), ("b", V1, 1000, "1"),
                                     ("c", V2, 2000, "2")):
        out[name] = catalog(tmp_path, name)
        if name == "c":
            facts.write_wire(out[name], facts.read_changes(out["a"], "a", 0, 10))
        facts.write_facts(out[name], [fact(name, sha, 1, stamp, number,
                                           series2 if name == "c" else "1.2.3.9")])
    return out


def row(conn) -> tuple | None:
    return conn.execute("SELECT InstanceNumber, SeriesInstanceUID FROM instances WHERE "
                        "SOPInstanceUID = ?", (UID,)).fetchone()


def sync(conn, writers, order):
    for name in order:
        facts.write_wire(conn, facts.read_changes(writers[name], name, 0, 10))


def test_every_order_of_learning_shows_the_first_versions_row(tmp_path):
    """Before: the row of the latest version (InstanceNumber 2) wherever c's fact came."""
    writers = origins(tmp_path)
    assert row(writers["c"]) == ("1", "1.2.3.9")      # its writer too
    digests = set()
    for i, order in enumerate(itertools.permutations("abc")):
        conn = catalog(tmp_path, f"reader{i}")
        sync(conn, writers, order)
        assert row(conn) == ("1", "1.2.3.9"), order
        digests.add(integrity.digest(conn))
    assert len(digests) == 1


def test_the_rows_reach_a_peer_that_learns_the_second_version_from_a_third(tmp_path):
    """d learns c's copy only from b, which learnt it from c: the second version's row
    travels beside the facts (``shown.WIRE_KEY``), and is shown once the first is gone."""
    writers = origins(tmp_path)
    b, d = writers["b"], catalog(tmp_path, "d")
    sync(b, writers, "ac")
    facts.write_wire(d, facts.read_changes(b, "c", 0, 10))
    facts.write_wire(d, facts.read_changes(b, "a", 0, 10))
    assert row(d) == ("1", "1.2.3.9")
    assert {s for (s,) in d.execute("SELECT stamp FROM version_rows")} == {1000, 2000}


def test_a_delete_then_a_resend_converges_in_either_order(tmp_path):
    """x deleted at a (every copy it knew: both versions), then sent again at c (a third
    version, InstanceNumber 3). A peer that learns the resend before the delete ends with
    the same row as one that learns the delete first: the resend's."""
    writers = origins(tmp_path)
    a, c = writers["a"], writers["c"]
    sync(a, writers, "bc")
    vector = facts.vector(a)
    seq = max(vector.values()) + 1
    facts.write_facts(a, [(None, (UID, tombstones.MARKER_ARCHIVE, "a", "", tombstones.MARKER_SIZE,
                                  seq))],
                      after=lambda conn: tombstones.issued(conn, "a", UID, seq, vector,
                                                            "test"))
    assert row(a) is None
    facts.write_facts(c, [fact("c", V3, 2, 3000, "3")])      # c has not heard of it
    assert row(c) == ("1", "1.2.3.9")
    first = catalog(tmp_path, "delete-first")
    sync(first, writers, "ab")
    facts.write_wire(first, facts.read_changes(a, "a", 0, 10))
    facts.write_wire(first, facts.read_changes(c, "c", 0, 10))
    later = catalog(tmp_path, "resend-first")
    sync(later, writers, "bc")
    assert row(later) == ("1", "1.2.3.9")
    facts.write_wire(later, facts.read_changes(a, "a", 0, 10))
    sync(c, writers, "ab")
    for conn in (first, later, c):
        assert row(conn) == ("3", "1.2.3.9")
        assert versions.current(conn, [UID]) == {}       # one version left
    assert len({integrity.digest(x) for x in (first, later, c)}) == 1


def test_an_older_release_batch_and_a_rebuilt_copy(tmp_path):
    writers = origins(tmp_path)
    old = catalog(tmp_path, "old")
    for name in "cab":
        batch = facts.read_changes(writers[name], name, 0, 10)
        for key in (versions.WIRE_KEY, shown.WIRE_KEY):
            batch[0].pop(key, None)                     # as an older release sends it
        facts.write_wire(old, batch)
    assert row(old) == ("1", "1.2.3.9")
    rebuilt = catalog(tmp_path, "rebuilt")              # holds the second version's file
    facts.write_facts(rebuilt, [fact("e", V2, 1, 0, "2")])
    sync(rebuilt, writers, "cba")
    assert row(rebuilt) == ("1", "1.2.3.9")


def test_a_version_in_another_series_comes_back_with_its_series(tmp_path):
    """The second version moved to series 1.2.3.10: its series row is retired while the
    first is shown, and comes back when the first version's copies are gone."""
    writers = origins(tmp_path, series2="1.2.3.10")
    d = catalog(tmp_path, "d")
    sync(d, writers, "cab")
    assert row(d) == ("1", "1.2.3.9")
    assert d.execute("SELECT count(*) FROM series").fetchone()[0] == 1
    d.execute("UPDATE locations SET size = -1 WHERE sha256 = ?", (V1,))   # (as a tombstone
    d.execute("BEGIN IMMEDIATE")                                          # of v1 alone)
    shown.settle(d, [], [(UID,)])
    d.execute("COMMIT")
    assert row(d) == ("2", "1.2.3.10")
    assert {r[0] for r in d.execute("SELECT SeriesInstanceUID FROM series")} >= {"1.2.3.10"}


def test_one_version_costs_no_versions_row(tmp_path):
    conn = catalog(tmp_path, "one")
    facts.write_facts(conn, [fact("a", V1, 1, 1000, "1")])
    facts.write_facts(conn, [fact("a", V1, 2, 1000, "1")])
    assert conn.execute("SELECT count(*) FROM version_rows").fetchone()[0] == 0
    assert isinstance(conn, sqlite3.Connection)


def test_a_rebuilt_catalog_holding_the_only_copy_of_the_second_version(tmp_path):
    """c's catalog rebuilt from its archive: its copy of the second version recorded
    without a stamp (the crawl, numbered above its facts of before), the only copy of
    those bytes. Its fact of before, pulled back from b, gives the copy its stamp: the
    first version is current there too, its row shown. Before, the stamp-less copy made
    the second version 'received first' at c alone (served and shown there)."""
    writers = origins(tmp_path)
    b = writers["b"]
    sync(b, writers, "ac")
    rebuilt = catalog(tmp_path, "c-rebuilt")
    facts.write_facts(rebuilt, [fact("c", V2, 5, 0, "2")])
    sync(rebuilt, writers, "ab")
    facts.write_wire(rebuilt, facts.read_changes(b, "c", 0, 10))
    assert rebuilt.execute("SELECT seq, stamp FROM locations WHERE peer = 'c'").fetchall() \
        == [(5, 2000)]
    assert versions.current(rebuilt, [UID]) == {UID: V1}
    assert row(rebuilt) == ("1", "1.2.3.9")
    assert integrity.digest(rebuilt) != ""


def test_a_hostile_batchs_versions_rows_are_checked_and_cut(tmp_path):
    """Rows of another instance, too many versions or no text are refused; a value
    longer than VALUE_MAX is cut as a fact's is (a row C-FIND answers)."""
    import pytest

    from pacsp2p.validate import VALUE_MAX
    writers = origins(tmp_path)
    sync(writers["b"], writers, "ac")
    batch = facts.read_changes(writers["b"], "c", 0, 10)
    told = batch[0][shown.WIRE_KEY][UID]
    for bad in ({"1.9": {"5": told["2000"]}}, {UID: {str(i): told["2000"] for i in range(17)}},
                {UID: {"5": told["2000"][:-1]}}, {UID: {"x": told["2000"]}},
                {UID: {"5": [None] * len(told["2000"])}}):
        with pytest.raises(ValueError):
            facts.check_wire([{**batch[0], shown.WIRE_KEY: bad}] + batch[1:])
    told["2000"][2] = "7" * (VALUE_MAX + 500)
    facts.check_wire(batch)
    assert len(told["2000"][2]) == VALUE_MAX


def test_two_versions_in_one_group_commit_show_the_first_versions_row(tmp_path):
    """A holder's push port commits the pending copies of many writers in one transaction
    (``Catalog.record_all_now``): here the first version of an instance on its archive x
    and the second on its archive y. The writer kept one instance row per UID of the
    facts it wrote together (the latest stamp's), so the first version's row was never
    kept: before, this peer and a peer that learnt from it showed the second version's
    row (InstanceNumber 2) while the first is current; as two commits do, both show the
    first's."""
    from pacsp2p.catalog.db import Catalog
    from pacsp2p.types import InstanceMeta, Location

    def meta(sha, stamp, number):
        attrs, _ = fact("h", sha, 0, stamp, number)
        return InstanceMeta(UID, attrs["SOPClassUID"], "1.2.840.10008.1.2.1", {
            k: v for k, v in attrs.items() if k not in ("SOPInstanceUID", "SOPClassUID")},
            1000, sha)

    holder = Catalog(tmp_path / "holder.sqlite", None, peer="h")
    holder._open_writer()
    holder.record_all_now([(meta(V1, 1000, "1"), Location(UID, "x", "h", V1, 1000), None),
                           (meta(V2, 2000, "2"), Location(UID, "y", "h", V2, 1000), None)])
    conn = holder._writer
    assert versions.current(conn, [UID]) == {UID: V1}
    assert row(conn) == ("1", "1.2.3.9")
    reader = catalog(tmp_path, "reader")
    facts.write_wire(reader, facts.read_changes(conn, "h", 0, 10))
    assert row(reader) == ("1", "1.2.3.9")
    assert integrity.digest(reader) == integrity.digest(conn)
    conn.close()


def test_an_instance_sent_again_many_times_still_syncs(tmp_path):
    """The same bytes sent again 20 times (a modality's retries, a study pushed again):
    each receipt's instance row, of its own stamp, is kept (``version_rows``). A batch
    carried them all, and a peer refuses a batch of more than MAX_VERSIONS rows of an
    instance: every batch holding a fact of it was refused at every peer that pulls
    (sync of that origin stuck behind it). A batch carries the row of each version
    held (its least stamp), at most MAX_VERSIONS."""
    a = catalog(tmp_path, "a")
    for i in range(20):
        facts.write_facts(a, [fact("a", V1, i + 1, 1000 + i, "1")])
    attrs, loc = fact("a", V2, 21, 5000, "2")                # a second version, on
    facts.write_facts(a, [(attrs, (UID, "other") + loc[2:])])   # another archive
    batch = facts.read_changes(a, "a", 0, 100)
    facts.check_wire(batch)
    assert sorted(batch[0][shown.WIRE_KEY][UID]) == ["1000", "5000"]
    reader = catalog(tmp_path, "reader")
    facts.write_wire(reader, batch)
    assert row(reader) == ("1", "1.2.3.9") == row(a)


def test_the_same_bytes_received_again_leave_no_versions_rows(tmp_path):
    """A modality's retries: the same bytes received 5 times (5 stamps, one location kept
    with the first). Before, each receipt's row was kept in version_rows (5 rows after 5
    receipts, one more with every retry); now only the rows of versions held, and none
    while one version is. A second version then keeps the two versions' rows."""
    conn = catalog(tmp_path, "retries")
    for i in range(5):
        facts.write_facts(conn, [fact("a", V1, 1 + i, 1000 + i, "1")])
    assert conn.execute("SELECT count(*) FROM version_rows").fetchone()[0] == 0
    assert row(conn) == ("1", "1.2.3.9")
    facts.write_facts(conn, [fact("b", V2, 1, 3000, "2")])
    assert {s for (s,) in conn.execute("SELECT stamp FROM version_rows")} == {1000, 3000}
    assert row(conn) == ("1", "1.2.3.9")
