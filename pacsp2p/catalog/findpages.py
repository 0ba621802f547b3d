"""Every match of a C-FIND in bounded memory: the first page of rows, then the other
matches' ids, their rows a page at a time, as the requestor takes them.

A C-FIND of ``*`` at IMAGE level on a catalog of millions used to build every match as a
dict before the first response (+115 MB for 300,000 instances; ~4 GB for ten million):
any modality could exhaust the peer's memory with one request. Now the read thread
reads the first ``PAGE`` rows, and past them collects the other matches' ids (SQLite
rowids of the level's table) into an ``array('q')``, 8 bytes a match; each further page
is read by rowid, with the identifier's conditions again, when the facade has sent the
previous one (no OFFSET scans, no read transaction held open while a slow requestor
reads). Pages come in the query plan's order, rows in rowid order within a page (PS3.4
C.4.1 leaves the order to the SCP); a row removed or changed between the two reads is
not answered, as if the query had come a moment later.
"""

from __future__ import annotations

from array import array

from twisted.internet import defer

from pacsp2p.attributes import ALIAS
from pacsp2p.catalog import matching
from pacsp2p.types import Query

PAGE = 500                      # rows read and held at a time


class Matches:
    """A query's first page of matches and the ids of the rest; ``next_page()`` ->
    Deferred[list of {keyword: value}], [] once every match was given."""

    def __init__(self, catalog, page_sql: tuple[str, str], selected: list[str], ids: array,
                 params: list = ()):
        self._catalog, self._sql, self.selected, self.ids = catalog, page_sql, selected, ids
        self._params = list(params)     # the identifier's conditions, checked again
        self._next = 0
        self.first: list | None = None      # the first page, read with the query

    def next_page(self) -> defer.Deferred:
        if self.first is not None:
            page, self.first = self.first, None
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
    """Deferred[Matches] of *query* in *catalog* (``catalog.db.Catalog``). The query runs
    once as it is for up to ``PAGE`` rows (the whole answer of most C-FINDs, at the cost
    of one query, as before paging); only past ``PAGE`` are the other matches' ids read."""
    sql, params, selected = matching.build(query, return_keys)
    alias = ALIAS[query.level]
    head, sep, where = sql.partition(f" FROM {matching.from_clause(query.level)}")
    first_sql = f"{head.replace('SELECT ', f'SELECT {alias}.rowid, ', 1)}{sep}{where}"
    ids_sql = f"SELECT {alias}.rowid{sep}{where}"
    # the conditions again: an id may be another row's by now (a row deleted while it
    # was the newest leaves its rowid to the next one inserted)
    conds = f"({where[len(' WHERE '):]}) AND " if where.startswith(" WHERE ") else ""
    page_sql = (f"{head}{sep} WHERE {conds}{alias}.rowid IN (", f") ORDER BY {alias}.rowid")

    def run(conn):
        conn.execute("BEGIN")           # one snapshot for the first page and the ids: a
        try:                            # row stored again between them is not given twice
            rows = conn.execute(first_sql, params)
            try:
                first = rows.fetchmany(PAGE + 1)
            finally:
                rows.close()
            found = Matches(catalog, page_sql, selected, array("q"), params)
            found.first = [dict(zip(selected, ("" if v is None else str(v) for v in r[1:])))
                           for r in first[:PAGE]]
            if len(first) > PAGE:               # more: the ids of the rest, 8 bytes each
                given = {row[0] for row in first[:PAGE]}
                rows = conn.execute(ids_sql, params)
                try:
                    for (rowid,) in rows:
                        if rowid not in given:
                            found.ids.append(rowid)
                finally:
                    rows.close()
        finally:
            conn.execute("COMMIT")
        return found
    return catalog.read(run)
