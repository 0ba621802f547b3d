"""Catalog pulls batched over origins (issue 19.5): one request brings every origin the
asker lags on, from one neighbour, at most ``limit`` facts per request.

Real SQLite catalogs written with the catalog's own functions; the answering side is
``sync.serve`` (what ``POST /changes`` runs), the asking side ``sync.AntiEntropy.pull``
(pipelined: the next request leaves before a batch is written). The bytes between them
go through a fake bulk client that counts requests; everything is synchronous.
"""
from __future__ import annotations

import pytest
from twisted.internet import defer

from pacsp2p.catalog import db, tombstones
from pacsp2p.overlay import sync
from pacsp2p.overlay.swimparts import Invalid


def facts(origin, seqs, study="1.2.3", prefix=None) -> list:
    """Facts of *origin* numbered *seqs*, each of a new instance of *study* (UID
    *prefix*.seq)."""
    prefix = prefix or f"1.2.3.{abs(hash(origin)) % 1000}"
    out = []
    for seq in seqs:
        uid = f"{prefix}.{seq}"
        attrs = {"PatientID": "P1", "PatientName": "DOE^J", "StudyInstanceUID": study,
                 "SeriesInstanceUID": study + ".1", "Modality": "CT",
                 "SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                 "TransferSyntaxUID": "1.2.840.10008.1.2.1"}
        out.append((attrs, (uid, "local", origin, "ab" * 32, 100, seq)))
    return out


class Catalog:
    """A catalog with the methods sync uses, over one SQLite file, synchronous."""

    def __init__(self, tmp_path, peer):
        self.peer = peer
        self.conn = db._connect(tmp_path / f"{peer}.sqlite")
        db.create_schema(self.conn)
        tombstones.create_schema(self.conn)
        self.vector = db.vector(self.conn)
        self.reads = self.commits = 0          # reader jobs served, transactions applied

    def store(self, n, origin=None, study="1.2.3"):
        """*n* facts of our own (or, written as if pulled, of *origin*)."""
        origin = origin or self.peer
        seq = self.vector.get(origin, 0)
        db.write_facts(self.conn, facts(origin, range(seq + 1, seq + n + 1), study))
        self.vector[origin] = seq + n

    def changes_of(self, wanted, limit, shape=None):
        self.reads += 1

        def read(n):
            return db.read_changes_of(self.conn, wanted, n)
        return defer.succeed(shape(read, limit) if shape else read(limit))

    def apply_all(self, parts):
        tops = [(origin, db.check_wire(rows)) for origin, rows in parts]
        before = self.conn.total_changes
        db.write_wires(self.conn, [rows for _, rows in parts], self.peer)
        self.commits += self.conn.total_changes > before
        for origin, top in tops:
            self.vector[origin] = max(self.vector.get(origin, 0), top)
        return defer.succeed(None)


class Member:
    def __init__(self, name):
        self.name = name


class Bulk:
    """Requests go straight to the other catalog's ``serve``."""

    def __init__(self, other, asker, tamper=None):
        self.other, self.asker, self.tamper = other, asker, tamper
        self.asked = []

    def pull_body(self, member, vector, limit, own=0):
        self.asked.append(dict(vector))
        d = sync.serve(self.other, vector, self.asker, limit)
        return d.addCallback(self.tamper) if self.tamper else d


def pulled(d):
    results = []
    d.addBoth(results.append)
    assert results, "the pull did not finish synchronously"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_one_request_brings_every_lagging_origin(tmp_path):
    x = Catalog(tmp_path, "x")
    for origin in ("a", "b", "c", "d"):
        x.store(10, origin=origin)
    x.store(5)
    y = Catalog(tmp_path, "y")
    y.store(3)
    x.store(2, origin="y")            # x knows some of y's own facts: not sent back
    bulk = Bulk(x, "y")
    ae = sync.AntiEntropy(y, bulk, batch=5000)
    theirs = pulled(ae.pull(Member("x")))
    assert len(bulk.asked) == 1, bulk.asked            # 5 origins, ONE request,
    assert (x.reads, y.commits) == (1, 1)               # one read job, one transaction
    assert theirs == x.vector
    assert {o: y.vector[o] for o in "abcdx"} == {o: x.vector[o] for o in "abcdx"}
    assert y.vector["y"] == 3
    assert ae.pulled == 45
    assert db.vector(y.conn) == y.vector


def test_a_large_backlog_comes_in_batches_of_at_most_limit_facts(tmp_path):
    x = Catalog(tmp_path, "x")
    for origin in ("a", "b", "c"):
        x.store(1500, origin=origin)
    y = Catalog(tmp_path, "y")
    bulk = Bulk(x, "y")
    ae = sync.AntiEntropy(y, bulk, batch=1000)
    pulled(ae.pull(Member("x")))
    assert y.vector == {"a": 1500, "b": 1500, "c": 1500}
    assert 5 <= len(bulk.asked) <= 6, len(bulk.asked)     # 4,500 facts / 1,000
    assert ae.pulled == 4500
    # each request carried the vector reached so far (no fact asked for twice)
    for before, after in zip(bulk.asked, bulk.asked[1:]):
        assert sum(after.values()) - sum(before.values()) <= 1000


def test_an_answer_with_facts_of_another_origin_is_refused(tmp_path):
    x = Catalog(tmp_path, "x")
    x.store(5, origin="a")
    x.store(5, origin="b")
    y = Catalog(tmp_path, "y")

    def swap(body):       # claim b's facts are a's
        vector, parts = sync.decode_answer(body)
        (_, ra), (_, rb) = parts
        return sync.encode_answer(vector, [("a", __import__("json").loads(rb))])

    ae = sync.AntiEntropy(y, Bulk(x, "y", tamper=swap), batch=5000)
    with pytest.raises(Invalid):
        pulled(ae.pull(Member("x")))
    assert y.vector == {}


@pytest.mark.parametrize("body", [b"", b"[]", b'{"vector": {"a": -1}}\n"a"',
                                  b'{"vector": {"a": 1}}\n7\n[]', b'{"vector": 3}'])
def test_malformed_answers_are_refused(body):
    with pytest.raises(ValueError):
        sync.decode_answer(body)


def test_the_answer_names_what_the_asker_lags_on_and_nothing_else(tmp_path):
    x = Catalog(tmp_path, "x")
    x.store(4, origin="a")
    x.store(4, origin="b")
    body = pulled(sync.serve(x, {"a": 4, "b": 1, "zz": 9}, "q", 100))
    vector, parts = sync.decode_answer(body)
    assert vector == {"a": 4, "b": 4}
    assert [o for o, _ in parts] == ["b"]


def test_origins_sharing_parent_rows_read_them_once_and_answer_as_alone(tmp_path):
    """A stream's facts of 31 holders share one series: ``read_changes_of`` reads its
    patient, study and series rows once for all origins (issue 18: serving a pull was
    13-16 % of the writer's busy time at 32 peers) and answers each origin as
    ``read_changes`` alone does."""
    x = Catalog(tmp_path, "x")
    origins = [f"h{i:02d}" for i in range(8)]
    for origin in origins:
        x.store(4, origin=origin)
        x.store(2, origin=origin, study="1.2.9")      # a second study beside
    wanted = [(o, 1) for o in origins]
    alone = [(o, db.read_changes(x.conn, o, 1, 5000)) for o in origins]
    statements = []
    x.conn.set_trace_callback(statements.append)
    together = db.read_changes_of(x.conn, wanted, 5000)
    x.conn.set_trace_callback(None)
    assert together == alone
    parents = [s for s in statements if "FROM patients" in s or "FROM studies" in s
               or "FROM series" in s]
    assert len(parents) == 3, parents                  # was 3 per origin: 24
    assert not x.conn.in_transaction                   # its read transaction ended


def test_rows_that_come_again_in_one_pull_are_written_once(tmp_path):
    """At 32 peers one pull brings a series' patient, study and series rows in each of up
    to 31 origins' batches, and an instance's row in both its holders': ``write_wires``
    writes each such row once (issue 18: applying a stream's 2,000 facts was a third
    of a non-writer peer's CPU), and the catalog ends as one written batch by batch."""
    x = Catalog(tmp_path, "x")
    holders = [f"h{i:02d}" for i in range(8)]
    for i, origin in enumerate(holders):     # instance k held by holders k % 8, k+1 % 8
        mine = [f for f in facts(origin, range(1, 9), prefix="1.2.7")
                if int(f[0]["SOPInstanceUID"].rsplit(".", 1)[1]) % 8 in (i, (i + 7) % 8)]
        db.write_facts(x.conn, [(a, loc) for a, loc in mine])
    x.vector = db.vector(x.conn)
    parts = db.read_changes_of(x.conn, [(o, 0) for o in holders], 5000)
    assert len(parts) == 8 and sum(len(rows) - 1 for _, rows in parts) == 16
    together, alone = Catalog(tmp_path, "together"), Catalog(tmp_path, "alone")
    rows_written = Counting(together.conn)
    db.write_wires(rows_written, [rows for _, rows in parts], "y")
    for _, rows in parts:
        db.write_wires(alone.conn, [rows], "y")
    upserts = {t: rows_written.rows[t] for t in ("patients", "studies", "series",
                                                 "instances", "locations")}
    assert upserts == {"patients": 1, "studies": 1, "series": 1, "instances": 8,
                       "locations": 16}, upserts          # was 8, 8, 8, 16, 16
    for table in ("patients", "studies", "series", "instances", "locations"):
        assert together.conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall() \
            == alone.conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()


class Counting:
    """A connection that counts the rows each ``INSERT INTO table`` executemany gets."""

    def __init__(self, conn):
        self.conn, self.rows = conn, {}

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def executemany(self, sql, rows):
        rows = list(rows)
        if sql.startswith("INSERT INTO "):
            table = sql.split()[2]
            self.rows[table] = self.rows.get(table, 0) + len(rows)
        return self.conn.executemany(sql, rows)


def test_an_answer_of_long_values_is_cut_to_its_byte_budget(tmp_path, monkeypatch):
    """Facts whose values are as long as a C-STORE may bring (``validate.VALUE_MAX``),
    each of its own patient, study and series: one answer of 5,000 of them was 170 MB,
    past the asker's 64 MB, and every pull from that peer failed for good. Here the
    budget is 200 KB and 40 facts of ten such values make 420 KB: answers stay within
    it, and the asker gets every fact by asking again."""
    from pacsp2p.validate import VALUE_MAX
    monkeypatch.setattr(sync, "ANSWER_BUDGET", 200 << 10)
    x = Catalog(tmp_path, "x")
    long = "V" * VALUE_MAX
    rows = []
    for seq in range(1, 41):
        uid = f"1.2.9.{seq}"
        attrs = {kw: long for kw in ("PatientName", "StudyDescription", "InstitutionName",
                                     "SeriesDescription", "ProtocolName", "Manufacturer",
                                     "ReferringPhysicianName", "OtherPatientIDs",
                                     "IssuerOfPatientID", "ImageType")}
        attrs.update({"PatientID": f"P{seq}", "StudyInstanceUID": f"1.2.9.1.{seq}",
                      "SeriesInstanceUID": f"1.2.9.2.{seq}", "Modality": "CT",
                      "SOPInstanceUID": uid, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
                      "TransferSyntaxUID": "1.2.840.10008.1.2.1"})
        rows.append((attrs, (uid, "local", "x", "ab" * 32, 100, seq)))
    db.write_facts(x.conn, rows)
    x.vector["x"] = 40
    sizes = []
    y = Catalog(tmp_path, "y")
    bulk = Bulk(x, "y", tamper=lambda body: sizes.append(len(body)) or body)
    pulled(sync.AntiEntropy(y, bulk, batch=5000).pull(Member("x")))
    assert y.vector["x"] == 40
    assert max(sizes) <= 200 << 10 and len(sizes) >= 3, sizes
    got = y.conn.execute("SELECT count(*) FROM instances WHERE ImageType = ?", (long,))
    assert got.fetchone()[0] == 40


def test_an_answer_is_read_and_encoded_off_the_reactor(tmp_path, monkeypatch):
    """``serve`` on a real catalog: the facts are read AND the answer encoded in a catalog
    reader thread (5,000 facts are tens of ms of JSON: before, ``encode_answer`` ran on
    the reactor), and a ``GET /changes/<origin>`` answer (older peers) alike."""
    import json
    import threading

    from pacsp2p.catalog.db import Catalog as RealCatalog
    from test_catalog_scale import ThreadReactor, loc, meta
    reactor = ThreadReactor()
    cat = RealCatalog(tmp_path / "c.sqlite", reactor, peer="q")
    reactor.wait(cat.start())
    try:
        reactor.wait(defer.gatherResults([cat.record(meta(i), loc(i, peer="q"))
                                          for i in range(300)]))
        where = []
        real = sync.encode_answer
        monkeypatch.setattr(sync, "encode_answer", lambda mine, parts: (
            where.append(threading.current_thread().name), real(mine, parts))[1])
        body = reactor.wait(sync.serve(cat, {}, "asker", 5000))
        vector, parts = sync.decode_answer(body)
        assert vector == {"q": 300} and [o for o, _ in parts] == ["q"]
        assert db.check_wire(json.loads(parts[0][1])) == 300
        assert where and threading.current_thread().name not in where, where
        assert all("catalog-reader" in name for name in where), where
        encoded = reactor.wait(cat.changes("q", 0, 10, lambda rows: (
            threading.current_thread().name, len(rows))))
        assert "catalog-reader" in encoded[0]
        assert encoded[1] == len(reactor.wait(cat.changes("q", 0, 10))) == 11  # + its header
    finally:
        reactor.wait(cat.stop())


def test_a_pulled_answer_is_decoded_and_checked_off_the_reactor(tmp_path, monkeypatch):
    """A pull between two real catalogs: the answer's JSON is decoded and its facts
    checked (``checked_rows``) in the ``catalog-sync`` thread and ``check_wire`` runs in
    the catalog writer's, not on the reactor (before: both on the reactor thread, up to
    64 MB of JSON a pull)."""
    import threading

    from pacsp2p import threads
    from pacsp2p.catalog.db import Catalog as RealCatalog
    from test_catalog_scale import ThreadReactor, loc, meta

    class Reactor(ThreadReactor):
        def __init__(self):
            super().__init__()
            self.stops = []

        def addSystemEventTrigger(self, phase, event, fn):
            self.stops.append(fn)

    reactor = Reactor()
    q = RealCatalog(tmp_path / "q.sqlite", reactor, peer="q")
    p = RealCatalog(tmp_path / "p.sqlite", reactor, peer="p")
    reactor.wait(q.start())
    reactor.wait(p.start())
    where = {"checked_rows": [], "check_wire": []}
    for module, name in ((sync, "checked_rows"), (db, "check_wire")):
        real = getattr(module, name)

        def spy(*args, real=real, name=name):
            where[name].append(threading.current_thread().name)
            return real(*args)
        monkeypatch.setattr(module, name, spy)
    try:
        reactor.wait(defer.gatherResults([q.record(meta(i), loc(i, peer="q"))
                                          for i in range(120)]))

        class Direct:
            def pull_body(self, member, vector, limit, own=0):
                return sync.serve(q, vector, "p", limit, own)
        reactor.wait(sync.AntiEntropy(p, Direct(), batch=50).pull(Member("q")))
        assert p.vector.get("q") == 120
        assert reactor.wait(p.counts())["instances"] == 120
        main = threading.current_thread().name
        assert len(where["checked_rows"]) == 3 and main not in where["checked_rows"], where
        assert all("catalog-sync" in n for n in where["checked_rows"]), where
        assert len(where["check_wire"]) == 3 and main not in where["check_wire"], where
        assert all("catalog-writer" in n for n in where["check_wire"]), where
    finally:
        reactor.wait(p.stop())
        reactor.wait(q.stop())
        for stop in reactor.stops:
            stop()
