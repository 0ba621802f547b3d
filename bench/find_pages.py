"""C-FIND paging's CPU (``catalog.findpages``) against reading every match at once (the
code before fe460ab), in one thread, on a catalog of 10,000 studies (3 instances each)
built with the product's writer: a ~300-match and a ~5,000-match StudyDate range, 50
queries each, 3 rounds, CPU ms per query (``time.thread_time``). The rows of both must
be equal.

    .venv/bin/python bench/find_pages.py
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from twisted.internet import defer

from pacsp2p.catalog import db, findpages, matching, tombstones
from pacsp2p.types import Query

KEYS = ["PatientName", "PatientID", "StudyDate", "StudyInstanceUID",
        "NumberOfStudyRelatedInstances", "ModalitiesInStudy"]


def build(path: Path):
    conn = db._connect(path)
    db.create_schema(conn)
    tombstones.create_schema(conn)
    rng, facts, n = random.Random(1), [], 0
    for s in range(10_000):
        day = time.strftime("%Y%m%d", time.gmtime(1420070400 + rng.randrange(3650) * 86400))
        study = f"1.2.9.{s}"
        for i in range(3):
            n += 1
            uid = f"{study}.1.{i}"
            facts.append(({"PatientID": f"P{s % 3000}", "PatientName": f"NAME^{s % 3000}",
                           "StudyDate": day, "StudyInstanceUID": study,
                           "SeriesInstanceUID": study + ".1", "Modality": "MR",
                           "SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
                           "TransferSyntaxUID": "1.2.840.10008.1.2.1"},
                          (uid, "local", "p", f"{n:064x}", 1000, n)))
        if len(facts) >= 3000:
            db.write_facts(conn, facts)
            facts = []
    db.write_facts(conn, facts)
    conn.commit()
    return conn


class Here:
    """A catalog whose reader jobs run in this thread, on *conn*."""

    def __init__(self, conn):
        self.conn = conn

    def read(self, fn):
        return defer.succeed(fn(self.conn))


def at_once(conn, q):
    sql, params, selected = matching.build(q, KEYS)
    return [dict(zip(selected, ("" if v is None else str(v) for v in row)))
            for row in conn.execute(sql, params).fetchall()]


def paged(conn, q):
    out, got = [], []
    findpages.matches(Here(conn), q, KEYS).addCallback(got.append)
    while True:
        page = []
        got[0].next_page().addCallback(page.append)
        if not page[0]:
            return out
        out += page[0]


def main():
    with tempfile.TemporaryDirectory() as d:
        conn = build(Path(d) / "catalog.sqlite")
        for dates in ("20180101-20180420", "20150101-20191231"):
            q = Query("STUDY", {"StudyDate": dates, **{k: "" for k in KEYS if k != "StudyDate"}})
            a, b = at_once(conn, q), paged(conn, q)
            assert sorted(map(str, a)) == sorted(map(str, b)), (len(a), len(b))
            for name, fn in [("at once", at_once), ("paged", paged)] * 3:
                t = time.thread_time()
                for _ in range(50):
                    fn(conn, q)
                print(f"{dates} {len(a):5d} matches  {name:8s} "
                      f"{(time.thread_time() - t) / 50 * 1000:6.2f} ms CPU per query")
        conn.close()


if __name__ == "__main__":
    main()
