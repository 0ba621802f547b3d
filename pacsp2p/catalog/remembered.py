"""The catalog writer's memory of the patient, study and series rows it wrote last, and
what keeps it true.

``facts.write_facts`` skips a parent row written again with the values it remembers
(a stream of one series' instances writes its parents once, their stamps raised once
per ``facts.STAMP_GRAIN``). That holds only while nothing else changed those rows: a
writer job of another kind clears the memory (``Catalog._in_writer``); facts of other
peers keep it where they wrote the same rows (``keep_where_same``); work run inside our
own transaction (a ``then``: a tombstone's payload, a late copy's removal) clears it
only if it changed a row (``run_thens``), so a push port's group commit, whose checks
change nothing unless a deletion came in between, keeps it.
"""

from __future__ import annotations

import sqlite3

PARENT_LEVELS = ("PATIENT", "STUDY", "SERIES")


def run_thens(thens: list, changed: list):
    """*after* for ``write_facts``: run each (then, seq) of *thens* as ``then(conn,
    seq)``; *changed* gets True if they changed any row (they may have removed rows)."""
    def after(conn: sqlite3.Connection) -> None:
        before = conn.total_changes
        for then, seq in thens:
            then(conn, seq)
        changed.append(conn.total_changes != before)
    return after


def keep_where_same(memory: dict, conn: sqlite3.Connection, parents: dict,
                    retired: int = 0) -> None:
    """After facts of another peer were written: the rows *memory* holds stay only where
    those facts wrote the same row (*parents*: {level: {key: values}}), and none at all
    if a row was *retired* or any tombstone is held (applying one may remove rows)."""
    if retired or conn.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone():
        memory.clear()
        return
    for level in PARENT_LEVELS:
        last = memory.get(level, {})
        for row in parents.get(level, {}).values():
            if last.get(row[0]) != row:
                last.pop(row[0], None)
