"""A C-FIND's pages (``catalog.findpages``) answer only rows that match its identifier,
even when a row id read with the matches was given to another row before its page is
read: SQLite gives a new row max(rowid) + 1, so an instance deleted while it was the
newest leaves its id to the next one stored — another patient's, here. The page was
read by rowid alone, and answered that patient's instance to a C-FIND for ``P0``. Real
Catalog, real threads, the deletion as ``transfer.delete`` writes it (a marker and its
tombstone in one transaction)."""
from __future__ import annotations

from pacsp2p.catalog import findpages, tombstones
from pacsp2p.types import Location, Query
from test_catalog_scale import loc, meta, open_catalog, reactor  # noqa: F401 (a fixture)


def test_a_row_id_reused_between_pages_is_not_answered(tmp_path, reactor):  # noqa: F811
    cat = open_catalog(reactor, tmp_path / "catalog.sqlite")
    try:
        n = findpages.PAGE + 100                      # more than one page: read later
        for i in range(n):
            reactor.wait(cat.record(meta(i, patient=0, study=0), loc(i)))
        found = reactor.wait(findpages.matches(cat, Query("IMAGE", {"PatientID": "P0"}),
                                               ["PatientID", "SOPInstanceUID"]))
        assert len(found.first) == findpages.PAGE and len(found.ids) == n - findpages.PAGE
        newest = f"1.2.3.{n - 1}"                     # deleted, then another stored

        def tombstone(conn, seq):
            tombstones.issued(conn, cat.peer, newest, seq, dict(cat.vector), "test")
        reactor.wait(cat.record(None, Location(newest, tombstones.MARKER_ARCHIVE, cat.peer,
                                               "", tombstones.MARKER_SIZE), then=tombstone))
        reactor.wait(cat.record(meta(5000, patient=9, study=9), loc(5000)))
        reused = reactor.wait(cat.read(lambda conn: conn.execute(
            "SELECT rowid FROM instances WHERE SOPInstanceUID = '1.2.3.5000'").fetchone()[0]))
        assert reused in found.ids.tolist()           # the case this test is about
        rows = []
        for _ in range(n):                            # bounded: a page per call
            page = reactor.wait(found.next_page())
            if not page:
                break
            rows += page
        assert {r["PatientID"] for r in rows} == {"P0"}
        assert len(rows) == n - 1 and newest not in {r["SOPInstanceUID"] for r in rows}
    finally:
        reactor.wait(cat.stop())


def test_the_first_page_and_the_ids_are_one_snapshot(tmp_path):
    """An instance deleted and stored again (a new row id) between the first page's read
    and the ids' read is answered once: both reads are one snapshot. The rewrite is made
    by another connection at the moment the ids' statement starts (SQLite's trace
    callback); without the transaction the instance came in the first page under its
    old id and again among the ids under its new one."""
    from array import array

    from twisted.internet import defer

    from pacsp2p.catalog import db

    path = tmp_path / "catalog.sqlite"
    conn = db._connect(path)
    db.create_schema(conn)
    tombstones.create_schema(conn)
    n = findpages.PAGE + 10
    db.write_facts(conn, [({"PatientID": "P0", "StudyInstanceUID": "1.2.5",
                            "SeriesInstanceUID": "1.2.5.1", "SOPInstanceUID": f"1.2.5.1.{i}",
                            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                            "TransferSyntaxUID": "1.2.840.10008.1.2.1"},
                           (f"1.2.5.1.{i}", "local", "p", f"{i:064x}", 1000, i + 1))
                          for i in range(n)])
    conn.commit()
    conn.close()
    reader, writer = db._connect(path), db._connect(path)
    first_uid = reader.execute("SELECT SOPInstanceUID FROM instances ORDER BY rowid "
                               "LIMIT 1").fetchone()[0]

    def store_again(statement):
        if statement.startswith("SELECT i.rowid FROM"):          # the ids' read begins
            cols = [r[1] for r in writer.execute("PRAGMA table_info(instances)")]
            row = writer.execute("SELECT * FROM instances WHERE SOPInstanceUID = ?",
                                 (first_uid,)).fetchone()
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("DELETE FROM instances WHERE SOPInstanceUID = ?", (first_uid,))
            writer.execute(f"INSERT INTO instances ({', '.join(cols)}) VALUES "
                           f"({', '.join('?' * len(cols))})", row)
            writer.execute("COMMIT")
    reader.set_trace_callback(store_again)

    class Here:
        def read(self, fn):
            return defer.succeed(fn(reader))
    try:
        got = []
        findpages.matches(Here(), Query("IMAGE", {"PatientID": "P0"}),
                          ["SOPInstanceUID"]).addCallback(got.append)
        found, uids = got[0], []
        assert isinstance(found.ids, array) and len(found.ids) == n - findpages.PAGE
        for _ in range(n):                            # bounded: a page per call
            page = []
            found.next_page().addCallback(page.append)
            if not page[0]:
                break
            uids += [r["SOPInstanceUID"] for r in page[0]]
        assert sorted(uids) == sorted(f"1.2.5.1.{i}" for i in range(n)), \
            [u for u in set(uids) if uids.count(u) > 1]
    finally:
        reader.set_trace_callback(None)
        reader.close()
        writer.close()
