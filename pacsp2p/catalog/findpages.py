"""Every match of a C-FIND in bounded memory: the matching rows' ids first, then the rows
a page at a time, as the requestor takes them.

A C-FIND of ``*`` at IMAGE level on a catalog of millions used to build every match as a
dict before the first response (+115 MB for 300,000 instances; ~4 GB for ten million):
any modality could exhaust the peer's memory with one request. Now the read thread
collects the ids (SQLite rowids of the level's table) into an ``array('q')``, 8 bytes a
match, and each page of ``PAGE`` rows is read by rowid when the facade has sent the
previous one (no OFFSET scans, no read transaction held open while a slow requestor
reads). Pages come in the query plan's order, rows in rowid order within a page (PS3.4
C.4.1 leaves the order to the SCP); a row removed between the two reads is not answered, as if the query had come
a moment later.
"""

from __future__ import annotations

from array import array

from twisted.internet import defer

from pacsp2p.attributes import ALIAS
from pacsp2p.catalog import matching
from pacsp2p.types import Query

PAGE = 500                      # rows read and held at a time


class Matches:
    """The ids of a query's matches; ``next_page()`` -> Deferred[list of {keyword: value}],
    [] once every match was given."""

    def __init__(self, catalog, page_sql: tuple[str, str], selected: list[str], ids: array,
                 params: list = ()):
        self._catalog, self._sql, self.selected, self.ids = catalog, page_sql, selected, ids
        self._params = list(params)     # the identifier's conditions, checked again
        self._next = 0
        self.first = None           # the only page, read with the ids (no second hop)

    def __len__(self) -> int:
        return len(self.ids)

    def next_page(self) -> defer.Deferred:
        if self._next == 0 and self.first is not None:
            self._next, page, self.first = len(self.ids), self.first, None
            return defer.succeed(page)
        chunk = self.ids[self._next:self._next + PAGE].tolist()
        self._next += len(chunk)
        if not chunk:
            return defer.succeed([])
        return self._catalog.read(lambda conn: self.read_page(conn, chunk))

    def read_page(self, conn, chunk: list[int]) -> list[dict]:
        sql = ", ".join("?" * len(chunk)).join(self._sql)
        return [dict(zip(self.selected, ("" if v is None else str(v) for v in row)))
                for row in conn.execute(sql, [*self._params, *chunk])]


def matches(catalog, query: Query, return_keys: list[str]) -> defer.Deferred:
    """Deferred[Matches] of *query* in *catalog* (``catalog.db.Catalog``)."""
    sql, params, selected = matching.build(query, return_keys)
    alias = ALIAS[query.level]
    head, sep, where = sql.partition(f" FROM {matching.from_clause(query.level)}")
    ids_sql = f"SELECT {alias}.rowid{sep}{where}"
    # the conditions again: an id may be another row's by now (a row deleted while it
    # was the newest leaves its rowid to the next one inserted)
    conds = f"({where[len(' WHERE '):]}) AND " if where.startswith(" WHERE ") else ""
    page_sql = (f"{head}{sep} WHERE {conds}{alias}.rowid IN (", f") ORDER BY {alias}.rowid")

    def run(conn):
        ids = array("q")
        rows = conn.execute(ids_sql, params)
        try:
            for (rowid,) in rows:
                ids.append(rowid)
        finally:
            rows.close()
        found = Matches(catalog, page_sql, selected, ids, params)
        if 0 < len(ids) <= PAGE:
            found.first = found.read_page(conn, ids.tolist())
        return found
    return catalog.read(run)
