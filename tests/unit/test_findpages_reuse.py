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
